//! Persistent sessions (MQTT 3.1.1 clean_session=false, MQTT 5 clean_start=false with a
//! session expiry) queue QoS 1/2 messages while the client is offline and deliver them,
//! in order, when it comes back.

mod common;

use std::time::Duration;

use common::*;

/// Subscribes a persistent session, disconnects it, publishes `count` messages at `qos`,
/// optionally restarts the broker, reconnects without subscribing again and checks that
/// exactly the queued messages arrive in publish order.
fn offline_messages_arrive_in_order(protocol: &str, qos: u8, count: usize, restart: bool) {
    let mut broker = TestBroker::start(BrokerOpts::new());
    let client_id = format!("ps-{protocol}-q{qos}");
    let q = qos.to_string();
    let session = with(
        &broker.paho_tcp(),
        &[
            "--protocol",
            protocol,
            "--client-id",
            &client_id,
            "--persistent",
            "--session-expiry",
            "300",
        ],
    );
    paho(
        "subscribe.py",
        &with(
            &session,
            &[
                "--filter",
                "fleet/dev-1/#",
                "--qos",
                &q,
                "--exit-after-subscribe",
            ],
        ),
    )
    .expect_success(STEP);

    let n = count.to_string();
    let mut publisher = paho(
        "publish.py",
        &with(
            &broker.paho_tcp(),
            &["--topic", "fleet/dev-1/cmd", "--count", &n, "--qos", &q],
        ),
    );
    publisher.expect_event("done", STEP);
    publisher.expect_success(STEP);

    if restart {
        let status = broker.terminate();
        assert!(status.success(), "SIGTERM exit status {status}");
        broker.restart();
    }

    let mut agent = paho(
        "subscribe.py",
        &with(
            &session,
            &["--no-subscribe", "--count", &n, "--timeout", "20"],
        ),
    );
    let connack = agent.expect_event("connack", STEP);
    assert_eq!(
        connack.get("session_present"),
        "1",
        "session was not resumed"
    );
    agent.expect_success(Duration::from_secs(25));

    let events = agent.events();
    let expected: Vec<String> = (0..count).map(|i| format!("m-{i}")).collect();
    assert_eq!(payloads(&events), expected, "{}", agent.transcript());
    for e in events.iter().filter(|e| e.kind == "message") {
        assert_eq!(e.get("topic"), "fleet/dev-1/cmd");
        assert_eq!(e.num("qos"), u64::from(qos));
    }
}

#[test]
fn v311_persistent_session_gets_qos1_messages_sent_while_offline() {
    offline_messages_arrive_in_order("3.1.1", 1, 50, false);
}

#[test]
fn v311_persistent_session_gets_qos2_messages_sent_while_offline() {
    offline_messages_arrive_in_order("3.1.1", 2, 20, false);
}

#[test]
fn v5_persistent_session_gets_qos1_messages_sent_while_offline() {
    offline_messages_arrive_in_order("5", 1, 50, false);
}

#[test]
fn v5_persistent_session_gets_qos2_messages_sent_while_offline() {
    offline_messages_arrive_in_order("5", 2, 20, false);
}

#[test]
fn offline_queue_survives_graceful_restart() {
    offline_messages_arrive_in_order("3.1.1", 1, 20, true);
}
