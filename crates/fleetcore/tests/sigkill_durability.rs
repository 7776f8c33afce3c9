//! The durability promise: a QoS 1 publish is acknowledged only once its copies for
//! offline persistent sessions and its retained copy are on disk, so killing the broker
//! with SIGKILL in the middle of a stream loses nothing that was acknowledged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;

const MESSAGES: usize = 200;
/// Acknowledgements to see before the kill: about half the stream.
const KILL_AFTER_ACKS: usize = 100;

#[path = "../../cluster/tests/support/nats.rs"]
mod nats;

#[test]
fn acknowledged_messages_survive_sigkill_mid_stream() {
    let broker = TestBroker::start(BrokerOpts::new());
    kill9_mid_stream(broker, |broker| broker.restart());
}

/// The same with the broker's state on NATS JetStream (`[cluster]`): fleetcore is killed
/// mid-stream, then nats-server too (kill -9 of both, as a power loss of a one-node
/// site), and both come back on their data. No redb file is ever made.
#[test]
fn acknowledged_messages_survive_sigkill_mid_stream_on_nats_jetstream() {
    let mut nats = nats::Nats::start();
    let cluster = format!(
        "[cluster]\nnats_urls = [\"{}\"]\nprefix = \"e2e\"\nnode_name = \"node-a\"\nrequest_timeout_ms = 3000\n",
        nats.url()
    );
    let broker = TestBroker::start(BrokerOpts::new().raw(&cluster));
    kill9_mid_stream(broker, |broker| {
        nats.kill();
        nats.spawn();
        broker.restart();
        let redb = broker.data_dir().join("fleetcore.redb");
        assert!(!redb.exists(), "{} made in cluster mode", redb.display());
        assert!(
            broker.log().contains("nats JetStream at"),
            "the broker did not say where its state is:\n{}",
            broker.log_tail()
        );
    });
    drop(nats);
}

/// Streams QoS 1 publishes (every 10th retained) to an offline persistent session,
/// kills the broker with SIGKILL after about half were acknowledged, calls `restart`,
/// then checks that every acknowledged message is delivered and every acknowledged
/// retained message is still retained.
fn kill9_mid_stream(mut broker: TestBroker, restart: impl FnOnce(&mut TestBroker)) {
    // An agent with a persistent session (3.1.1, so the broker's default expiry applies),
    // subscribed to its account's subtree, then offline.
    let session = with(
        &broker.paho_tcp(),
        &[
            "--protocol",
            "3.1.1",
            "--client-id",
            "agent-dur",
            "--persistent",
        ],
    );
    paho(
        "subscribe.py",
        &with(
            &session,
            &[
                "--filter",
                "acct/dev/#",
                "--qos",
                "1",
                "--exit-after-subscribe",
            ],
        ),
    )
    .expect_success(STEP);

    // A backend publishes a paced stream; every 10th message is retained on its own topic.
    let n = MESSAGES.to_string();
    let mut backend = paho(
        "publish.py",
        &with(
            &broker.paho_tcp(),
            &[
                "--protocol",
                "3.1.1",
                "--qos",
                "1",
                "--count",
                &n,
                "--interval-ms",
                "5",
                "--topic",
                "acct/dev/stream",
                "--retain-every",
                "10",
                "--retained-topic",
                "acct/dev/retained/{i}",
                "--timeout",
                "25",
            ],
        ),
    );

    // seq -> retained topic (None for stream messages), for every PUBACK seen.
    let mut acked: BTreeMap<u64, Option<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < KILL_AFTER_ACKS {
        match backend.next_line(deadline) {
            Some(line) => record_ack(&line, &mut acked),
            None => panic!(
                "only {} acknowledgements before the deadline\n{}",
                acked.len(),
                backend.transcript()
            ),
        }
    }
    broker.kill9();
    let acked_at_kill = acked.len();
    // Acknowledgements already on their way when the broker died count too.
    for line in backend.drain(STEP) {
        record_ack(&line, &mut acked);
    }
    backend.kill();
    eprintln!(
        "{acked_at_kill} acks seen at SIGKILL, {} in all, of {MESSAGES}",
        acked.len()
    );

    restart(&mut broker);

    // Every acknowledged message reaches the agent (QoS 1: duplicates are allowed).
    let mut agent = paho(
        "subscribe.py",
        &with(&session, &["--no-subscribe", "--timeout", "20"]),
    );
    let connack = agent.expect_event("connack", STEP);
    assert_eq!(
        connack.get("session_present"),
        "1",
        "persistent session lost across SIGKILL"
    );
    let mut missing: BTreeSet<String> = acked.keys().map(|seq| format!("m-{seq}")).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !missing.is_empty() {
        let Some(line) = agent.next_line(deadline) else {
            panic!(
                "{} acknowledged messages never arrived after restart: {:?}\n{}",
                missing.len(),
                missing,
                agent.transcript()
            );
        };
        if let Some(e) = Event::parse(&line).filter(|e| e.kind == "message") {
            missing.remove(e.get("payload"));
        }
    }

    // Every acknowledged retained message is still retained, with its payload.
    let mut expected: BTreeSet<(String, String)> = acked
        .iter()
        .filter_map(|(seq, topic)| topic.clone().map(|t| (t, format!("m-{seq}"))))
        .collect();
    assert!(
        !expected.is_empty(),
        "no retained message was acknowledged before the kill"
    );
    let mut reader = paho(
        "subscribe.py",
        &with(
            &broker.paho_tcp(),
            &[
                "--filter",
                "acct/dev/retained/#",
                "--qos",
                "1",
                "--timeout",
                "20",
            ],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !expected.is_empty() {
        let Some(line) = reader.next_line(deadline) else {
            panic!(
                "acknowledged retained messages missing after restart: {expected:?}\n{}",
                reader.transcript()
            );
        };
        if let Some(e) = Event::parse(&line).filter(|e| e.kind == "message") {
            assert_eq!(
                e.get("retain"),
                "1",
                "retained copy delivered without retain flag: {e:?}"
            );
            expected.remove(&(e.get("topic").to_string(), e.get("payload").to_string()));
        }
    }
    broker.assert_healthy();
}

fn record_ack(line: &str, acked: &mut BTreeMap<u64, Option<String>>) {
    if let Some(e) = Event::parse(line).filter(|e| e.kind == "ack") {
        let topic = (e.get("retain") == "1").then(|| e.get("topic").to_string());
        acked.insert(e.num("seq"), topic);
    }
}
