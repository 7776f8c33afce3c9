//! A second connection with the same client id takes the session over; the first one is
//! disconnected (MQTT 5: DISCONNECT with reason 0x8E, Session taken over).

mod common;

use common::*;

fn takeover(protocol: &str) -> (LineChild, LineChild, TestBroker) {
    let broker = TestBroker::start(BrokerOpts::new());
    let args = with(
        &broker.paho_tcp(),
        &[
            "--protocol",
            protocol,
            "--client-id",
            "twin",
            "--filter",
            "takeover/#",
            "--timeout",
            "25",
        ],
    );
    let mut first = paho("subscribe.py", &args);
    first.expect_event("suback", STEP);
    let mut second = paho("subscribe.py", &args);
    second.expect_event("suback", STEP);
    (first, second, broker)
}

/// The connection that took over is fully working.
fn assert_second_receives(broker: &TestBroker, second: &mut LineChild) {
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "takeover/x", "-m", "for-second"],
    ));
    let msg = second.expect_event("message", STEP);
    assert_eq!(msg.get("payload"), "for-second");
}

#[test]
fn v5_first_connection_gets_disconnect_session_taken_over() {
    let (mut first, mut second, broker) = takeover("5");
    let gone = first.expect_event("disconnected", STEP);
    assert_eq!(gone.num("reason_code"), 0x8E, "{}", first.transcript());
    assert_eq!(
        gone.get("from_broker"),
        "1",
        "no DISCONNECT packet was sent\n{}",
        first.transcript()
    );
    assert_eq!(first.wait_exit(STEP).code(), Some(2));
    assert_second_receives(&broker, &mut second);
}

#[test]
fn v311_first_connection_is_closed_on_takeover() {
    let (mut first, mut second, broker) = takeover("3.1.1");
    first.expect_event("disconnected", STEP);
    assert_eq!(first.wait_exit(STEP).code(), Some(2));
    assert_second_receives(&broker, &mut second);
}
