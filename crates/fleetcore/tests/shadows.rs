//! The Device Shadow service end to end: the AWS IoT Device SDK v2 for Python's shadow
//! clients (v2 over MQTT 5, v1 over MQTT 3.1.1) unchanged, raw topics with paho for bad
//! input, kill -9 during a stream of updates, the HTTP data plane and the CLI.

mod common;

use std::time::Duration;

use common::*;

/// Each device may use its own shadow topics only (as the SDK's sample policy, with
/// the certificate's CN as the thing name).
const SHADOW_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}" },
    { "Effect": "Allow", "Action": "iot:Publish",
      "Resource": "arn:aws:iot:*:*:topic/$aws/things/${iot:Certificate.Subject.CommonName}/shadow/*" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/$aws/things/${iot:Certificate.Subject.CommonName}/shadow/*" },
    { "Effect": "Allow", "Action": "iot:Receive",
      "Resource": "arn:aws:iot:*:*:topic/$aws/things/${iot:Certificate.Subject.CommonName}/shadow/*" }
  ]
}"#;

/// As [`SHADOW_POLICY`], and publishing to any `$aws/things/...` topic but the thing
/// `forbidden`'s (so the service, not the policy, judges malformed shadow topics).
const RAW_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}" },
    { "Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/$aws/things/*" },
    { "Effect": "Deny", "Action": "iot:Publish",
      "Resource": "arn:aws:iot:*:*:topic/$aws/things/forbidden/*" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/$aws/things/${iot:Certificate.Subject.CommonName}/shadow/*" },
    { "Effect": "Allow", "Action": "iot:Receive",
      "Resource": "arn:aws:iot:*:*:topic/$aws/things/${iot:Certificate.Subject.CommonName}/shadow/*" }
  ]
}"#;

fn run_python(script: &str, broker: &TestBroker, cert: &ClientCert, args: &[&str]) -> String {
    let mut cmd = tls_client_script(broker, script, cert);
    cmd.args(args);
    let out = run(cmd, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_ne!(
        out.status.code(),
        Some(10),
        "a Python client library is missing\n{}",
        describe(&out)
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!stdout.contains("fail "), "{stdout}");
    assert!(stdout.contains("ok "), "{stdout}");
    stdout
}

#[test]
fn sdk_v2_shadow_client_over_mqtt5_gets_iot_cores_answers() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(SHADOW_POLICY));
    let out = run_python(
        "awsiot_shadow.py",
        &broker,
        &broker.pki().thing1,
        &["--thing", "thing-1", "--client", "v2"],
    );
    for check in [
        "v2.delta_stream",
        "v2.documents_stream",
        "v2.get_with_delta",
        "v2.stale_version_409",
        "v2.named_get_after_delete_404",
        "v2.recreate_continues_version",
    ] {
        assert!(
            out.contains(&format!("ok {check}")),
            "{check} missing:\n{out}"
        );
    }
    broker.assert_no_panic_logged();
}

#[test]
fn sdk_v1_shadow_client_over_mqtt311_on_the_exact_topics() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(SHADOW_POLICY));
    let out = run_python(
        "awsiot_shadow.py",
        &broker,
        &broker.pki().thing1,
        &["--thing", "thing-1", "--client", "v1"],
    );
    assert!(out.contains("ok v1.get_after_clear"), "{out}");
    assert!(out.contains("ok v1.rejected_409"), "{out}");
    broker.assert_no_panic_logged();
}

#[test]
fn bad_shadow_requests_get_their_documented_errors_and_nothing_else_is_affected() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(RAW_POLICY));
    let pki = broker.pki();
    let other_cert = path_str(&pki.thing2.cert);
    let other_key = path_str(&pki.thing2.key);
    let out = run_python(
        "shadow_raw.py",
        &broker,
        &pki.thing1,
        &[
            "checks",
            "--thing",
            "thing-1",
            "--other-cert",
            &other_cert,
            "--other-key",
            &other_key,
        ],
    );
    for check in [
        "too_deep",
        "oversized",
        "answer_topic_0x87",
        "bad_thing_name_0x90",
        "burst_429",
        "policy_denied_0x87",
        "other_device_unaffected",
    ] {
        assert!(
            out.contains(&format!("ok {check}")),
            "{check} missing:\n{out}"
        );
    }
    let log = broker.log();
    assert!(
        log.contains("is an answer topic of the shadow service"),
        "{log}"
    );
    broker.assert_no_panic_logged();
}

#[test]
fn every_update_answered_accepted_survives_kill_9() {
    let mut broker = TestBroker::start(BrokerOpts::new().tls().policy(SHADOW_POLICY));
    let pki = broker.pki();
    let mut cmd = tls_client_script(&broker, "shadow_raw.py", &pki.thing1);
    cmd.arg("stream")
        .args(["--thing", "thing-1", "--count", "100000"]);
    let mut stream = LineChild::spawn("shadow_raw.py stream", cmd);
    // Let a good number of updates be answered, then kill the broker mid-stream.
    let mut last = (0u64, 0u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while last.0 < 200 {
        let line = stream
            .next_line(deadline)
            .unwrap_or_else(|| panic!("stream ended early:\n{}", stream.transcript()));
        if let Some(rest) = line.strip_prefix("accepted ") {
            last = parse_accepted(rest);
        }
    }
    broker.kill9();
    // Whatever was answered after the last line we read is also accepted: take all.
    for line in stream.drain(Duration::from_secs(2)) {
        if let Some(rest) = line.strip_prefix("accepted ") {
            last = last.max(parse_accepted(rest));
        }
    }
    stream.kill();
    broker.restart();
    let pki = broker.pki();
    let mut cmd = tls_client_script(&broker, "shadow_raw.py", &pki.thing1);
    cmd.arg("get").args(["--thing", "thing-1"]);
    let out = run(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let state = stdout
        .lines()
        .find_map(|l| l.strip_prefix("state "))
        .unwrap_or_else(|| panic!("no state after restart: {}", describe(&out)));
    let (version, i) = parse_accepted(state);
    assert!(
        version >= last.0 && i >= last.1,
        "accepted up to version {} (i={}) before kill -9, found version {version} (i={i}) after",
        last.0,
        last.1
    );
    // Versions and values moved together: one update per version from a new shadow.
    assert_eq!(version, i, "{stdout}");
    broker.assert_no_panic_logged();
}

/// `version=V i=I` as the stream and get modes print it.
fn parse_accepted(text: &str) -> (u64, u64) {
    let mut v = 0;
    let mut i = 0;
    for part in text.split_whitespace() {
        if let Some(x) = part.strip_prefix("version=") {
            v = x.parse().unwrap();
        }
        if let Some(x) = part.strip_prefix("i=") {
            i = x.parse().unwrap();
        }
    }
    (v, i)
}

#[test]
fn http_and_cli_updates_reach_the_device_over_mqtt_even_while_it_is_offline() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(SHADOW_POLICY).admin());
    let pki = broker.pki();
    let device = with(
        &broker.paho_tls(&pki.thing1),
        &[
            "--protocol",
            "5",
            "--client-id",
            "thing-1",
            "--persistent",
            "--session-expiry",
            "300",
        ],
    );
    // A persistent session on the delta topic, then offline.
    paho(
        "subscribe.py",
        &with(
            &device,
            &[
                "--filter",
                "$aws/things/thing-1/shadow/update/delta",
                "--qos",
                "1",
                "--exit-after-subscribe",
            ],
        ),
    )
    .expect_success(STEP);

    // The backend sets desired state through the CLI (the HTTP data plane).
    let (ok, out, err) = broker.cli_text(&[
        "shadow",
        "update",
        "thing-1",
        "--desired",
        r#"{"agent":{"version":"4.12.0"}}"#,
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("to version 1"), "{out}");

    // The device comes back and gets the delta that was published while it was away.
    let mut back = paho(
        "subscribe.py",
        &with(&device, &["--no-subscribe", "--count", "1"]),
    );
    let msg = back.expect_event("message", STEP);
    assert_eq!(msg.get("topic"), "$aws/things/thing-1/shadow/update/delta");
    let body: serde_json::Value = serde_json::from_str(msg.get("payload")).unwrap();
    assert_eq!(
        body["state"],
        serde_json::json!({"agent": {"version": "4.12.0"}})
    );
    assert_eq!(body["version"], 1);
    back.expect_success(STEP);

    // GET over HTTP: the document with its delta, timestamps in seconds.
    let got = broker.admin("GET", "/things/thing-1/shadow", None);
    assert_eq!(got.status, 200, "{}", got.text());
    let doc = got.json();
    assert_eq!(doc["state"]["delta"]["agent"]["version"], "4.12.0");
    let ts = doc["timestamp"].as_u64().unwrap();
    assert!(ts > 1_700_000_000 && ts < 10_000_000_000, "seconds: {ts}");
    // A stale version over HTTP: 409 with IoT Core's body, nothing changed.
    let stale = broker.admin(
        "POST",
        "/things/thing-1/shadow",
        Some(&serde_json::json!({"state": {"reported": {"x": 1}}, "version": 7})),
    );
    assert_eq!(stale.status, 409, "{}", stale.text());
    assert_eq!(stale.json()["message"], "Version conflict");
    let bad = broker.admin(
        "POST",
        "/things/bad.name/shadow",
        Some(&serde_json::json!({"state": {}})),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());

    // Named shadows: created over HTTP, listed, shown, deleted by the CLI.
    for name in ["net", "config"] {
        let r = broker.admin(
            "POST",
            &format!("/things/thing-1/shadow?name={name}"),
            Some(&serde_json::json!({"state": {"reported": {"interval": 60}}})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let page = broker
        .admin(
            "GET",
            "/api/things/shadow/ListNamedShadowsForThing/thing-1?pageSize=1",
            None,
        )
        .json();
    assert_eq!(page["results"], serde_json::json!(["config"]));
    assert!(page["nextToken"].is_string(), "{page}");
    let none = broker
        .admin(
            "GET",
            "/api/things/shadow/ListNamedShadowsForThing/nobody",
            None,
        )
        .json();
    assert_eq!(none["results"], serde_json::json!([]));
    let r = broker.admin(
        "GET",
        "/api/things/shadow/ListNamedShadowsForThing/thing-1?pageSize=0",
        None,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let (ok, out, err) = broker.cli_text(&["shadow", "list", "thing-1", "--page-size", "1"]);
    assert!(
        ok && out.contains("config") && out.contains("net"),
        "{out}{err}"
    );
    let (ok, out, err) = broker.cli_text(&["shadow", "get", "thing-1", "--name", "net"]);
    assert!(
        ok && out.contains("interval") && out.contains("60"),
        "{out}{err}"
    );
    let (ok, out, err) = broker.cli_text(&["shadow", "delete", "thing-1", "--name", "net"]);
    assert!(ok && out.contains("at version 1"), "{out}{err}");
    let (ok, _, err) = broker.cli_text(&["shadow", "get", "thing-1", "--name", "net"]);
    assert!(
        !ok && err.contains("No shadow exists with name: 'net' (404)"),
        "{err}"
    );
    let (ok, out, err) = broker.cli_text(&["--json", "shadow", "get", "thing-1"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], 1);
    let (ok, _, err) = broker.cli_text(&["shadow", "update", "thing-1", "--desired", "[1]"]);
    assert!(!ok && err.contains("must be a JSON object"), "{err}");

    // The service's metrics.
    let metrics = broker.admin("GET", "/metrics", None).text();
    assert!(
        metrics
            .contains("fleetcore_shadow_requests_total{operation=\"update\",outcome=\"accepted\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetcore_shadow_documents 2"),
        "{metrics}"
    );
    broker.assert_no_panic_logged();
}
