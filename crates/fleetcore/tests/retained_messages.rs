//! Retained messages: delivered on subscribe through wildcard filters, replaced by a newer
//! retained publish, deleted by an empty one, and durable across graceful and SIGKILL
//! restarts.

mod common;

use std::collections::BTreeSet;

use common::*;

fn retain(broker: &TestBroker, topic: &str, payload: &str) {
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-r", "-t", topic, "-m", payload],
    ));
}

fn clear_retained(broker: &TestBroker, topic: &str) {
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-r", "-n", "-t", topic],
    ));
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect()
}

/// Publishes the fixture: two retained topics under `acct/` (one since replaced by a newer
/// value), one deleted, one outside the filter.
fn publish_fixture(broker: &TestBroker) {
    retain(broker, "acct/a1/dev1/config", "cfg-1");
    retain(broker, "acct/a2/config", "old");
    retain(broker, "acct/a2/config", "cfg-2");
    retain(broker, "acct/a3/gone", "soon deleted");
    retain(broker, "other/a4/config", "not under acct");
    clear_retained(broker, "acct/a3/gone");
}

fn fixture_expected() -> BTreeSet<(String, String)> {
    set(&[
        ("acct/a1/dev1/config", "cfg-1"),
        ("acct/a2/config", "cfg-2"),
    ])
}

#[test]
fn retained_messages_are_delivered_through_wildcard_filter() {
    let broker = TestBroker::start(BrokerOpts::new());
    publish_fixture(&broker);
    assert_eq!(retained_under(&broker, "acct/+/#"), fixture_expected());
    assert_eq!(
        retained_under(&broker, "acct/a1/+/config"),
        set(&[("acct/a1/dev1/config", "cfg-1")])
    );
    assert_eq!(retained_under(&broker, "nothing/here/#"), set(&[]));
}

#[test]
fn empty_retained_publish_deletes_the_retained_message() {
    let broker = TestBroker::start(BrokerOpts::new());
    publish_fixture(&broker);
    clear_retained(&broker, "acct/a1/dev1/config");
    assert_eq!(
        retained_under(&broker, "acct/+/#"),
        set(&[("acct/a2/config", "cfg-2")])
    );
}

#[test]
fn retained_messages_survive_graceful_restart() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    publish_fixture(&broker);
    let status = broker.terminate();
    assert!(
        status.success(),
        "SIGTERM exit status {status}; log:\n{}",
        broker.log_tail()
    );
    broker.restart();
    assert_eq!(retained_under(&broker, "acct/+/#"), fixture_expected());
}

#[test]
fn retained_messages_survive_sigkill_restart() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    publish_fixture(&broker);
    broker.kill9();
    broker.restart();
    assert_eq!(retained_under(&broker, "acct/+/#"), fixture_expected());
    broker.assert_healthy();
}
