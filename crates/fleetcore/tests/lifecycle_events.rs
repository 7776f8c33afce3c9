//! Lifecycle events, as IoT Core publishes them: presence (connected/disconnected with
//! the cause) and subscription events on `$aws/events/...`, with IoT Core's JSON, made by
//! the `events` service from the engine's events; `[events] enabled = false` turns them off.

mod common;

use common::*;
use serde_json::Value;

/// Waits for the next event on `watcher`; its topic and parsed body.
fn next_event(watcher: &mut LineChild) -> (String, Value) {
    let (qos, retain, topic, payload) = expect_mosq_msg(watcher, STEP);
    assert_eq!((qos, retain), (1, false), "{topic}");
    let body: Value = serde_json::from_str(&payload)
        .unwrap_or_else(|e| panic!("event on {topic} is not JSON ({e}): {payload}"));
    (topic, body)
}

fn events_watcher(broker: &TestBroker) -> LineChild {
    mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "$aws/events/#", "-i", "backend-watcher"],
    ))
}

#[test]
fn connect_subscribe_and_disconnect_are_published_as_iot_core_events() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = events_watcher(&broker);
    // The watcher's own subscription is the first event.
    let (topic, body) = next_event(&mut watcher);
    assert_eq!(
        topic,
        "$aws/events/subscriptions/subscribed/backend-watcher"
    );
    assert_eq!(body["topics"], serde_json::json!(["$aws/events/#"]));

    let before = now_ms();
    paho(
        "subscribe.py",
        &with(
            &broker.paho_tcp(),
            &[
                "--protocol",
                "5",
                "--client-id",
                "agent-1",
                "--filter",
                "acct/agent-1/#",
                "--exit-after-subscribe",
            ],
        ),
    )
    .expect_success(STEP);

    let (topic, connected) = next_event(&mut watcher);
    assert_eq!(topic, "$aws/events/presence/connected/agent-1");
    assert_eq!(connected["clientId"], "agent-1");
    assert_eq!(connected["eventType"], "connected");
    assert_eq!(connected["ipAddress"], "127.0.0.1");
    let ts = connected["timestamp"].as_u64().expect("timestamp in ms");
    assert!(
        ts >= before && ts < before + 60_000,
        "timestamp {ts} is not epoch ms"
    );
    let session = connected["sessionIdentifier"].as_str().unwrap().to_string();
    assert_eq!(session.len(), 32);

    let (topic, subscribed) = next_event(&mut watcher);
    assert_eq!(topic, "$aws/events/subscriptions/subscribed/agent-1");
    assert_eq!(subscribed["topics"], serde_json::json!(["acct/agent-1/#"]));
    assert_eq!(subscribed["sessionIdentifier"], session);

    let (topic, disconnected) = next_event(&mut watcher);
    assert_eq!(topic, "$aws/events/presence/disconnected/agent-1");
    assert_eq!(
        disconnected["disconnectReason"],
        "CLIENT_INITIATED_DISCONNECT"
    );
    assert_eq!(disconnected["clientInitiatedDisconnect"], true);
    assert_eq!(disconnected["versionNumber"], connected["versionNumber"]);
    assert_eq!(disconnected["sessionIdentifier"], session);
    assert!(disconnected.get("ipAddress").is_none());
    watcher.kill();
}

#[test]
fn a_client_that_vanishes_is_reported_as_connection_lost_and_a_takeover_as_duplicate() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = events_watcher(&broker);
    next_event(&mut watcher); // the watcher's own subscription
    let agent = |extra: &[&str]| {
        let mut args = vec![
            "--protocol",
            "3.1.1",
            "--client-id",
            "agent-2",
            "--filter",
            "a/#",
            "--timeout",
            "25",
        ];
        args.extend_from_slice(extra);
        paho("subscribe.py", &with(&broker.paho_tcp(), &args))
    };
    let mut first = agent(&[]);
    first.expect_event("connack", STEP);
    assert_eq!(next_event(&mut watcher).1["eventType"], "connected");
    assert_eq!(next_event(&mut watcher).1["eventType"], "subscribed");
    first.kill(); // SIGKILL: the socket closes without DISCONNECT
    let (topic, lost) = next_event(&mut watcher);
    assert_eq!(topic, "$aws/events/presence/disconnected/agent-2");
    assert_eq!(lost["disconnectReason"], "CONNECTION_LOST");
    assert_eq!(lost["clientInitiatedDisconnect"], false);

    let mut second = agent(&[]);
    second.expect_event("connack", STEP);
    let (_, c2) = next_event(&mut watcher);
    assert_eq!(c2["eventType"], "connected");
    assert!(c2["versionNumber"].as_u64() > lost["versionNumber"].as_u64());
    next_event(&mut watcher); // subscribed
    let mut third = agent(&[]);
    third.expect_event("connack", STEP);
    // The old connection is taken over: its disconnect says so (it may come before or
    // after the new connection's connected event).
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_event(&mut watcher));
    }
    let takeover = seen
        .iter()
        .find(|(t, _)| t.starts_with("$aws/events/presence/disconnected/"))
        .unwrap_or_else(|| panic!("no disconnected event in {seen:?}"));
    assert_eq!(takeover.1["disconnectReason"], "DUPLICATE_CLIENTID");
    assert_eq!(takeover.1["versionNumber"], c2["versionNumber"]);
    second.kill();
    third.kill();
    watcher.kill();
}

#[test]
fn events_can_be_turned_off() {
    let broker = TestBroker::start(BrokerOpts::new().raw("[events]\nenabled = false"));
    let mut watcher = mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", "$aws/events/#", "-t", "marker"],
    ));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-i", "agent-3", "-t", "marker", "-m", "end"],
    ));
    // With events on, agent-3's connected event would come before its publish.
    assert_eq!(
        expect_mosq_msg(&mut watcher, STEP),
        (1, false, "marker".to_string(), "end".to_string())
    );
    watcher.kill();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
