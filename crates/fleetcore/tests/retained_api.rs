//! IoT Core's retained-message APIs against a real broker: retained messages published
//! with mosquitto_pub (QoS 0 and 1, an MQTT 5 user property, a binary payload) are
//! listed page by page over HTTP, read one by one, keep their lastModifiedTime across a
//! restart, and are deleted with `fleetcore retained delete` as MQTT deletes them.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Standard base64 with padding, decoded (the test's own, not the broker's).
fn b64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    assert_eq!(text.len() % 4, 0, "padded base64 expected: {text:?}");
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not standard base64: {text:?}"));
        bits = (bits << 6) | v as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// The test fixture: (topic, QoS, payload), published in this order.
const FIXTURE: [(&str, &str, &str); 5] = [
    ("acct/dev3/config", "1", "cfg-3"),
    ("acct/dev1/config", "1", r#"{"poll":60}"#),
    ("zz/last", "0", "last"),
    ("acct/dev2/config", "0", "cfg-2"),
    ("acct/dev4/firmware", "1", "-"),
];
const BINARY: [u8; 5] = [0x00, 0xff, 0x01, 0x80, 0x7f];

fn publish_fixture(broker: &TestBroker) {
    let firmware = broker.data_dir().join("firmware.bin");
    std::fs::write(&firmware, BINARY).unwrap();
    for (topic, qos, payload) in FIXTURE {
        let mut args = vec!["-V", "mqttv5", "-q", qos, "-r", "-t", topic];
        match topic {
            "acct/dev1/config" => args.extend([
                "-m",
                payload,
                "-D",
                "publish",
                "user-property",
                "deviceName",
                "alpha",
            ]),
            "acct/dev4/firmware" => args.extend(["-f", firmware.to_str().unwrap()]),
            _ => args.extend(["-m", payload]),
        }
        mosquitto_pub(&with(&broker.mosq_tcp(), &args));
    }
}

fn list(broker: &TestBroker, query: &str) -> HttpResponse {
    broker.admin("GET", &format!("/retainedMessage{query}"), None)
}

/// Every retained topic through pages of `max`, with the number of pages it took.
fn list_all(broker: &TestBroker, max: usize) -> (Vec<Value>, usize) {
    let mut topics = Vec::new();
    let mut query = format!("?maxResults={max}");
    let mut pages = 0;
    loop {
        let resp = list(broker, &query);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let page = resp.json();
        pages += 1;
        let items = page["retainedTopics"].as_array().unwrap().clone();
        assert!(items.len() <= max, "{page}");
        topics.extend(items);
        match page.get("nextToken").and_then(Value::as_str) {
            Some(token) => {
                assert_eq!(page["retainedTopics"].as_array().unwrap().len(), max);
                query = format!("?maxResults={max}&nextToken={token}");
            }
            None => return (topics, pages),
        }
        assert!(pages < 20, "paging does not end");
    }
}

fn times(topics: &[Value]) -> BTreeMap<String, u64> {
    topics
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().unwrap().to_string(),
                t["lastModifiedTime"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn cli_ok(broker: &TestBroker, args: &[&str]) -> Output {
    let out = broker.cli(args);
    assert!(
        out.status.success(),
        "fleetcore {args:?}\n{}",
        describe(&out)
    );
    out
}

#[test]
fn retained_messages_are_listed_in_pages_read_and_keep_their_time_across_restart() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    let before = now_ms();
    publish_fixture(&broker);
    let after = now_ms();

    let (topics, pages) = list_all(&broker, 2);
    assert_eq!(pages, 3, "5 topics in pages of 2");
    let names: Vec<&str> = topics
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "acct/dev1/config",
            "acct/dev2/config",
            "acct/dev3/config",
            "acct/dev4/firmware",
            "zz/last"
        ]
    );
    for t in &topics {
        let (_, qos, payload) = FIXTURE
            .iter()
            .find(|(topic, _, _)| *topic == t["topic"])
            .unwrap();
        assert_eq!(t["qos"].to_string(), *qos, "{t}");
        let size = if *payload == "-" {
            BINARY.len()
        } else {
            payload.len()
        };
        assert_eq!(t["payloadSize"], size, "{t}");
        let at = t["lastModifiedTime"].as_u64().unwrap();
        assert!(
            (before..=after).contains(&at),
            "{t}: not in {before}..={after}"
        );
        assert!(t.get("payload").is_none(), "a listing has no payloads: {t}");
    }
    let (one_page, pages) = list_all(&broker, 200);
    assert_eq!((one_page.len(), pages), (5, 1));

    // One message, its topic's slashes raw or %2F-encoded.
    for path in [
        "/retainedMessage/acct/dev1/config",
        "/retainedMessage/acct%2Fdev1%2Fconfig",
    ] {
        let resp = broker.admin("GET", path, None);
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        let m = resp.json();
        assert_eq!(m["topic"], "acct/dev1/config");
        assert_eq!(b64(m["payload"].as_str().unwrap()), br#"{"poll":60}"#);
        assert_eq!(m["qos"], 1);
        let at = m["lastModifiedTime"].as_u64().unwrap();
        assert!((before..=after).contains(&at), "{m}");
        let props: Value =
            serde_json::from_slice(&b64(m["userProperties"].as_str().unwrap())).unwrap();
        assert_eq!(props, json!([{"deviceName": "alpha"}]));
    }
    let m = broker
        .admin("GET", "/retainedMessage/acct/dev4/firmware", None)
        .json();
    assert_eq!(b64(m["payload"].as_str().unwrap()), BINARY);
    assert!(m.get("userProperties").is_none(), "{m}");
    let m = broker.admin("GET", "/retainedMessage/zz/last", None).json();
    assert_eq!(m["qos"], 0);
    let missing = broker.admin("GET", "/retainedMessage/acct/dev9/config", None);
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.json()["error"]["code"], "NotFound");

    // Bad paging parameters.
    for query in [
        "?maxResults=0",
        "?maxResults=201",
        "?maxResults=x",
        "?nextToken=not-a-token",
        "?maxResults=2&nextToken=%25%25",
    ] {
        let resp = list(&broker, query);
        assert_eq!(resp.status, 400, "{query}: {}", resp.text());
        assert_eq!(resp.json()["error"]["code"], "InvalidRequest", "{query}");
    }
    // The same token as every other route.
    let anon = http_request(broker.admin_port(), "GET", "/retainedMessage", None, None);
    assert_eq!(anon.status, 401);
    let anon = http_request(
        broker.admin_port(),
        "GET",
        "/retainedMessage/zz/last",
        Some("wrong"),
        None,
    );
    assert_eq!(anon.status, 401);

    // The time is the one the message was stored at, also after a restart.
    let status = broker.terminate();
    assert!(status.success(), "{status}\n{}", broker.log_tail());
    broker.restart();
    let (again, _) = list_all(&broker, 2);
    assert_eq!(times(&again), times(&topics));
    let m = broker
        .admin("GET", "/retainedMessage/acct/dev1/config", None)
        .json();
    assert_eq!(
        m["lastModifiedTime"].as_u64(),
        times(&topics).get("acct/dev1/config").copied()
    );
    // A newer retained message has a newer time.
    let republished = now_ms();
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-r", "-t", "zz/last", "-m", "newer"],
    ));
    let m = broker.admin("GET", "/retainedMessage/zz/last", None).json();
    assert!(
        m["lastModifiedTime"].as_u64().unwrap() >= republished,
        "{m}"
    );
    broker.assert_healthy();
}

