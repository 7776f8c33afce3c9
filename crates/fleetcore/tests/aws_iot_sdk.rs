//! The AWS IoT Device SDK v2 for Python (`awsiotsdk`) works against fleetcore with only
//! the endpoint and the CA file changed: mutual TLS, the SDK's own `?SDK=...` username
//! (ignored under mTLS), its 3.1.1 defaults (clean_session=False) and its MQTT 5 client,
//! with a per-device policy allowing and denying topics.

mod common;

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
    let mut args = vec!["--protocol", protocol];
    args.extend(SDK_THING1_ARGS);
    run_sdk(broker, &pki.ca_cert, &pki.thing1, &args);
}

/// Runs the SDK agent script on the TLS listener with this CA file and client certificate.
fn run_sdk(broker: &TestBroker, ca: &std::path::Path, cert: &ClientCert, args: &[&str]) {
    run_awsiot_agent(broker.tls_port(), ca, cert, args);
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

/// The seed scenario's agent, provisioned as a backend would (thing with an `account`
/// attribute, certificate from the server's CA, the one shared `agent` policy keyed on
/// the thing variables), then run with the SDK against the registry listener.
#[test]
fn aws_iot_device_sdk_against_the_registry_with_the_shared_thing_policy() {
    let agent_policy = r#"{
      "Version": "2012-10-17",
      "Statement": [
        { "Effect": "Allow", "Action": "iot:Connect",
          "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}" },
        { "Effect": "Allow", "Action": "iot:Subscribe",
          "Resource": "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" },
        { "Effect": "Allow", "Action": ["iot:Receive", "iot:Publish"],
          "Resource": "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" } ] }"#;
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    let status = |r: HttpResponse, want: u16| {
        assert_eq!(r.status, want, "{}", r.text());
        r
    };
    status(
        broker.admin(
            "POST",
            "/things",
            Some(
                &serde_json::json!({"name": "computer-a", "attributes": {"account": "customer-b"}}),
            ),
        ),
        201,
    );
    status(
        broker.admin(
            "POST",
            "/policies",
            Some(&serde_json::json!({"name": "agent", "document": agent_policy})),
        ),
        201,
    );
    let created = status(
        broker.admin(
            "POST",
            "/certificates/create",
            Some(&serde_json::json!({"thing": "computer-a", "policies": ["agent"]})),
        ),
        201,
    )
    .json();
    let dir = tempfile::tempdir().unwrap();
    let cert = ClientCert {
        cert: dir.path().join("computer-a.cert.pem"),
        key: dir.path().join("computer-a.private.key"),
    };
    std::fs::write(&cert.cert, created["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&cert.key, created["private_key_pem"].as_str().unwrap()).unwrap();
    for protocol in ["3.1.1", "5"] {
        run_sdk(
            &broker,
            &broker.ca_file(),
            &cert,
            &[
                "--client-id",
                "computer-a",
                "--protocol",
                protocol,
                "--allowed",
                "customer-b/computer-a/#",
                "--allowed-topic",
                "customer-b/computer-a/configurationChanges",
                "--denied",
                "customer-b/computer-b/#",
                "--denied-topic",
                "customer-b/computer-b/configurationChanges",
            ],
        );
    }
    broker.assert_no_panic_logged();
}
