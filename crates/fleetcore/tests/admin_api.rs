//! The admin HTTP API of a real `fleetcore serve` (docs/admin-api.md): the token guards
//! every route, registry objects round-trip, certificates come out usable, foreign
//! certificates need their CA registered, the CRL lists revocations, and metrics,
//! health and the OpenAPI description are served.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    PublicKeyData, PKCS_ECDSA_P256_SHA256,
};
use serde_json::{json, Value};
use x509_parser::prelude::*;

fn broker() -> TestBroker {
    TestBroker::start(BrokerOpts::new().admin())
}

fn expect(resp: &HttpResponse, status: u16) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    if resp.body.is_empty() {
        Value::Null
    } else {
        resp.json()
    }
}

fn expect_error(resp: &HttpResponse, status: u16, code: &str) -> String {
    let v = expect(resp, status);
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().expect("message").to_string()
}

const AGENT: &str = r#"{"Version":"2012-10-17","Statement":[
  {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"}]}"#;

#[test]
fn every_route_kind_refuses_requests_without_the_token() {
    let broker = broker();
    let port = broker.admin_port();
    let cases = [
        ("GET", "/things"),
        ("POST", "/things"),
        ("GET", "/things/x"),
        ("PATCH", "/things/x"),
        ("DELETE", "/things/x"),
        ("PUT", "/things/x/principals/y"),
        ("POST", "/certificates/create"),
        ("PUT", "/certificates/y/state"),
        ("POST", "/policies"),
        ("POST", "/cas"),
        ("GET", "/crl"),
        ("POST", "/metrics"),
        ("POST", "/healthz"),
        ("GET", "/healthz/x"),
        ("GET", "/openapi.json"),
        ("GET", "/no-such-route"),
    ];
    let body = r#"{"name":"sneaky"}"#;
    for (method, path) in cases {
        for token in [
            None,
            Some("0".repeat(64)),
            Some(format!("{}x", broker.admin_token())),
        ] {
            let resp = http_request(port, method, path, token.as_deref(), Some(body));
            expect_error(&resp, 401, "Unauthorized");
            assert_eq!(
                resp.header("www-authenticate"),
                Some("Bearer"),
                "{method} {path}"
            );
        }
    }
    // Nothing was created on the way.
    let things = expect(&broker.admin("GET", "/things", None), 200);
    assert_eq!(things["things"], json!([]));
}

#[test]
fn things_are_created_read_updated_and_deleted() {
    let broker = broker();
    let t = expect(
        &broker.admin(
            "POST",
            "/things",
            Some(&json!({"name": "computer-a", "type": "agent", "attributes": {"account": "customer-b", "site": "x"}})),
        ),
        201,
    );
    assert_eq!(t["name"], "computer-a");
    assert_eq!(t["type"], "agent");
    assert_eq!(t["attributes"]["account"], "customer-b");
    assert_eq!(t["version"], 1);
    assert!(t["created_ms"].as_u64().unwrap() > 0);

    let m = expect_error(
        &broker.admin("POST", "/things", Some(&json!({"name": "computer-a"}))),
        409,
        "Conflict",
    );
    assert!(m.contains("computer-a"), "{m}");
    expect_error(
        &broker.admin("POST", "/things", Some(&json!({"name": "bad name"}))),
        400,
        "InvalidRequest",
    );
    expect_error(
        &http_request(
            broker.admin_port(),
            "POST",
            "/things",
            Some(&broker.admin_token()),
            Some("{not json"),
        ),
        400,
        "InvalidRequest",
    );

    let list = expect(&broker.admin("GET", "/things", None), 200);
    assert_eq!(list["things"].as_array().unwrap().len(), 1);
    let got = expect(&broker.admin("GET", "/things/computer-a", None), 200);
    assert_eq!(got["principals"], json!([]));

    // Merge: "" removes an attribute, others are set; without merge they are replaced.
    let t = expect(
        &broker.admin(
            "PATCH",
            "/things/computer-a",
            Some(&json!({"attributes": {"site": "", "rack": "7"}, "merge": true})),
        ),
        200,
    );
    assert_eq!(
        t["attributes"],
        json!({"account": "customer-b", "rack": "7"})
    );
    assert_eq!(t["version"], 2);
    let t = expect(
        &broker.admin(
            "PATCH",
            "/things/computer-a",
            Some(&json!({"attributes": {"account": "customer-c"}})),
        ),
        200,
    );
    assert_eq!(t["attributes"], json!({"account": "customer-c"}));

    expect(&broker.admin("DELETE", "/things/computer-a", None), 204);
    let m = expect_error(
        &broker.admin("GET", "/things/computer-a", None),
        404,
        "NotFound",
    );
    assert!(m.contains("computer-a"), "{m}");
    expect_error(
        &broker.admin("DELETE", "/things/computer-a", None),
        404,
        "NotFound",
    );
}

#[test]
fn policy_with_a_bad_document_is_refused_naming_the_statement() {
    let broker = broker();
    let bad = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topik/a"}]});
    let m = expect_error(
        &broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "agent", "document": bad})),
        ),
        400,
        "InvalidRequest",
    );
    assert!(m.contains("Statement[1]") && m.contains("topik"), "{m}");

    // A good one, given as text, then a second version made the default.
    let p = expect(
        &broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "agent", "document": AGENT})),
        ),
        201,
    );
    assert_eq!(p["default_version"], 1);
    assert_eq!(p["versions"]["1"]["document"], AGENT);
    let v2 = json!({"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}});
    let p = expect(
        &broker.admin(
            "POST",
            "/policies/agent/versions",
            Some(&json!({"document": v2, "set_as_default": true})),
        ),
        201,
    );
    assert_eq!(p["default_version"], 2);
    let p = expect(
        &broker.admin(
            "PUT",
            "/policies/agent/default-version",
            Some(&json!({"version": 1})),
        ),
        200,
    );
    assert_eq!(p["default_version"], 1);
    let list = expect(&broker.admin("GET", "/policies", None), 200);
    assert_eq!(list["policies"][0]["name"], "agent");
    expect(&broker.admin("DELETE", "/policies/agent", None), 204);
    expect_error(
        &broker.admin("GET", "/policies/agent", None),
        404,
        "NotFound",
    );
}

fn parse_pem_cert(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM certificate");
    p.contents
}

#[test]
fn created_certificate_and_key_parse_match_and_are_attached() {
    let broker = broker();
    expect(
        &broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "agent", "document": AGENT})),
        ),
        201,
    );
    // An unknown policy is refused before anything is issued.
    expect_error(
        &broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({"thing": "computer-a", "policies": ["nope"]})),
        ),
        404,
        "NotFound",
    );
    assert_eq!(
        expect(&broker.admin("GET", "/certificates", None), 200)["certificates"],
        json!([])
    );

    let c = expect(
        &broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({"thing": "computer-a", "policies": ["agent"]})),
        ),
        201,
    );
    let der = parse_pem_cert(c["certificate_pem"].as_str().unwrap());
    let (_, cert) = X509Certificate::from_der(&der).expect("certificate parses");
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "computer-a");
    let key = KeyPair::from_pem(c["private_key_pem"].as_str().unwrap()).expect("key parses");
    assert_eq!(
        key.subject_public_key_info(),
        cert.public_key().raw,
        "the key is the certificate's"
    );
    let ca_der = parse_pem_cert(c["ca_pem"].as_str().unwrap());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA that is returned");

    let id = c["certificate_id"].as_str().unwrap();
    let detail = expect(
        &broker.admin("GET", &format!("/certificates/{id}"), None),
        200,
    );
    assert_eq!(detail["state"], "ACTIVE");
    assert_eq!(detail["subject_cn"], "computer-a");
    assert_eq!(detail["policies"], json!(["agent"]));
    assert_eq!(detail["things"], json!(["computer-a"]));
    assert!(detail["pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let thing = expect(&broker.admin("GET", "/things/computer-a", None), 200);
    assert_eq!(thing["principals"], json!([id]));
    let list = expect(&broker.admin("GET", "/certificates", None), 200);
    assert!(list["certificates"][0].get("pem").is_none(), "{list}");

    // From a CSR: the thing (CN) comes from the request when not given.
    let device_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "computer-b");
    let csr = params
        .serialize_request(&device_key)
        .unwrap()
        .pem()
        .unwrap();
    let c = expect(
        &broker.admin(
            "POST",
            "/certificates/from-csr",
            Some(&json!({"csr_pem": csr, "state": "INACTIVE", "days": 30})),
        ),
        201,
    );
    assert!(c.get("private_key_pem").is_none());
    let der = parse_pem_cert(c["certificate_pem"].as_str().unwrap());
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.public_key().raw,
        device_key.subject_public_key_info(),
        "issued for the CSR's key"
    );
    let id_b = c["certificate_id"].as_str().unwrap();
    let detail = expect(
        &broker.admin("GET", &format!("/certificates/{id_b}"), None),
        200,
    );
    assert_eq!(
        (detail["state"].as_str(), detail["subject_cn"].as_str()),
        (Some("INACTIVE"), Some("computer-b"))
    );
    expect_error(
        &broker.admin(
            "POST",
            "/certificates/from-csr",
            Some(&json!({"csr_pem": "garbage"})),
        ),
        400,
        "InvalidRequest",
    );

    // Deleting: 409 while attached or ACTIVE, then fine once detached and INACTIVE.
    expect_error(
        &broker.admin("DELETE", &format!("/certificates/{id}"), None),
        409,
        "Conflict",
    );
    expect_error(
        &broker.admin("DELETE", "/things/computer-a", None),
        409,
        "Conflict",
    );
    expect(
        &broker.admin(
            "DELETE",
            &format!("/things/computer-a/principals/{id}"),
            None,
        ),
        204,
    );
    expect(
        &broker.admin("DELETE", &format!("/policies/agent/targets/{id}"), None),
        204,
    );
    expect_error(
        &broker.admin("DELETE", &format!("/certificates/{id}"), None),
        409,
        "Conflict",
    );
    expect(
        &broker.admin(
            "PUT",
            &format!("/certificates/{id}/state"),
            Some(&json!({"state": "INACTIVE"})),
        ),
        200,
    );
    expect(
        &broker.admin("DELETE", &format!("/certificates/{id}"), None),
        204,
    );
    expect_error(
        &broker.admin("GET", &format!("/certificates/{id}"), None),
        404,
        "NotFound",
    );
}

