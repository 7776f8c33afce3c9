//! Static thing groups against a real broker: the admin API's `/thing-groups` routes
//! with IoT Core's rules (hierarchy, 10 groups per thing, one group per hierarchy,
//! no deletion with child groups), memberships that go with their thing, everything
//! still there after kill -9, and the same through `fleetcore group ...`.

mod common;

use common::*;
use serde_json::{json, Value};

fn expect(resp: &HttpResponse, status: u16) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    if resp.text().is_empty() {
        Value::Null
    } else {
        resp.json()
    }
}

fn refused(resp: &HttpResponse, status: u16, code: &str, needle: &str) {
    assert_eq!(resp.status, status, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

fn create(broker: &TestBroker, body: Value) -> HttpResponse {
    broker.admin("POST", "/thing-groups", Some(&body))
}

fn member(broker: &TestBroker, method: &str, group: &str, thing: &str) -> HttpResponse {
    broker.admin(
        method,
        &format!("/thing-groups/{group}/things/{thing}"),
        None,
    )
}

fn members(broker: &TestBroker, group: &str, recursive: bool) -> Vec<String> {
    let q = if recursive { "?recursive=true" } else { "" };
    let v = expect(
        &broker.admin("GET", &format!("/thing-groups/{group}/things{q}"), None),
        200,
    );
    assert_eq!(v["recursive"], recursive, "{v}");
    strings(&v["things"])
}

fn groups_of(broker: &TestBroker, thing: &str) -> Vec<String> {
    let v = expect(
        &broker.admin("GET", &format!("/things/{thing}/thing-groups"), None),
        200,
    );
    strings(&v["thing_groups"])
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn make_things(broker: &TestBroker, names: &[&str]) {
    for t in names {
        expect(
            &broker.admin("POST", "/things", Some(&json!({ "name": t }))),
            201,
        );
    }
}

/// fleet > eu > eu-berlin, fleet > us; other (a second hierarchy). Things a..d:
/// a in eu-berlin and other, b in eu, c in fleet, d in us.
fn fixture(broker: &TestBroker) {
    make_things(broker, &["a", "b", "c", "d"]);
    let made = expect(
        &create(
            broker,
            json!({"name": "fleet", "description": "every agent", "attributes": {"owner": "ops"}}),
        ),
        201,
    );
    assert_eq!(made["depth"], 1, "{made}");
    for (name, parent) in [("eu", "fleet"), ("eu-berlin", "eu"), ("us", "fleet")] {
        expect(
            &create(broker, json!({"name": name, "parent": parent})),
            201,
        );
    }
    expect(&create(broker, json!({"name": "other"})), 201);
    for (g, t) in [
        ("eu-berlin", "a"),
        ("other", "a"),
        ("eu", "b"),
        ("fleet", "c"),
        ("us", "d"),
    ] {
        expect(&member(broker, "PUT", g, t), 204);
    }
}

/// What the fixture looks like through the API, for comparing before and after a
/// restart.
fn snapshot(broker: &TestBroker) -> Value {
    let groups = expect(&broker.admin("GET", "/thing-groups", None), 200);
    let mut things = serde_json::Map::new();
    for t in ["a", "b", "c", "d"] {
        things.insert(t.into(), json!(groups_of(broker, t)));
    }
    json!({"groups": groups, "things": things, "fleet": members(broker, "fleet", true)})
}

#[test]
fn thing_groups_over_http_follow_iot_core_rules() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    fixture(&broker);

    let berlin = expect(&broker.admin("GET", "/thing-groups/eu-berlin", None), 200);
    assert_eq!(berlin["parent"], "eu");
    assert_eq!(berlin["root"], "fleet");
    assert_eq!(berlin["depth"], 3);
    assert_eq!(berlin["path"], json!(["fleet", "eu", "eu-berlin"]));
    assert_eq!(berlin["member_count"], 1);
    let fleet = expect(&broker.admin("GET", "/thing-groups/fleet", None), 200);
    assert_eq!(fleet["children"], json!(["eu", "us"]));
    assert_eq!(fleet["attributes"], json!({"owner": "ops"}));
    assert_eq!(fleet["version"], 1);
    assert!(fleet.get("parent").is_none(), "{fleet}");
    let list = expect(&broker.admin("GET", "/thing-groups", None), 200);
    let names: Vec<&str> = list["thing_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eu", "eu-berlin", "fleet", "other", "us"]);

    // Members: direct, and recursive (each thing once).
    assert_eq!(members(&broker, "fleet", false), ["c"]);
    assert_eq!(members(&broker, "fleet", true), ["a", "b", "c", "d"]);
    assert_eq!(members(&broker, "eu", true), ["a", "b"]);
    assert_eq!(groups_of(&broker, "a"), ["eu-berlin", "other"]);
    refused(
        &broker.admin("GET", "/thing-groups/fleet/things?recursive=yes", None),
        400,
        "InvalidRequest",
        "expected true or false",
    );
    refused(
        &broker.admin("GET", "/things/nobody/thing-groups", None),
        404,
        "NotFound",
        "thing \"nobody\"",
    );

    // One group per hierarchy; adding again is no change.
    refused(
        &member(&broker, "PUT", "us", "a"),
        409,
        "Conflict",
        "same hierarchy",
    );
    expect(&member(&broker, "PUT", "other", "a"), 204);
    assert_eq!(groups_of(&broker, "a"), ["eu-berlin", "other"]);
    // At most 10 groups per thing.
    for i in 0..8 {
        let g = format!("solo{i}");
        expect(&create(&broker, json!({ "name": g })), 201);
        expect(&member(&broker, "PUT", &g, "a"), 204);
    }
    expect(&create(&broker, json!({"name": "solo8"})), 201);
    refused(
        &member(&broker, "PUT", "solo8", "a"),
        409,
        "Conflict",
        "at most 10",
    );
    // Depth: fleet > eu > eu-berlin > l4 .. l7, then no more.
    let mut parent = "eu-berlin".to_string();
    for level in 4..=7 {
        let name = format!("l{level}");
        expect(
            &create(&broker, json!({"name": name, "parent": parent})),
            201,
        );
        parent = name;
    }
    refused(
        &create(&broker, json!({"name": "l8", "parent": "l7"})),
        409,
        "Conflict",
        "at most 7 levels",
    );
    // Bad input.
    refused(
        &create(&broker, json!({"name": "bad name"})),
        400,
        "InvalidRequest",
        "thing group name",
    );
    refused(
        &create(&broker, json!({"name": "x", "parent": "missing"})),
        404,
        "NotFound",
        "parent thing group \"missing\"",
    );
    refused(
        &create(&broker, json!({"name": "fleet"})),
        409,
        "Conflict",
        "already exists",
    );
    refused(
        &create(&broker, json!({"name": "x", "colour": "red"})),
        400,
        "InvalidRequest",
        "unknown field",
    );
    refused(
        &member(&broker, "PUT", "fleet", "nobody"),
        404,
        "NotFound",
        "thing \"nobody\"",
    );
    refused(
        &member(&broker, "DELETE", "fleet", "a"),
        404,
        "NotFound",
        "not a member",
    );
    // The parent is not something an update can change.
    refused(
        &broker.admin(
            "PATCH",
            "/thing-groups/us",
            Some(&json!({"parent": "other"})),
        ),
        400,
        "InvalidRequest",
        "unknown field",
    );
    let us = expect(
        &broker.admin(
            "PATCH",
            "/thing-groups/us",
            Some(
                &json!({"description": "US agents", "attributes": {"region": "us"}, "merge": true}),
            ),
        ),
        200,
    );
    assert_eq!(
        (
            &us["description"],
            &us["attributes"]["region"],
            &us["version"]
        ),
        (&json!("US agents"), &json!("us"), &json!(2))
    );
    assert_eq!(us["parent"], "fleet");

    // Deleting: refused with child groups; a group takes its memberships; a thing too.
    refused(
        &broker.admin("DELETE", "/thing-groups/eu", None),
        409,
        "Conflict",
        "has child groups",
    );
    expect(&broker.admin("DELETE", "/thing-groups/us", None), 204);
    assert!(groups_of(&broker, "d").is_empty());
    expect(&broker.admin("GET", "/thing-groups/us", None), 404);
    expect(&broker.admin("DELETE", "/things/a", None), 204);
    assert_eq!(members(&broker, "fleet", true), ["b", "c"]);
    assert!(members(&broker, "other", false).is_empty());
    make_things(&broker, &["a"]);
    assert!(
        groups_of(&broker, "a").is_empty(),
        "a new thing a is in no group"
    );

    // Every route behind the token.
    for (method, path) in [
        ("GET", "/thing-groups"),
        ("POST", "/thing-groups"),
        ("GET", "/thing-groups/fleet"),
        ("PATCH", "/thing-groups/fleet"),
        ("DELETE", "/thing-groups/fleet"),
        ("GET", "/thing-groups/fleet/things"),
        ("PUT", "/thing-groups/fleet/things/b"),
        ("DELETE", "/thing-groups/fleet/things/c"),
        ("GET", "/things/b/thing-groups"),
    ] {
        for token in [None, Some("wrong")] {
            let resp = http_request(broker.admin_port(), method, path, token, Some("{}"));
            assert_eq!(resp.status, 401, "{method} {path} {token:?}");
        }
    }
    assert_eq!(members(&broker, "fleet", false), ["c"], "nothing changed");
    broker.assert_healthy();
}

#[test]
fn thing_groups_and_memberships_survive_sigkill() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    fixture(&broker);
    // The last changes answered before the kill: a removal and an update.
    expect(&member(&broker, "DELETE", "us", "d"), 204);
    expect(
        &broker.admin(
            "PATCH",
            "/thing-groups/other",
            Some(&json!({"description": "second hierarchy"})),
        ),
        200,
    );
    let before = snapshot(&broker);
    broker.kill9();
    broker.restart();
    let after = snapshot(&broker);
    assert_eq!(after, before);
    assert!(groups_of(&broker, "d").is_empty());
    let other = expect(&broker.admin("GET", "/thing-groups/other", None), 200);
    assert_eq!(
        (&other["description"], &other["version"]),
        (&json!("second hierarchy"), &json!(2))
    );
    // The rules hold on what was loaded.
    refused(
        &member(&broker, "PUT", "us", "a"),
        409,
        "Conflict",
        "same hierarchy",
    );
    refused(
        &broker.admin("DELETE", "/thing-groups/fleet", None),
        409,
        "Conflict",
        "has child groups",
    );
    broker.assert_healthy();
}

