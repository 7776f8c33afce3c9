//! SIGTERM stops the broker gracefully: exit status 0, MQTT 5 clients told why with
//! DISCONNECT 0x8B (Server shutting down), MQTT 3.1.1 clients' connections closed.

mod common;

use common::*;

#[test]
fn sigterm_exits_0_and_disconnects_v5_clients_with_server_shutting_down() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    let hold = |protocol: &str| {
        paho(
            "subscribe.py",
            &with(
                &broker.paho_tcp(),
                &["--protocol", protocol, "--filter", "x/#", "--timeout", "25"],
            ),
        )
    };
    let mut v5 = hold("5");
    let mut v311 = hold("3.1.1");
    v5.expect_event("suback", STEP);
    v311.expect_event("suback", STEP);

    let status = broker.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{}",
        broker.log_tail()
    );

    let gone = v5.expect_event("disconnected", STEP);
    assert_eq!(gone.num("reason_code"), 0x8B, "{}", v5.transcript());
    assert_eq!(
        gone.get("from_broker"),
        "1",
        "no DISCONNECT packet was sent\n{}",
        v5.transcript()
    );
    v311.expect_event("disconnected", STEP);
    broker.assert_no_panic_logged();
}

#[test]
fn broker_restarts_after_sigterm_on_the_same_data_dir() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let mut sub = mosquitto_sub(&with(&broker.mosq_tcp(), &["-q", "1", "-t", "again/#"]));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "again/x", "-m", "up"],
    ));
    assert_eq!(expect_mosq_msg(&mut sub, STEP).3, "up");
    assert!(
        broker.log().contains("listening"),
        "no `listening` line in the log"
    );
}
