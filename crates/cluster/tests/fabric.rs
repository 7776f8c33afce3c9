//! The NATS fabric between two nodes on a real nats-server (the test's own, killed by PID
//! at the end): a publish reaches the other node only where it holds a matching filter,
//! once even when two of its filters match, with its properties; interest that left
//! stops the flow; control events reach the other node and not the sender.

#[path = "support/nats.rs"]
mod support_nats;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetcore_cluster::fabric::NatsFabric;
use fleetcore_cluster::NatsOptions;
use fleetcore_core::fabric::{Control, Fabric, Inbound};
use fleetcore_core::message::Message;
use fleetcore_core::storage::StoredMessage;
use support_nats::Nats;

/// An engine that writes down what other nodes sent it.
#[derive(Default)]
struct Recorder {
    publishes: Mutex<Vec<StoredMessage>>,
    /// Topics of the probes (payload `probe`), kept apart so a late one disturbs nothing.
    probes: Mutex<Vec<String>>,
    control: Mutex<Vec<Control>>,
}

impl Inbound for Recorder {
    fn remote_publish(&self, msg: Message) {
        if &msg.payload[..] == b"probe" {
            self.probes.lock().unwrap().push(msg.topic.to_string());
            return;
        }
        self.publishes.lock().unwrap().push(msg.to_stored());
    }

    fn remote_control(&self, ev: Control) {
        self.control.lock().unwrap().push(ev);
    }
}

impl Recorder {
    fn topics(&self) -> Vec<String> {
        let got = self.publishes.lock().unwrap();
        got.iter().map(|m| m.topic.clone()).collect()
    }
}

struct Node {
    fabric: NatsFabric,
    seen: Arc<Recorder>,
}

async fn node(nats: &Nats) -> Node {
    let opts = NatsOptions {
        prefix: "fab".into(),
        ..NatsOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let fabric = loop {
        match NatsFabric::connect(&[nats.url()], &opts).await {
            Ok(f) => break f,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("NATS: {e}\n{}", nats.log()),
        }
    };
    let seen = Arc::new(Recorder::default());
    let inbound: Arc<dyn Inbound> = seen.clone();
    fabric.attach(Arc::downgrade(&inbound) as Weak<dyn Inbound>);
    Node { fabric, seen }
}

fn msg(topic: &str, payload: &str) -> Message {
    Message::from_stored(&StoredMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos: 1,
        retain: false,
        expires_at_ms: None,
        payload_format_utf8: Some(true),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(vec![1, 2, 3]),
        user_properties: vec![("k".into(), "v".into())],
    })
    .expect("a valid topic")
}

/// Forwards `probe` from `from` every 50 ms until `to` has it: then every subscription
/// `to` asked for before the probe's is in place on the server.
async fn until_seen(from: &Node, to: &Node, probe: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !to.seen.probes.lock().unwrap().iter().any(|t| t == probe) {
        assert!(
            Instant::now() < deadline,
            "interest on {probe} never reached the other node"
        );
        from.fabric.forward(&msg(probe, "probe"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} did not happen in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn publishes_reach_the_node_with_interest_once_with_their_properties() {
    let nats = Nats::start();
    let a = node(&nats).await;
    let b = node(&nats).await;
    // Two filters on b that both match fleet/d1/cmd; and one for the probe.
    b.fabric.interest("fleet/#", None, true);
    b.fabric.interest("fleet/+/cmd", None, true);
    b.fabric.interest("probe/b", None, true);
    until_seen(&a, &b, "probe/b").await;

    for (topic, body) in [
        ("fleet", "parent of #"),
        ("fleet/d1/cmd", "both filters"),
        ("fleet/a.b c/cmd", "escaped level"),
        ("elsewhere/x", "no interest"),
        ("fleet//cmd", "empty level"),
    ] {
        a.fabric.forward(&msg(topic, body));
    }
    a.fabric.forward(&msg("probe/b", "end"));
    let got = until("the end marker", || {
        let got = b.seen.publishes.lock().unwrap().clone();
        got.iter().any(|m| m.payload == b"end").then_some(got)
    })
    .await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "fleet",
            "fleet/d1/cmd",
            "fleet/a.b c/cmd",
            "fleet//cmd",
            "probe/b"
        ],
        "each once, in order, nothing without interest"
    );
    let m = &got[1];
    assert_eq!(m.payload, b"both filters");
    assert_eq!(m.qos, 1);
    assert_eq!(m.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.response_topic.as_deref(), Some("reply/here"));
    assert_eq!(m.correlation_data.as_deref(), Some(&[1u8, 2, 3][..]));
    assert_eq!(m.user_properties, [("k".to_string(), "v".to_string())]);
    assert!(
        a.seen.topics().is_empty(),
        "a node hears none of its own publishes: {:?}",
        a.seen.topics()
    );
    drop(nats);
}

#[tokio::test]
async fn interest_that_left_stops_the_flow_and_counts_per_filter() {
    let nats = Nats::start();
    let a = node(&nats).await;
    let b = node(&nats).await;
    // Two sessions on b hold the same filter: the subject stays until both left.
    b.fabric.interest("cmd/+", None, true);
    b.fabric.interest("cmd/+", None, true);
    b.fabric.interest("probe/1", None, true);
    until_seen(&a, &b, "probe/1").await;

    b.fabric.interest("cmd/+", None, false);
    b.fabric.interest("probe/2", None, true);
    until_seen(&a, &b, "probe/2").await;
    a.fabric.forward(&msg("cmd/x", "still wanted"));
    a.fabric.forward(&msg("probe/2", "end"));
    until("the first end marker", || {
        b.seen
            .topics()
            .contains(&"probe/2".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(b.seen.topics(), ["cmd/x", "probe/2"]);
    b.seen.publishes.lock().unwrap().clear();

    b.fabric.interest("cmd/+", None, false);
    b.fabric.interest("probe/3", None, true);
    until_seen(&a, &b, "probe/3").await;
    a.fabric.forward(&msg("cmd/x", "nobody wants this"));
    a.fabric.forward(&msg("probe/3", "end"));
    until("the second end marker", || {
        b.seen
            .topics()
            .contains(&"probe/3".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(
        b.seen.topics(),
        ["probe/3"],
        "cmd/x after its last filter left"
    );
    drop(nats);
}

#[tokio::test]
async fn control_events_reach_the_other_nodes_and_not_the_sender() {
    let nats = Nats::start();
    let a = node(&nats).await;
    let b = node(&nats).await;
    let c = node(&nats).await;
    // The control subscription is made at connect; give the server a moment by probing.
    b.fabric.interest("probe/c", None, true);
    until_seen(&a, &b, "probe/c").await;
    a.fabric.broadcast(&Control::KickCertificate {
        cert_id: "abc123".into(),
    });
    a.fabric.broadcast(&Control::TrustChanged);
    for n in [&b, &c] {
        let got = until("both control events", || {
            let got = n.seen.control.lock().unwrap().clone();
            (got.len() >= 2).then_some(got)
        })
        .await;
        assert_eq!(
            got,
            [
                Control::KickCertificate {
                    cert_id: "abc123".into()
                },
                Control::TrustChanged
            ]
        );
    }
    assert!(a.seen.control.lock().unwrap().is_empty());
    drop(nats);
}
