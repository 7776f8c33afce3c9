//! Fleet provisioning end to end: agents installed with a shared claim certificate get
//! their own certificate and thing over MQTT with the AWS IoT Device SDK v2 for Python's
//! identity clients (v2 over MQTT 5, v1 over MQTT 3.1.1) unchanged, then reconnect with it
//! and receive an order under the shared thing-name policy; bad input, the
//! pre-provisioning hook, revocation of the claim certificate, just-in-time provisioning
//! for a registered CA, and kill -9 between the steps.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::*;
use serde_json::{json, Value};

/// AWS's fleet-provisioning sample template, made ours: the thing is `agent-{serial}`
/// with the customer account as an attribute and the shared agent policy.
fn fleet_template() -> Value {
    json!({
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Account": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["", ["agent-", {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"account": {"Ref": "Account"}, "serial": {"Ref": "SerialNumber"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "agent"}}
        },
        "DeviceConfiguration": {"account": {"Ref": "Account"}, "ordersTopic": {"Fn::Sub": "${Account}/agent-${SerialNumber}/orders"}}
    })
}

/// The agent policy and the `fleet` template.
fn broker_with_template() -> TestBroker {
    broker_with_template_and("")
}

/// As [`broker_with_template`], with `toml` added to the configuration.
fn broker_with_template_and(toml: &str) -> TestBroker {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin().raw(toml));
    ok(
        broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "agent", "document": AGENT_POLICY})),
        ),
        201,
    );
    ok(
        broker.admin(
            "POST",
            "/provisioning-templates",
            Some(&json!({"templateName": "fleet", "templateBody": fleet_template().to_string()})),
        ),
        201,
    );
    broker
}

/// A claim certificate for template `fleet`, made as an operator does
/// (`fleetcore cert create --claim --template fleet --out DIR/NAME`).
fn claim_cert(broker: &TestBroker, dir: &Path, name: &str) -> (String, ClientCert) {
    let out = dir.join(name);
    let (ok, stdout, stderr) = broker.cli_text(&[
        "cert",
        "create",
        "--claim",
        "--template",
        "fleet",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("cert create --json");
    assert_eq!(v["policy_name"], "fleetcore-claim-fleet", "{v}");
    (
        v["certificate_id"].as_str().unwrap().to_owned(),
        ClientCert {
            cert: out.join("claim-fleet.cert.pem"),
            key: out.join("claim-fleet.private.key"),
        },
    )
}

/// The order a backend left, retained, for agent `serial` (plain TCP listener, no policy).
fn leave_order(broker: &TestBroker, serial: &str, order: &str) {
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &[
            "-t",
            &format!("customer-a/agent-{serial}/orders"),
            "-m",
            order,
            "-r",
            "-q",
            "1",
        ],
    ));
}

fn identity_client(
    broker: &TestBroker,
    claim: &ClientCert,
    client: &str,
    flow: &str,
    serial: &str,
    out: &Path,
    more: &[&str],
) -> std::process::Command {
    let mut cmd = tls_client_script(broker, "awsiot_identity.py", claim);
    cmd.args([
        "--client",
        client,
        "--flow",
        flow,
        "--template",
        "fleet",
        "--serial",
        serial,
        "--account",
        "customer-a",
        "--order",
        &format!("order-for-{serial}"),
        "--client-id",
        &format!("provisioning-{serial}"),
    ])
    .arg("--out-dir")
    .arg(out)
    .args(more);
    cmd
}

fn expect_checks(out: &std::process::Output, checks: &[&str]) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_ne!(
        out.status.code(),
        Some(10),
        "awsiotsdk or paho-mqtt is missing\n{}",
        describe(out)
    );
    assert!(out.status.success(), "{}", describe(out));
    assert!(!stdout.contains("fail "), "{stdout}");
    for c in checks {
        assert!(
            stdout.contains(&format!("ok {c} ")),
            "{c} missing:\n{stdout}"
        );
    }
    stdout
}