fn cli_ok(broker: &TestBroker, args: &[&str]) -> String {
    let out = broker.cli(args);
    assert!(
        out.status.success(),
        "fleetcore {args:?}\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_err(broker: &TestBroker, args: &[&str]) -> String {
    let out = broker.cli(args);
    assert!(
        !out.status.success(),
        "fleetcore {args:?} succeeded\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_manages_thing_groups_and_their_members() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    make_things(&broker, &["computer-a", "computer-b", "computer-c"]);

    let text = cli_ok(
        &broker,
        &[
            "group",
            "create",
            "customer-b",
            "--description",
            "Customer B's agents",
            "--attr",
            "region=eu",
        ],
    );
    assert!(text.contains("created thing group customer-b"), "{text}");
    assert!(text.contains("region=eu"), "{text}");
    let text = cli_ok(
        &broker,
        &[
            "group",
            "create",
            "customer-b-berlin",
            "--parent",
            "customer-b",
        ],
    );
    assert!(text.contains("customer-b > customer-b-berlin"), "{text}");
    let json: Value =
        serde_json::from_str(&cli_ok(&broker, &["group", "create", "lab", "--json"])).unwrap();
    assert_eq!((&json["name"], &json["depth"]), (&json!("lab"), &json!(1)));

    let text = cli_ok(
        &broker,
        &[
            "group",
            "add",
            "customer-b-berlin",
            "computer-a",
            "computer-b",
        ],
    );
    assert!(text.contains("computer-a, computer-b"), "{text}");
    cli_ok(&broker, &["group", "add", "customer-b", "computer-c"]);
    cli_ok(&broker, &["group", "add", "lab", "computer-a"]);

    let text = cli_ok(&broker, &["group", "list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{text}");
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[2].starts_with("customer-b-berlin  customer-b"),
        "{text}"
    );

    let text = cli_ok(&broker, &["group", "describe", "customer-b"]);
    assert!(text.contains("child groups:"), "{text}");
    assert!(text.contains("customer-b-berlin"), "{text}");
    assert!(text.contains("Customer B's agents"), "{text}");

    let text = cli_ok(&broker, &["group", "members", "customer-b"]);
    assert_eq!(text.lines().collect::<Vec<_>>(), ["THING", "computer-c"]);
    let text = cli_ok(&broker, &["group", "members", "customer-b", "--recursive"]);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["THING", "computer-a", "computer-b", "computer-c"]
    );
    let json: Value = serde_json::from_str(&cli_ok(
        &broker,
        &["group", "members", "customer-b", "--recursive", "--json"],
    ))
    .unwrap();
    assert_eq!(json["things"].as_array().unwrap().len(), 3, "{json}");

    let text = cli_ok(&broker, &["group", "of", "computer-a"]);
    assert!(text.contains("customer-b > customer-b-berlin"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("lab ")), "{text}");
    let json: Value =
        serde_json::from_str(&cli_ok(&broker, &["group", "of", "computer-a", "--json"])).unwrap();
    assert_eq!(json["thing_groups"], json!(["customer-b-berlin", "lab"]));

    // Refusals are one line with the API's reason and status.
    let err = cli_err(&broker, &["group", "add", "customer-b", "computer-a"]);
    assert!(
        err.contains("same hierarchy") && err.contains("(409)"),
        "{err}"
    );
    let err = cli_err(
        &broker,
        &[
            "group",
            "remove",
            "customer-b-berlin",
            "computer-b",
            "computer-c",
        ],
    );
    assert!(
        err.contains("removing computer-c") && err.contains("done before it: computer-b"),
        "{err}"
    );
    let err = cli_err(&broker, &["group", "delete", "customer-b"]);
    assert!(
        err.contains("has child groups") && err.contains("(409)"),
        "{err}"
    );
    let err = cli_err(&broker, &["group", "describe", "nope"]);
    assert!(err.contains("(404)"), "{err}");

    let text = cli_ok(
        &broker,
        &["group", "update", "lab", "--description", "test bench"],
    );
    assert!(text.contains("test bench"), "{text}");
    cli_ok(&broker, &["group", "delete", "customer-b-berlin"]);
    let text = cli_ok(&broker, &["group", "of", "computer-b"]);
    assert!(text.contains("is in no thing group"), "{text}");
    let text = cli_ok(&broker, &["group", "members", "customer-b", "--recursive"]);
    assert_eq!(text.lines().collect::<Vec<_>>(), ["THING", "computer-c"]);

    let help = cli_ok(&broker, &["group", "--help"]);
    assert!(help.contains("Examples:"), "{help}");
    broker.assert_healthy();
}