#[test]
fn cli_lists_shows_and_deletes_retained_messages_as_mqtt_does() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    publish_fixture(&broker);

    let out = cli_ok(&broker, &["retained", "list", "--all"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TOPIC"), "{table}");
    assert_eq!(lines.len(), 6, "{table}");
    assert!(lines[1].starts_with("acct/dev1/config "), "{table}");
    let out = cli_ok(
        &broker,
        &["retained", "list", "--all", "--max", "2", "--json"],
    );
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all["retainedTopics"].as_array().unwrap().len(), 5, "{all}");
    let out = cli_ok(&broker, &["retained", "list", "--max", "2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.contains("--next-token"), "{text}");
    let out = broker.cli(&["retained", "list", "--max", "0"]);
    assert!(!out.status.success(), "{}", describe(&out));

    let out = cli_ok(&broker, &["retained", "get", "acct/dev1/config"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(r#"{"poll":60}"#), "{text}");
    assert!(text.contains("deviceName=alpha"), "{text}");
    let out = cli_ok(&broker, &["retained", "get", "acct/dev4/firmware", "--raw"]);
    assert_eq!(out.stdout, BINARY);
    let out = cli_ok(&broker, &["retained", "get", "acct/dev4/firmware"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("base64") && text.contains("AP8BgH8="),
        "{text}"
    );

    // A subscriber that holds the topic sees the delete as MQTT sends it: a zero-byte
    // message.
    let mut live = mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "acct/dev2/config"],
    ));
    let (_, retain, _, payload) = expect_mosq_msg(&mut live, STEP);
    assert!(retain && payload == "cfg-2", "{payload:?}");
    let out = cli_ok(&broker, &["retained", "delete", "acct/dev2/config"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleted"),
        "{}",
        describe(&out)
    );
    let (_, _, topic, payload) = expect_mosq_msg(&mut live, STEP);
    assert_eq!((topic.as_str(), payload.as_str()), ("acct/dev2/config", ""));
    live.kill();

    let gone = broker.admin("GET", "/retainedMessage/acct/dev2/config", None);
    assert_eq!(gone.status, 404, "{}", gone.text());
    // (Not `acct/#`: the binary payload would garble mosquitto_sub's lines.)
    let left = retained_under(&broker, "acct/+/config");
    let topics: Vec<&str> = left.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["acct/dev1/config", "acct/dev3/config"]);
    // Deleting what is not there, or a filter, is one clear error line.
    let out = broker.cli(&["retained", "delete", "acct/dev2/config"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("(404)"),
        "{}",
        describe(&out)
    );
    let out = broker.cli(&["retained", "get", "acct/+/config"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("wildcard") && err.contains("(400)"),
        "{err}"
    );
    broker.assert_healthy();
}