fn sdk_flow(client: &str, flow: &str, serial: &str, checks: &[&str]) {
    let broker = broker_with_template();
    let dir = tempfile::tempdir().unwrap();
    let (claim_id, claim) = claim_cert(&broker, dir.path(), "claim");
    leave_order(&broker, serial, &format!("order-for-{serial}"));
    let out = run(
        identity_client(&broker, &claim, client, flow, serial, dir.path(), &[]),
        Duration::from_secs(90),
    );
    expect_checks(&out, checks);
    // The registry holds what the template said.
    let thing = ok(
        broker.admin("GET", &format!("/things/agent-{serial}"), None),
        200,
    );
    assert_eq!(thing["attributes"]["account"], "customer-a", "{thing}");
    assert_eq!(thing["attributes"]["serial"], serial, "{thing}");
    let certs = ok(broker.admin("GET", "/certificates", None), 200);
    let mine: Vec<&Value> = certs["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] != claim_id.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{certs}");
    let id = mine[0]["id"].as_str().unwrap();
    let desc = ok(
        broker.admin("GET", &format!("/certificates/{id}"), None),
        200,
    );
    assert_eq!(desc["state"], "ACTIVE", "{desc}");
    assert!(
        desc.to_string().contains(&format!("agent-{serial}")) && desc.to_string().contains("agent"),
        "{desc}"
    );
    let log = broker.log();
    assert!(
        log.contains("RegisterThing: provisioned")
            && log.contains(&claim_id)
            && log.contains(&format!("agent-{serial}")),
        "the log names the claim certificate and the new thing:\n{}",
        broker.log_tail()
    );
    broker.assert_no_panic_logged();
}

#[test]
fn sdk_v2_identity_client_creates_keys_registers_and_reconnects_as_the_thing() {
    sdk_flow(
        "v2",
        "keys",
        "001",
        &[
            "v2.claim_connect",
            "v2.create_keys",
            "v2.missing_parameter_rejected",
            "v2.register_thing",
            "v2.device_configuration",
            "v2.token_used_once",
            "v2.claim_cannot_subscribe_elsewhere",
            "v2.own_cert_connect",
            "v2.own_topics_subscribed",
            "v2.order_received",
        ],
    );
}

#[test]
fn sdk_v2_identity_client_signs_a_csr_and_the_key_stays_on_the_device() {
    sdk_flow(
        "v2",
        "csr",
        "002",
        &[
            "v2.create_from_csr",
            "v2.bad_csr_rejected",
            "v2.register_thing",
            "v2.order_received",
        ],
    );
}

#[test]
fn sdk_v1_identity_client_over_mqtt311_provisions_by_keys_and_by_csr() {
    sdk_flow(
        "v1",
        "keys",
        "003",
        &["v1.create_keys", "v1.register_thing", "v1.order_received"],
    );
    sdk_flow(
        "v1",
        "csr",
        "004",
        &[
            "v1.create_from_csr",
            "v1.register_thing",
            "v1.order_received",
        ],
    );
}

#[test]
fn agents_sharing_a_claim_certificate_each_hear_only_their_own_answer() {
    let broker = broker_with_template();
    let dir = tempfile::tempdir().unwrap();
    let (_, claim) = claim_cert(&broker, dir.path(), "claim");
    let start_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 4.0;
    let mut children = Vec::new();
    for (serial, flow) in [("101", "keys"), ("102", "keys"), ("103", "csr")] {
        leave_order(&broker, serial, &format!("order-for-{serial}"));
        let out = dir.path().join(serial);
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = identity_client(
            &broker,
            &claim,
            "v1",
            flow,
            serial,
            &out,
            &["--expect-alone", "--start-at", &start_at.to_string()],
        );
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        children.push(cmd.spawn().expect("spawn python3"));
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        expect_checks(&out, &["v1.only_own_answer", "v1.order_received"]);
    }
}