fn foreign_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "customer PKI");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    CertifiedIssuer::self_signed(params, key).unwrap()
}

#[test]
fn certificate_from_a_foreign_ca_is_refused_until_its_ca_is_registered() {
    let broker = broker();
    let ca = foreign_ca();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "legacy-1");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = params.signed_by(&key, &ca).unwrap().pem();

    let m = expect_error(
        &broker.admin(
            "POST",
            "/certificates/register",
            Some(&json!({"certificate_pem": leaf})),
        ),
        400,
        "InvalidRequest",
    );
    assert!(m.contains("not signed by"), "{m}");
    // A leaf is not a CA.
    expect_error(
        &broker.admin("POST", "/cas", Some(&json!({"certificate_pem": leaf}))),
        400,
        "InvalidRequest",
    );
    let reg = expect(
        &broker.admin("POST", "/cas", Some(&json!({"certificate_pem": ca.pem()}))),
        201,
    );
    assert!(reg["subject"].as_str().unwrap().contains("customer PKI"));
    let cas = expect(&broker.admin("GET", "/cas", None), 200);
    let cas = cas["cas"].as_array().unwrap();
    assert_eq!(cas.len(), 2);
    assert!(
        cas[0]["subject"].as_str().unwrap().contains("fleetcore CA"),
        "{cas:?}"
    );
    assert_eq!(cas[1]["id"], reg["id"]);

    let c = expect(
        &broker.admin(
            "POST",
            "/certificates/register",
            Some(&json!({"certificate_pem": leaf, "thing": "legacy-1"})),
        ),
        201,
    );
    assert_eq!(c["state"], "ACTIVE");
    assert_eq!(c["subject_cn"], "legacy-1");
    assert!(c.get("pem").is_none());
    expect_error(
        &broker.admin(
            "POST",
            "/certificates/register",
            Some(&json!({"certificate_pem": leaf})),
        ),
        409,
        "Conflict",
    );
}

