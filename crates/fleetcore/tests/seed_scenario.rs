//! The seed scenario end to end, with the real binary and real clients: a backend
//! provisions two agents in two accounts through the admin API (things with an `account`
//! attribute, one shared `agent` policy, certificates from the server's own CA); the
//! agents connect over mutual TLS to a registry listener, each gets only its own orders,
//! retained configuration arrives on subscribe, unregistered certificates are refused,
//! and revoking a certificate cuts its connection off at once and lands on the CRL.

mod common;

use std::time::{Duration, Instant};

use common::fleet::*;
use common::*;
use serde_json::json;
use x509_parser::prelude::*;

const SEC: Duration = Duration::from_secs(1);

fn paho_as(
    broker: &TestBroker,
    cert: &ClientCert,
    protocol: &str,
    client_id: &str,
    more: &[&str],
) -> Vec<String> {
    let mut args = broker.paho_tls(cert);
    args.extend(["--protocol", protocol, "--client-id", client_id].map(String::from));
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

fn publish_as_backend(
    broker: &TestBroker,
    backend: &ClientCert,
    topic: &str,
    payload: &str,
    retain: bool,
) {
    let mut args = with(
        &broker.mosq_tls(backend),
        &[
            "-V", "mqttv5", "-i", "backend", "-q", "1", "-t", topic, "-m", payload,
        ],
    );
    if retain {
        args.push("-r".into());
    }
    mosquitto_pub(&args);
}

#[test]
fn two_agents_in_two_accounts_get_their_own_orders_and_revocation_cuts_off_at_once() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    let certs = tempfile::tempdir().unwrap();

    // --- provisioning, as a backend would do it ---------------------------------------
    for (thing, account) in [("computer-a", "customer-a"), ("computer-b", "customer-b")] {
        ok(
            broker.admin(
                "POST",
                "/things",
                Some(&json!({"name": thing, "type": "agent", "attributes": {"account": account}})),
            ),
            201,
        );
    }
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
            "/policies",
            Some(&json!({"name": "backend", "document": BACKEND_POLICY})),
        ),
        201,
    );
    let (id_a, cert_a) = provision(&broker, certs.path(), "computer-a", &["agent"]);
    let (_id_b, cert_b) = provision(&broker, certs.path(), "computer-b", &["agent"]);
    let (_, backend) = provision(&broker, certs.path(), "backend", &["backend"]);

    // --- isolation: no reaching into the other account ---------------------------------
    for (protocol, refused) in [("5", "135"), ("3.1.1", "128")] {
        let mut c = paho(
            "subscribe.py",
            &paho_as(
                &broker,
                &cert_a,
                protocol,
                "computer-a",
                &[
                    "--filter",
                    "customer-b/computer-b/#",
                    "--exit-after-subscribe",
                ],
            ),
        );
        let ev = c.expect_event("suback", 10 * SEC);
        assert_eq!(ev.get("codes"), refused, "v{protocol}: {}", c.transcript());
    }
    let mut p = paho(
        "publish.py",
        &paho_as(
            &broker,
            &cert_a,
            "5",
            "computer-a",
            &["--topic", "customer-b/computer-b/orders", "--qos", "1"],
        ),
    );
    let ev = p.expect_event("nack", 10 * SEC);
    assert_eq!(ev.get("reason_code"), "135", "{}", p.transcript());
    // A client id other than the thing name binds no thing variables: no CONNECT.
    let mut c = paho(
        "subscribe.py",
        &paho_as(
            &broker,
            &cert_a,
            "5",
            "computer-b",
            &[
                "--filter",
                "customer-a/computer-a/#",
                "--exit-after-subscribe",
            ],
        ),
    );
    assert_eq!(
        c.expect_event("connack", 10 * SEC).get("reason_code"),
        "135",
        "{}",
        c.transcript()
    );

    // --- each agent receives its own orders, and only those ----------------------------
    let mut sub_a = mosquitto_sub(&with(
        &broker.mosq_tls(&cert_a),
        &[
            "-V",
            "mqttv5",
            "-i",
            "computer-a",
            "-q",
            "1",
            "-t",
            "customer-a/computer-a/#",
        ],
    ));
    let mut sub_b = mosquitto_sub(&with(
        &broker.mosq_tls(&cert_b),
        &[
            "-V",
            "mqttv311",
            "-i",
            "computer-b",
            "-q",
            "1",
            "-t",
            "customer-b/computer-b/#",
        ],
    ));
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/orders",
        "order-a1",
        false,
    );
    publish_as_backend(
        &broker,
        &backend,
        "customer-b/computer-b/orders",
        "order-b1",
        false,
    );
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/orders",
        "order-a2",
        false,
    );
    for want in ["order-a1", "order-a2"] {
        let (_, _, topic, payload) = expect_mosq_msg(&mut sub_a, STEP);
        assert_eq!(
            (topic.as_str(), payload.as_str()),
            ("customer-a/computer-a/orders", want)
        );
    }
    let (_, _, topic, payload) = expect_mosq_msg(&mut sub_b, STEP);
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("customer-b/computer-b/orders", "order-b1")
    );

    // --- a retained order arrives on (re)subscribe -------------------------------------
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/config",
        "cfg-1",
        true,
    );
    let (_, _, _, payload) = expect_mosq_msg(&mut sub_a, STEP);
    assert_eq!(payload, "cfg-1");
    sub_a.kill();
    let mut agent_a = paho(
        "subscribe.py",
        &paho_as(
            &broker,
            &cert_a,
            "5",
            "computer-a",
            &[
                "--filter",
                "customer-a/computer-a/#",
                "--timeout",
                "60",
                "--will-topic",
                "customer-a/computer-a/status",
                "--will-payload",
                "agent-lost",
            ],
        ),
    );
    assert_eq!(
        agent_a.expect_event("connack", 10 * SEC).get("reason_code"),
        "0"
    );
    let msg = agent_a.expect_event("message", 10 * SEC);
    assert_eq!(
        (msg.get("topic"), msg.get("payload"), msg.get("retain")),
        ("customer-a/computer-a/config", "cfg-1", "1"),
        "{}",
        agent_a.transcript()
    );

    // --- a certificate from the same CA that is not registered is refused ----------------
    let (id_x, cert_x) = provision(&broker, certs.path(), "stranger", &[]);
    ok(
        broker.admin(
            "PUT",
            &format!("/certificates/{id_x}/state"),
            Some(&json!({"state": "INACTIVE"})),
        ),
        200,
    );
    ok(
        broker.admin(
            "DELETE",
            &format!("/things/stranger/principals/{id_x}"),
            None,
        ),
        204,
    );
    ok(
        broker.admin("DELETE", &format!("/certificates/{id_x}"), None),
        204,
    );
    let mut x = paho(
        "subscribe.py",
        &paho_as(
            &broker,
            &cert_x,
            "5",
            "stranger",
            &["--filter", "x/#", "--exit-after-subscribe"],
        ),
    );
    assert_eq!(
        x.expect_event("connack", 10 * SEC).get("reason_code"),
        "135",
        "{}",
        x.transcript()
    );
    let out = mosquitto_pub_output(&with(
        &broker.mosq_tls(&cert_x),
        &["-V", "mqttv311", "-i", "stranger", "-t", "x/y", "-m", "m"],
    ));
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorised"),
        "v3.1.1 CONNACK return code 5 expected\n{}",
        describe(&out)
    );

    // --- revocation: the live connection is cut at once, reconnects are refused ----------
    // Its will is not published: a revoked device's last word is not trusted either.
    let mut status = mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "customer-a/computer-a/status"],
    ));
    let start = Instant::now();
    let rec = ok(
        broker.admin(
            "PUT",
            &format!("/certificates/{id_a}/state"),
            Some(&json!({"state": "REVOKED"})),
        ),
        200,
    );
    assert_eq!(rec["state"], "REVOKED");
    let ev = agent_a.expect_event("disconnected", 5 * SEC);
    let took = start.elapsed();
    assert_eq!(
        (ev.get("reason_code"), ev.get("from_broker")),
        ("135", "1"),
        "{}",
        agent_a.transcript()
    );
    assert!(took < SEC, "revoked agent disconnected after {took:?}");
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &[
            "-q",
            "1",
            "-t",
            "customer-a/computer-a/status",
            "-m",
            "marker",
        ],
    ));
    assert_eq!(
        expect_mosq_msg(&mut status, STEP).3,
        "marker",
        "the revoked agent's will was published"
    );
    status.kill();
    let mut again = paho(
        "subscribe.py",
        &paho_as(
            &broker,
            &cert_a,
            "5",
            "computer-a",
            &[
                "--filter",
                "customer-a/computer-a/#",
                "--exit-after-subscribe",
            ],
        ),
    );
    assert_eq!(
        again.expect_event("connack", 10 * SEC).get("reason_code"),
        "135",
        "{}",
        again.transcript()
    );

    // The other agent is untouched.
    publish_as_backend(
        &broker,
        &backend,
        "customer-b/computer-b/orders",
        "order-b2",
        false,
    );
    let (_, _, _, payload) = expect_mosq_msg(&mut sub_b, STEP);
    assert_eq!(payload, "order-b2");

    // --- and the CRL lists it ---------------------------------------------------------
    let serial = ok(
        broker.admin("GET", &format!("/certificates/{id_a}"), None),
        200,
    )["serial"]
        .as_str()
        .unwrap()
        .trim_start_matches('0')
        .to_string();
    let crl = broker.admin("GET", "/crl", None);
    assert_eq!(crl.status, 200);
    let (_, crl) = CertificateRevocationList::from_der(&crl.body).expect("CRL parses");
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| {
            r.raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .trim_start_matches('0')
                .to_string()
        })
        .collect();
    assert_eq!(listed, vec![serial]);
    broker.assert_no_panic_logged();
}

