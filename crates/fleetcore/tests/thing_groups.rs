//! Static thing groups end to end: the admin API's rules, the CLI, and kill -9.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn call(broker: &TestBroker, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = broker.admin(method, path, body.as_ref());
    let v = if r.text().is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status, v)
}

fn cli(broker: &TestBroker, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(broker_binary());
    cmd.args(args)
        .args(["--admin-url", &broker.admin_url()])
        .arg("--data-dir")
        .arg(broker.data_dir());
    let out = run(cmd, Duration::from_secs(30));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn groups_keep_iot_cores_rules_over_http_and_survive_kill_9() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b", "c"] {
        assert_eq!(
            call(&broker, "POST", "/things", Some(json!({"name": t}))).0,
            201
        );
    }
    let group = |name: &str, parent: Option<&str>| {
        let mut body = json!({ "name": name });
        if let Some(p) = parent {
            body["parent"] = json!(p);
        }
        call(&broker, "POST", "/thing-groups", Some(body))
    };
    assert_eq!(group("eu", None).0, 201);
    assert_eq!(group("eu-de", Some("eu")).0, 201);
    assert_eq!(group("us", None).0, 201);
    assert_eq!(group("eu", None).0, 409, "a name is unique");
    assert_eq!(group("x", Some("nope")).0, 404, "the parent must exist");
    // Depth: 7 levels at most.
    let mut parent = "eu-de".to_string();
    for i in 3..=7 {
        let name = format!("lvl{i}");
        assert_eq!(group(&name, Some(&parent)).0, 201, "level {i}");
        parent = name;
    }
    let (status, body) = group("lvl8", Some(&parent));
    assert!(status == 400 || status == 409, "{status} {body}");

    let put = |g: &str, t: &str| {
        call(
            &broker,
            "PUT",
            &format!("/thing-groups/{g}/things/{t}"),
            None,
        )
        .0
    };
    assert!(put("eu", "a") / 100 == 2);
    assert!(put("eu-de", "b") / 100 == 2);
    assert!(put("us", "b") / 100 == 2);
    // Not two groups of one hierarchy: b is in eu-de, so not also in eu.
    let s = put("eu", "b");
    assert!(s == 400 || s == 409, "{s}");
    assert_eq!(put("eu", "nobody"), 404);
    let (_, m) = call(
        &broker,
        "GET",
        "/thing-groups/eu/things?recursive=true",
        None,
    );
    assert_eq!(m["things"], json!(["a", "b"]));
    let (_, m) = call(&broker, "GET", "/thing-groups/eu/things", None);
    assert_eq!(m["things"], json!(["a"]));
    // A group with children cannot go.
    let (s, _) = call(&broker, "DELETE", "/thing-groups/eu", None);
    assert_eq!(s, 409);

    broker.kill9();
    broker.restart();
    let (_, m) = call(
        &broker,
        "GET",
        "/thing-groups/eu/things?recursive=true",
        None,
    );
    assert_eq!(
        m["things"],
        json!(["a", "b"]),
        "memberships survived kill -9"
    );
    let (_, g) = call(&broker, "GET", "/things/b/thing-groups", None);
    let mut groups: Vec<String> = serde_json::from_value(g["thing_groups"].clone()).unwrap();
    groups.sort();
    assert_eq!(groups, ["eu-de", "us"]);
    let (s, d) = call(&broker, "GET", "/thing-groups/lvl7", None);
    assert_eq!(s, 200, "{d}");
    // Deleting a thing removes its memberships.
    assert_eq!(call(&broker, "DELETE", "/things/a", None).0 / 100, 2);
    let (_, m) = call(&broker, "GET", "/thing-groups/eu/things", None);
    assert_eq!(m["things"], json!([]));

    // The CLI.
    let (ok, out, err) = cli(
        &broker,
        &["group", "create", "apac", "--description", "Asia"],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&broker, &["group", "add", "apac", "c"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&broker, &["group", "members", "apac"]);
    assert!(ok && out.contains('c'), "{out}{err}");
    let (ok, out, _) = cli(&broker, &["group", "of", "c"]);
    assert!(ok && out.contains("apac"), "{out}");
    let (ok, out, _) = cli(&broker, &["--json", "group", "list"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        ok && v["thing_groups"].as_array().unwrap().len() >= 9,
        "{out}"
    );
    let (ok, _, err) = cli(&broker, &["group", "delete", "eu"]);
    assert!(!ok && err.contains("(409)"), "{err}");
    broker.assert_no_panic_logged();
}