#[test]
fn crl_lists_a_revoked_serial_and_revoked_stays_revoked() {
    let broker = broker();
    let c = expect(
        &broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({"thing": "computer-a"})),
        ),
        201,
    );
    let id = c["certificate_id"].as_str().unwrap();
    let serial = expect(
        &broker.admin("GET", &format!("/certificates/{id}"), None),
        200,
    )["serial"]
        .as_str()
        .unwrap()
        .to_string();

    let crl_serials = |broker: &TestBroker| -> Vec<String> {
        let resp = broker.admin("GET", "/crl", None);
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("content-type"), Some("application/pkix-crl"));
        let (_, crl) = CertificateRevocationList::from_der(&resp.body).expect("CRL parses");
        crl.iter_revoked_certificates()
            .map(|r| {
                fleetcore_core::encoding::hex(r.raw_serial())
                    .trim_start_matches('0')
                    .to_string()
            })
            .collect()
    };
    assert!(crl_serials(&broker).is_empty());

    let rec = expect(
        &broker.admin(
            "PUT",
            &format!("/certificates/{id}/state"),
            Some(&json!({"state": "REVOKED"})),
        ),
        200,
    );
    assert_eq!(rec["state"], "REVOKED");
    assert!(rec["revoked_ms"].as_u64().is_some());
    assert_eq!(
        crl_serials(&broker),
        vec![serial.trim_start_matches('0').to_string()]
    );
    let pem = broker.admin("GET", "/crl?format=pem", None);
    assert!(
        pem.text().starts_with("-----BEGIN X509 CRL-----"),
        "{}",
        pem.text()
    );

    let m = expect_error(
        &broker.admin(
            "PUT",
            &format!("/certificates/{id}/state"),
            Some(&json!({"state": "ACTIVE"})),
        ),
        409,
        "Conflict",
    );
    assert!(m.contains("REVOKED"), "{m}");
    expect_error(
        &broker.admin(
            "PUT",
            &format!("/certificates/{id}/state"),
            Some(&json!({"state": "GONE"})),
        ),
        400,
        "InvalidRequest",
    );
}