#[test]
fn bad_input_and_the_pre_provisioning_hook() {
    let broker = broker_with_template_and("[provisioning]\nhook_timeout_ms = 1000\n");
    // A template that does not validate is refused, naming the resource and field.
    let mut bad = fleet_template();
    bad["Resources"]["widget"] = json!({"Type": "AWS::IoT::Widget", "Properties": {}});
    let r = broker.admin(
        "POST",
        "/provisioning-templates",
        Some(&json!({"templateName": "bad", "templateBody": bad})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("widget") && r.text().contains("AWS::IoT::Widget"),
        "{}",
        r.text()
    );
    let dir = tempfile::tempdir().unwrap();
    let (_, claim) = claim_cert(&broker, dir.path(), "claim");
    let (other_id, other) = claim_cert(&broker, dir.path(), "other");
    // The second claim certificate may also provision by the hook templates.
    let any = r#"{"Version":"2012-10-17","Statement":[
        {"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":"arn:aws:iot:*:*:topic/$aws/provisioning-templates/*"},
        {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/$aws/provisioning-templates/*"}]}"#;
    ok(
        broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "claim-any", "document": any})),
        ),
        201,
    );
    ok(
        broker.admin(
            "PUT",
            &format!("/policies/claim-any/targets/{other_id}"),
            None,
        ),
        204,
    );
    let mut cmd = tls_client_script(&broker, "provision_raw.py", &claim);
    cmd.arg("checks")
        .arg("--other-cert")
        .arg(&other.cert)
        .arg("--other-key")
        .arg(&other.key)
        .args([
            "--admin-url",
            &broker.admin_url(),
            "--token",
            &broker.admin_token(),
        ])
        .arg("--out-dir")
        .arg(dir.path());
    let out = run(cmd, Duration::from_secs(90));
    expect_checks(
        &out,
        &[
            "answer_topic_refused",
            "cbor_refused",
            "create",
            "unknown_template",
            "missing_parameter",
            "forged_token",
            "empty_token",
            "token_of_another_claim",
            "register_after_refusals",
            "csr_bad_signature",
            "csr_bad_cn",
            "csr_admin_cn",
            "csr_not_json",
            "hook_allow",
            "hook_request",
            "hook_deny",
            "hook_timeout_denies",
            "hook_override",
            "denied_thing_not_made",
        ],
    );
    broker.assert_no_panic_logged();
}

fn raw(broker: &TestBroker, claim: &ClientCert, dir: &Path, args: &[&str]) -> String {
    let mut cmd = tls_client_script(broker, "provision_raw.py", claim);
    cmd.args(args).arg("--out-dir").arg(dir);
    let out = run(cmd, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(10), "paho-mqtt missing");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn value_of<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{out}"))
        .trim()
}

#[test]
fn revoking_the_claim_certificate_stops_new_provisioning_at_once() {
    let broker = broker_with_template();
    let dir = tempfile::tempdir().unwrap();
    let (claim_id, claim) = claim_cert(&broker, dir.path(), "claim");
    let out = raw(&broker, &claim, dir.path(), &["create"]);
    let token = value_of(&out, "token").to_owned();
    ok(
        broker.admin(
            "PUT",
            &format!("/certificates/{claim_id}/state"),
            Some(&json!({"state": "REVOKED"})),
        ),
        200,
    );
    // The claim certificate can no longer connect, so its token is of no use either.
    let mut cmd = tls_client_script(&broker, "provision_raw.py", &claim);
    cmd.args(["register", "--token-value", &token, "--serial", "r1"]);
    let out = run(cmd, Duration::from_secs(30));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("thing "),
        "{}",
        describe(&out)
    );
    assert_eq!(broker.admin("GET", "/things/agent-r1", None).status, 404);
}

#[test]
fn kill9_keeps_an_issued_certificate_its_token_and_a_registered_thing() {
    let mut broker = broker_with_template();
    let dir = tempfile::tempdir().unwrap();
    let (_, claim) = claim_cert(&broker, dir.path(), "claim");
    // CreateKeysAndCertificate answered, then kill -9 before RegisterThing.
    let out = raw(
        &broker,
        &claim,
        dir.path(),
        &["create", "--client-id", "k9"],
    );
    let token = value_of(&out, "token").to_owned();
    let cert_id = value_of(&out, "cert").to_owned();
    broker.kill9();
    broker.restart();
    let c = ok(
        broker.admin("GET", &format!("/certificates/{cert_id}"), None),
        200,
    );
    assert_eq!(c["state"], "PENDING_ACTIVATION", "{c}");
    let out = raw(
        &broker,
        &claim,
        dir.path(),
        &[
            "register",
            "--client-id",
            "k9",
            "--token-value",
            &token,
            "--serial",
            "k9",
        ],
    );
    assert_eq!(value_of(&out, "thing"), "agent-k9", "{out}");
    // RegisterThing answered, then kill -9: the thing, the attachments and ACTIVE stay.
    broker.kill9();
    broker.restart();
    let c = ok(
        broker.admin("GET", &format!("/certificates/{cert_id}"), None),
        200,
    );
    assert_eq!(c["state"], "ACTIVE", "{c}");
    ok(broker.admin("GET", "/things/agent-k9", None), 200);
    // And the token stays used.
    let out = raw(
        &broker,
        &claim,
        dir.path(),
        &[
            "register",
            "--client-id",
            "k9",
            "--token-value",
            &token,
            "--serial",
            "k9",
        ],
    );
    assert!(
        out.contains("rejected InvalidCertificateOwnershipToken"),
        "{out}"
    );
    // The device connects as its thing with the new certificate.
    leave_order(&broker, "k9", "after-restart");
    let device = ClientCert {
        cert: dir.path().join("device.cert.pem"),
        key: dir.path().join("device.private.key"),
    };
    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tls(&device),
        &[
            "-i",
            "agent-k9",
            "-t",
            "customer-a/agent-k9/#",
            "-C",
            "1",
            "-W",
            "10",
        ],
    ));
    let (_, retained, topic, payload) = expect_mosq_msg(&mut sub, Duration::from_secs(10));
    assert!(retained, "{}", sub.transcript());
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("customer-a/agent-k9/orders", "after-restart")
    );
}

#[test]
fn an_unregistered_certificate_is_deleted_when_its_token_expires() {
    let broker = broker_with_template_and("[provisioning]\ntoken_ttl_secs = 2\n");
    let dir = tempfile::tempdir().unwrap();
    let (_, claim) = claim_cert(&broker, dir.path(), "claim");
    let out = raw(&broker, &claim, dir.path(), &["create"]);
    let token = value_of(&out, "token").to_owned();
    let cert_id = value_of(&out, "cert").to_owned();
    std::thread::sleep(Duration::from_millis(2500));
    let out = raw(
        &broker,
        &claim,
        dir.path(),
        &["register", "--token-value", &token, "--serial", "late"],
    );
    assert!(
        out.contains("rejected InvalidCertificateOwnershipToken") && out.contains("expired"),
        "{out}"
    );
    // The sweep deletes it (it runs at least as often as tokens expire).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = broker
            .admin("GET", &format!("/certificates/{cert_id}"), None)
            .status;
        if status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "certificate {cert_id} still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A JITP template: the thing is named by the certificate's CN, its account by the O.
fn jitp_template() -> Value {
    json!({
        "Parameters": {
            "AWS::IoT::Certificate::CommonName": {"Type": "String"},
            "AWS::IoT::Certificate::Organization": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                "AttributePayload": {"account": {"Ref": "AWS::IoT::Certificate::Organization"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "agent"}}
        }
    })
}

/// A device certificate of the customer's own CA, files in `dir`.
fn customer_device(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: &Path,
    cn: &str,
    org: Option<&str>,
) -> (String, ClientCert) {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let id = ClientCert {
        cert: dir.join(format!("{cn}.pem")),
        key: dir.join(format!("{cn}.key")),
    };
    std::fs::write(&id.cert, cert.pem()).unwrap();
    std::fs::write(&id.key, key.serialize_pem()).unwrap();
    let der_id = {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    };
    (der_id, id)
}

#[test]
fn jitp_provisions_a_device_of_a_registered_ca_at_its_first_connection() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    ok(
        broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "agent", "document": AGENT_POLICY})),
        ),
        201,
    );
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "customer PKI");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(
        params,
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
    )
    .unwrap();
    let ca_id = ok(
        broker.admin("POST", "/cas", Some(&json!({"certificate_pem": ca.pem()}))),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(
        broker.admin(
            "POST",
            "/provisioning-templates",
            Some(&json!({"templateName": "customer-jitp", "type": "JITP", "templateBody": jitp_template()})),
        ),
        201,
    );
    // A fleet template cannot be a CA's; a JITP one cannot serve RegisterThing.
    ok(
        broker.admin(
            "POST",
            "/provisioning-templates",
            Some(&json!({"templateName": "fleet", "templateBody": fleet_template()})),
        ),
        201,
    );
    let r = broker.admin(
        "PUT",
        &format!("/cas/{ca_id}/provisioning-template"),
        Some(&json!({"templateName": "fleet"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    ok(
        broker.admin(
            "PUT",
            &format!("/cas/{ca_id}/provisioning-template"),
            Some(&json!({"templateName": "customer-jitp"})),
        ),
        200,
    );
    // A backend listens for the registration event (plain TCP listener, no policy).
    let mut events = mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &[
            "-t",
            &format!("$aws/events/certificates/registered/{ca_id}"),
        ],
    ));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &[
            "-t",
            "customer-a/legacy-7/orders",
            "-m",
            "first-order",
            "-r",
            "-q",
            "1",
        ],
    ));
    let dir = tempfile::tempdir().unwrap();
    let (cert_id, device) = customer_device(&ca, dir.path(), "legacy-7", Some("customer-a"));
    // The first connection provisions it and proceeds: the order arrives on it.
    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tls(&device),
        &["-i", "legacy-7", "-t", "customer-a/legacy-7/#", "-q", "1"],
    ));
    let (_, _, topic, payload) = expect_mosq_msg(&mut sub, Duration::from_secs(10));
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("customer-a/legacy-7/orders", "first-order")
    );
    sub.kill();
    let (_, _, _, event) = expect_mosq_msg(&mut events, Duration::from_secs(10));
    let event: Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["certificateId"], cert_id.as_str(), "{event}");
    assert_eq!(event["caCertificateId"], ca_id.as_str(), "{event}");
    assert_eq!(event["certificateStatus"], "ACTIVE", "{event}");
    events.kill();
    let thing = ok(broker.admin("GET", "/things/legacy-7", None), 200);
    assert_eq!(thing["attributes"]["account"], "customer-a", "{thing}");
    let c = ok(
        broker.admin("GET", &format!("/certificates/{cert_id}"), None),
        200,
    );
    assert_eq!(c["state"], "ACTIVE", "{c}");
    // A device whose certificate lacks a field the template needs is refused with why,
    // and nothing is registered.
    let (bare_id, bare) = customer_device(&ca, dir.path(), "legacy-8", None);
    let out = mosquitto_pub_output(&with(
        &broker.mosq_tls(&bare),
        &[
            "-V",
            "mqttv5",
            "-i",
            "legacy-8",
            "-t",
            "customer-a/legacy-8/x",
            "-m",
            "x",
            "-q",
            "1",
        ],
    ));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        broker.log().contains("just-in-time provisioning failed")
            && broker.log().contains("AWS::IoT::Certificate::Organization"),
        "{}",
        broker.log_tail()
    );
    assert_eq!(
        broker
            .admin("GET", &format!("/certificates/{bare_id}"), None)
            .status,
        404
    );
    assert_eq!(broker.admin("GET", "/things/legacy-8", None).status, 404);
    broker.assert_no_panic_logged();
}
