//! A listener's `policy_file` binds every client on it by an AWS IoT Core policy:
//! CONNECT, SUBSCRIBE, PUBLISH and every delivery are checked, with the policy
//! variables (`${iot:ClientId}`, `${iot:Certificate.Subject.CommonName}`) bound per
//! connection.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const SEC: Duration = Duration::from_secs(1);

/// The seed scenario's per-device policy, keyed on the client id.
const OWN_TOPICS_ONLY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/*" },
    { "Effect": "Deny", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/banned-*" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/acct/${iot:ClientId}/*" },
    { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
      "Resource": "arn:aws:iot:*:*:topic/acct/${iot:ClientId}/*" }
  ]
}"#;

fn sub(broker: &TestBroker, protocol: &str, client: &str, filter: &str) -> LineChild {
    let mut args = broker.paho_tcp();
    args.extend(
        [
            "--protocol",
            protocol,
            "--client-id",
            client,
            "--filter",
            filter,
            "--exit-after-subscribe",
        ]
        .map(String::from),
    );
    paho("subscribe.py", &args)
}

#[test]
fn subscribe_outside_own_prefix_is_refused_per_filter() {
    let broker = TestBroker::start(BrokerOpts::new().policy(OWN_TOPICS_ONLY));
    for (protocol, refused) in [("5", "135"), ("3.1.1", "128")] {
        let mut own = sub(&broker, protocol, "dev1", "acct/dev1/#");
        let ev = own.expect_event("suback", 10 * SEC);
        assert!(
            matches!(ev.get("codes"), "1" | "0"),
            "own prefix: {}",
            own.transcript()
        );
        let mut other = sub(&broker, protocol, "dev1", "acct/dev2/#");
        let ev = other.expect_event("suback", 10 * SEC);
        assert_eq!(ev.get("codes"), refused, "{}", other.transcript());
        // A client id with a wildcard is not substituted, so it cannot widen a filter.
        let mut inj = sub(&broker, protocol, "+", "acct/+/#");
        let ev = inj.expect_event("suback", 10 * SEC);
        assert_eq!(ev.get("codes"), refused, "{}", inj.transcript());
    }
}

#[test]
fn publish_outside_own_prefix_is_refused_v5_with_0x87_and_v3_by_disconnect() {
    let broker = TestBroker::start(BrokerOpts::new().policy(OWN_TOPICS_ONLY));
    let publish = |protocol: &str, client: &str, topic: &str| {
        let mut args = broker.paho_tcp();
        args.extend(
            [
                "--protocol",
                protocol,
                "--client-id",
                client,
                "--topic",
                topic,
                "--qos",
                "1",
            ]
            .map(String::from),
        );
        paho("publish.py", &args)
    };
    // dev2 may not publish into dev1's topics: v5 gets PUBACK 0x87.
    let mut p = publish("5", "dev2", "acct/dev1/order");
    let ev = p.expect_event("nack", 10 * SEC);
    assert_eq!(ev.get("reason_code"), "135", "{}", p.transcript());
    // MQTT 3.1.1 has no negative PUBACK: the connection is closed instead.
    let mut p3 = publish("3.1.1", "dev2", "acct/dev1/order");
    let status = p3.wait_exit(10 * SEC);
    assert!(
        !status.success(),
        "v3 publish should fail: {}",
        p3.transcript()
    );
    assert!(
        p3.events().iter().all(|e| e.kind != "ack"),
        "{}",
        p3.transcript()
    );
    // Its own topic is fine (0x10: accepted, no subscriber).
    let mut own = publish("5", "dev1", "acct/dev1/order");
    let ev = own.expect_event("ack", 10 * SEC);
    assert!(
        matches!(ev.get("reason_code"), "0" | "16"),
        "{}",
        own.transcript()
    );
    broker.assert_no_panic_logged();
}

#[test]
fn receive_is_checked_on_every_delivery() {
    let policy = r#"{
      "Version": "2012-10-17",
      "Statement": [
        { "Effect": "Allow", "Action": ["iot:Connect", "iot:Publish"], "Resource": "*" },
        { "Effect": "Allow", "Action": "iot:Subscribe", "Resource": "arn:aws:iot:*:*:topicfilter/acct/*" },
        { "Effect": "Allow", "Action": "iot:Receive", "Resource": "arn:aws:iot:*:*:topic/acct/${iot:ClientId}/*" }
      ]
    }"#;
    let broker = TestBroker::start(BrokerOpts::new().policy(policy));
    let mut args = broker.paho_tcp();
    args.extend(["--client-id", "dev2", "--filter", "acct/#", "--count", "1"].map(String::from));
    let mut dev2 = paho("subscribe.py", &args);
    dev2.expect_event("suback", 10 * SEC);
    for topic in ["acct/dev1/secret", "acct/dev2/mine"] {
        let mut args = broker.paho_tcp();
        args.extend(["--client-id", "backend", "--topic", topic].map(String::from));
        paho("publish.py", &args).expect_success(10 * SEC);
    }
    dev2.expect_success(10 * SEC);
    let topics: Vec<String> = dev2
        .events()
        .iter()
        .filter(|e| e.kind == "message")
        .map(|e| e.get("topic").to_string())
        .collect();
    assert_eq!(
        topics,
        vec!["acct/dev2/mine".to_string()],
        "{}",
        dev2.transcript()
    );
}

#[test]
fn connect_is_checked_against_certificate_common_name_and_client_id() {
    let policy = r#"{
      "Version": "2012-10-17",
      "Statement": [
        { "Effect": "Allow", "Action": "iot:Connect",
          "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}" },
        { "Effect": "Allow", "Action": ["iot:Subscribe", "iot:Receive", "iot:Publish"], "Resource": "*" }
      ]
    }"#;
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(policy));
    let thing1 = broker.pki().thing1.clone();
    for (client_id, expect_ok) in [("thing-1", true), ("thing-2", false)] {
        let mut args = broker.paho_tls(&thing1);
        args.extend(
            [
                "--client-id",
                client_id,
                "--filter",
                "a/b",
                "--exit-after-subscribe",
            ]
            .map(String::from),
        );
        let mut c = paho("subscribe.py", &args);
        let ev = c.expect_event("connack", 10 * SEC);
        if expect_ok {
            assert_eq!(ev.get("reason_code"), "0", "{}", c.transcript());
        } else {
            assert_eq!(ev.get("reason_code"), "135", "{}", c.transcript());
        }
    }
    // Anonymous TCP clients have no certificate: the variable is unset, so no
    // client id can match and CONNECT is refused (MQTT 5: 0x87).
    let mut args = broker.paho_tcp();
    args.extend(
        [
            "--client-id",
            "thing-1",
            "--filter",
            "a/b",
            "--exit-after-subscribe",
        ]
        .map(String::from),
    );
    let mut anon = paho("subscribe.py", &args);
    let ev = anon.expect_event("connack", 10 * SEC);
    assert_eq!(ev.get("reason_code"), "135", "{}", anon.transcript());
}

#[test]
fn bad_policy_file_stops_the_start_naming_statement_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("bad.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"},
            {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topik/a"}]}"#,
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[admin]\nenabled = false\n[[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\npolicy_file = {:?}\n",
            dir.path().join("data"),
            policy
        ),
    )
    .unwrap();
    let mut cmd = Command::new(broker_binary());
    cmd.arg("serve").arg("--config").arg(&config);
    let out = run(cmd, 15 * SEC);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Statement[1]") && stderr.contains("topik"),
        "{}",
        describe(&out)
    );
}