/// GET /healthz and GET /metrics answer without any token (a load balancer, a
/// Prometheus scraper) and with a wrong one; the rest of the API still needs it.
#[test]
fn healthz_and_metrics_are_served_without_the_token() {
    let broker = broker();
    let port = broker.admin_port();
    for token in [None, Some("0".repeat(64))] {
        let h = expect(
            &http_request(port, "GET", "/healthz", token.as_deref(), None),
            200,
        );
        assert_eq!(h["status"], "ok");
        let m = http_request(port, "GET", "/metrics", token.as_deref(), None);
        assert_eq!(m.status, 200);
        assert!(
            m.text().contains("fleetcore_connections_open"),
            "{}",
            m.text()
        );
        expect_error(
            &http_request(port, "GET", "/things", token.as_deref(), None),
            401,
            "Unauthorized",
        );
    }
}

#[test]
fn metrics_health_and_openapi_are_served() {
    let broker = broker();
    let m = broker.admin("GET", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("fleetcore_connections_open"),
        "{}",
        m.text()
    );

    // One MQTT client in and out: counted.
    mosquitto_pub(&with(&broker.mosq_tcp(), &["-t", "a/b", "-m", "x"]));
    let m = broker.admin("GET", "/metrics", None);
    assert!(
        m.text().contains("fleetcore_connections_total"),
        "{}",
        m.text()
    );

    let h = expect(&broker.admin("GET", "/healthz", None), 200);
    assert_eq!(h["status"], "ok");
    assert!(h["connections"].is_u64() && h["sessions"].is_u64(), "{h}");

    let spec = expect(&broker.admin("GET", "/openapi.json", None), 200);
    assert_eq!(spec["openapi"], "3.1.0");
    for path in [
        "/things",
        "/certificates/{id}/state",
        "/crl",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} missing");
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[test]
fn admin_token_file_is_private_and_kept_across_restarts() {
    let mut broker = broker();
    let path = broker.data_dir().join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.token mode {mode:o}");
    // The store holds the token-signing keys: owner-only too.
    let store = broker.data_dir().join("fleetcore.redb");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "fleetcore.redb mode {mode:o}");
    let token = broker.admin_token();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!broker.log().contains(&token), "the token was logged");
    assert!(
        broker.log().contains("admin.token"),
        "the token's path is logged"
    );
    // The hint follows the "listening" lines the harness waits for: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !broker.log().contains("fleetcore cert create") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        broker.log().contains("fleetcore cert create"),
        "no provisioning hint"
    );

    assert!(broker.terminate().success());
    broker.restart();
    assert_eq!(broker.admin_token(), token);
    expect(&broker.admin("GET", "/healthz", None), 200);
}