/// A new default policy version applies to a session that is already connected: the
/// next delivery is checked against it (iot:Receive), with no reconnect.
#[test]
fn policy_change_applies_to_a_live_session_at_its_next_delivery() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin());
    let certs = tempfile::tempdir().unwrap();
    ok(
        broker.admin(
            "POST",
            "/things",
            Some(&json!({"name": "computer-a", "attributes": {"account": "customer-a"}})),
        ),
        201,
    );
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
            "/policies",
            Some(&json!({"name": "backend", "document": BACKEND_POLICY})),
        ),
        201,
    );
    let (_, agent) = provision(&broker, certs.path(), "computer-a", &["agent"]);
    let (_, backend) = provision(&broker, certs.path(), "backend", &["backend"]);
    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tls(&agent),
        &[
            "-V",
            "mqttv5",
            "-i",
            "computer-a",
            "-q",
            "1",
            "-t",
            "customer-a/computer-a/#",
        ],
    ));
    thread_sleep_ms(300);
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/one",
        "before",
        false,
    );
    assert_eq!(expect_mosq_msg(&mut sub, 5 * SEC).3, "before");

    // Version 2 of the shared policy no longer lets agents receive: set as default.
    let no_receive =
        AGENT_POLICY.replace(r#"["iot:Receive", "iot:Publish"]"#, r#"["iot:Publish"]"#);
    assert_ne!(no_receive, AGENT_POLICY);
    ok(
        broker.admin(
            "POST",
            "/policies/agent/versions",
            Some(&json!({"document": no_receive, "set_as_default": true})),
        ),
        201,
    );
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/two",
        "after",
        false,
    );
    // Back to version 1: deliveries resume on the same connection.
    ok(
        broker.admin(
            "PUT",
            "/policies/agent/default-version",
            Some(&json!({"version": 1})),
        ),
        200,
    );
    publish_as_backend(
        &broker,
        &backend,
        "customer-a/computer-a/three",
        "again",
        false,
    );
    assert_eq!(
        expect_mosq_msg(&mut sub, 5 * SEC).3,
        "again",
        "the message published under version 2 must not have been delivered"
    );
    broker.assert_no_panic_logged();
}

fn thread_sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
