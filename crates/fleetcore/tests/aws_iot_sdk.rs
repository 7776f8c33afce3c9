//! The AWS IoT Device SDK v2 for Python (`awsiotsdk`) works against fleetcore with only
//! the endpoint and the CA file changed: mutual TLS, the SDK's own `?SDK=...` username
//! (ignored under mTLS), its 3.1.1 defaults (clean_session=False) and its MQTT 5 client,
//! with a per-device policy allowing and denying topics.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Each device may use only `acct/<its certificate CN>/...`.
const PER_DEVICE: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/acct/${iot:Certificate.Subject.CommonName}/*" },
    { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
      "Resource": "arn:aws:iot:*:*:topic/acct/${iot:Certificate.Subject.CommonName}/*" }
  ]
}"#;

fn run_agent(broker: &TestBroker, protocol: &str) {
    let pki = broker.pki();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/awsiot_agent.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(["--host", "localhost", "--port"])
        .arg(broker.tls_port().to_string())
        .arg("--ca")
        .arg(&pki.ca_cert)
        .arg("--cert")
        .arg(&pki.thing1.cert)
        .arg("--key")
        .arg(&pki.thing1.key)
        .args([
            "--client-id",
            "thing-1",
            "--protocol",
            protocol,
            "--allowed",
            "acct/thing-1/#",
            "--allowed-topic",
            "acct/thing-1/orders",
            "--denied",
            "acct/thing-2/#",
            "--denied-topic",
            "acct/thing-2/orders",
        ]);
    let out = run(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(10),
        "awsiotsdk is missing: python3 -m pip install awsiotsdk\n{}",
        describe(&out)
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!stdout.contains("fail "), "{stdout}");
}

#[test]
fn aws_iot_device_sdk_mqtt311_connects_and_is_held_to_its_policy() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(PER_DEVICE));
    run_agent(&broker, "3.1.1");
    broker.assert_no_panic_logged();
}

#[test]
fn aws_iot_device_sdk_mqtt5_connects_and_gets_0x87_for_denied_topics() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(PER_DEVICE));
    run_agent(&broker, "5");
    broker.assert_no_panic_logged();
}