#[test]
fn admin_port_in_use_stops_the_start_with_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = true\n\n[admin]\nbind = \"127.0.0.1:{port}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(broker_binary());
    cmd.arg("serve").arg("--config").arg(&config);
    let out = run(cmd, Duration::from_secs(20));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin") && stderr.contains(&port.to_string()),
        "{}",
        describe(&out)
    );
    drop(busy);
}

#[test]
fn no_device_certificate_is_issued_with_the_admin_common_name() {
    let broker = broker();
    let msg = expect_error(
        &broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({"thing": "fleetcore-admin"})),
        ),
        400,
        "InvalidRequest",
    );
    assert!(msg.contains("reserved"), "{msg}");
    // Nothing was created on the way.
    let things = expect(&broker.admin("GET", "/things", None), 200);
    assert_eq!(
        things["things"].as_array().map(Vec::len),
        Some(0),
        "{things}"
    );
}

/// Bring your own PKI: a device whose certificate comes from the customer's CA gets
/// through the TLS handshake of a registry listener only once that CA is registered
/// (no restart), and then only because its certificate is registered too.
#[test]
fn device_from_a_registered_foreign_ca_can_connect_without_a_restart() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    let ca = foreign_ca();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "legacy-1");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = params.signed_by(&key, &ca).unwrap().pem();
    let dir = tempfile::tempdir().unwrap();
    let device = ClientCert {
        cert: dir.path().join("legacy-1.pem"),
        key: dir.path().join("legacy-1.key"),
    };
    std::fs::write(&device.cert, &leaf).unwrap();
    std::fs::write(&device.key, key.serialize_pem()).unwrap();
    let publish = || {
        let mut args = broker.mosq_tls(&device);
        args.extend(
            [
                "-i",
                "legacy-1",
                "-t",
                "legacy/1/status",
                "-m",
                "up",
                "-q",
                "1",
            ]
            .map(String::from),
        );
        mosquitto_pub_output(&args)
    };
    let before = publish();
    assert!(
        !before.status.success(),
        "an unknown CA must fail the handshake: {}",
        describe(&before)
    );

    expect(
        &broker.admin("POST", "/cas", Some(&json!({"certificate_pem": ca.pem()}))),
        201,
    );
    let everything = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*"}}"#;
    expect(
        &broker.admin(
            "POST",
            "/policies",
            Some(&json!({"name": "all", "document": everything})),
        ),
        201,
    );
    // Trusted CA, but the certificate is not registered yet: refused at CONNECT.
    let unregistered = publish();
    assert!(
        !unregistered.status.success(),
        "{}",
        describe(&unregistered)
    );
    expect(
        &broker.admin(
            "POST",
            "/certificates/register",
            Some(&json!({"certificate_pem": leaf, "policies": ["all"]})),
        ),
        201,
    );
    let after = publish();
    assert!(after.status.success(), "{}", describe(&after));
    broker.assert_no_panic_logged();
}

