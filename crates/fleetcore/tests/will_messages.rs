//! Wills: published when a client vanishes without DISCONNECT, discarded when it
//! disconnects cleanly.

mod common;

use common::*;

fn will_client(broker: &TestBroker, protocol: &str, topic: &str, extra: &[&str]) -> LineChild {
    let mut args = vec![
        "--protocol",
        protocol,
        "--will-topic",
        topic,
        "--will-payload",
        "agent-lost",
        "--timeout",
        "25",
    ];
    args.extend_from_slice(extra);
    paho("subscribe.py", &with(&broker.paho_tcp(), &args))
}

fn will_is_published_when_client_dies(protocol: &str) {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = mosquitto_sub(&with(&broker.mosq_tcp(), &["-q", "1", "-t", "lwt/#"]));
    let topic = format!("lwt/{protocol}/agent");
    let mut client = will_client(&broker, protocol, &topic, &[]);
    client.expect_event("connack", STEP);
    client.kill(); // SIGKILL: the socket closes without DISCONNECT
    assert_eq!(
        expect_mosq_msg(&mut watcher, STEP),
        (1, false, topic, "agent-lost".to_string())
    );
}

fn will_is_discarded_on_clean_disconnect(protocol: &str) {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = mosquitto_sub(&with(&broker.mosq_tcp(), &["-q", "1", "-t", "lwt/#"]));
    let topic = format!("lwt/{protocol}/agent");
    will_client(&broker, protocol, &topic, &["--exit-after-subscribe"]).expect_success(STEP);
    // A will would be published when the broker handles the DISCONNECT, before this
    // later publish from another client; so the marker must be the first message.
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "lwt/marker", "-m", "end"],
    ));
    assert_eq!(
        expect_mosq_msg(&mut watcher, STEP),
        (1, false, "lwt/marker".to_string(), "end".to_string()),
        "a will was published after a clean DISCONNECT"
    );
}

#[test]
fn v311_will_is_published_when_client_dies_without_disconnect() {
    will_is_published_when_client_dies("3.1.1");
}

#[test]
fn v5_will_is_published_when_client_dies_without_disconnect() {
    will_is_published_when_client_dies("5");
}

#[test]
fn v311_will_is_not_published_after_clean_disconnect() {
    will_is_discarded_on_clean_disconnect("3.1.1");
}

#[test]
fn v5_will_is_not_published_after_clean_disconnect() {
    will_is_discarded_on_clean_disconnect("5");
}