/// The README's provisioning flow with the shipped example policies: an agent (thing
/// with an account attribute, config/examples/agent-thing-policy.json) and a backend
/// (its own thing and certificate, config/examples/backend-policy.json) on the mutual
/// TLS listener that uses the server's own PKI; the backend's order reaches the agent,
/// an order for another agent does not, and the agent cannot publish to another's topic.
#[test]
fn readme_flow_backend_reaches_its_agent_with_the_example_policies() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    let dir = tempfile::tempdir().unwrap();
    let provision = |thing: &str, attrs: Value, policy: &str, document: &str| -> ClientCert {
        expect(
            &broker.admin(
                "POST",
                "/things",
                Some(&json!({"name": thing, "attributes": attrs})),
            ),
            201,
        );
        expect(
            &broker.admin(
                "POST",
                "/policies",
                Some(&json!({"name": policy, "document": document})),
            ),
            201,
        );
        let c = expect(
            &broker.admin(
                "POST",
                "/certificates/create",
                Some(&json!({"thing": thing, "policies": [policy]})),
            ),
            201,
        );
        let id = ClientCert {
            cert: dir.path().join(format!("{thing}.cert.pem")),
            key: dir.path().join(format!("{thing}.private.key")),
        };
        std::fs::write(&id.cert, c["certificate_pem"].as_str().unwrap()).unwrap();
        std::fs::write(&id.key, c["private_key_pem"].as_str().unwrap()).unwrap();
        id
    };
    let agent = provision(
        "computer-a",
        json!({"account": "customer-b"}),
        "agent",
        include_str!("../../../config/examples/agent-thing-policy.json"),
    );
    let backend = provision(
        "backend",
        json!({}),
        "backend",
        include_str!("../../../config/examples/backend-policy.json"),
    );

    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tls(&agent),
        &[
            "-i",
            "computer-a",
            "-t",
            "customer-b/computer-a/#",
            "-q",
            "1",
        ],
    ));
    let publish = |id: &ClientCert, client: &str, topic: &str, payload: &str| {
        mosquitto_pub_output(&with(
            &broker.mosq_tls(id),
            &["-i", client, "-t", topic, "-m", payload, "-q", "1"],
        ))
    };
    let other = publish(&backend, "backend", "customer-b/computer-b/x", "not yours");
    assert!(other.status.success(), "{}", describe(&other));
    let order = publish(
        &backend,
        "backend",
        "customer-b/computer-a/configurationChanges",
        r#"{"poll":60}"#,
    );
    assert!(order.status.success(), "{}", describe(&order));
    let (_, _, topic, payload) = expect_mosq_msg(&mut sub, STEP);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        (
            "customer-b/computer-a/configurationChanges",
            r#"{"poll":60}"#
        )
    );
    sub.kill();
    // The agent is kept to its own topics: as another client id it cannot connect.
    let sideways = publish(&agent, "computer-b", "customer-b/computer-b/x", "x");
    assert!(!sideways.status.success(), "{}", describe(&sideways));
}
