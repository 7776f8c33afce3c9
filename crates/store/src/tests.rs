use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

use redb::backends::FileBackend;
use redb::{Builder, StorageBackend};

use super::*;

fn msg(topic: &str, payload: &[u8]) -> StoredMessage {
    StoredMessage {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: 1,
        retain: true,
        expires_at_ms: Some(1_900_000_000_000),
        payload_format_utf8: Some(true),
        content_type: Some("application/json".into()),
        response_topic: None,
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

/// A queued delivery whose body id is `n` (the same `n` is the same message).
fn queued(topic: &str, n: u8) -> StoredQueued {
    StoredQueued {
        body: u64::from(n),
        msg: std::sync::Arc::new(msg(topic, &[n])),
        qos: 1,
        retain: false,
        subscription_ids: vec![7],
    }
}

fn put_queued(client_id: &str, seq: u64) -> Op {
    Op::PutQueued {
        client_id: client_id.into(),
        seq,
        item: queued("t", seq as u8),
    }
}

fn open(path: &Path) -> (Store, Loaded) {
    match Store::open(path, StoreOptions::default()) {
        Ok(v) => v,
        Err(e) => panic!("open failed: {e}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn session_of<'a>(loaded: &'a Loaded, client_id: &str) -> Option<&'a LoadedSession> {
    loaded.sessions.iter().find(|s| s.client_id == client_id)
}

#[test]
fn data_survives_reopen_and_deletes_remove_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/fleetcore.redb");
    let rt = runtime();
    {
        let (store, loaded) = open(&path);
        assert!(loaded.retained.is_empty() && loaded.sessions.is_empty());
        rt.block_on(store.submit(vec![
            Op::PutRetained {
                topic: "a/config".into(),
                retained: retained("a/config", b"one"),
            },
            Op::PutRetained {
                topic: "b/config".into(),
                retained: retained("b/config", b"two"),
            },
            Op::PutSession {
                client_id: "computer-a".into(),
                session: session("customer-b/computer-a/#"),
            },
            Op::PutSession {
                client_id: "computer-b".into(),
                session: session("$share/g/x/#"),
            },
            put_queued("computer-a", 2),
            put_queued("computer-a", 1),
            put_queued("computer-a", 10),
            put_queued("computer-b", 1),
            put_queued("computer-b", 2),
        ]))
        .unwrap();
    }
    let (store, loaded) = open(&path);
    let mut topics: Vec<_> = loaded
        .retained
        .iter()
        .map(|r| r.msg.topic.as_str())
        .collect();
    topics.sort();
    assert_eq!(topics, ["a/config", "b/config"]);
    assert_eq!(
        loaded.retained.iter().find(|r| r.msg.topic == "a/config"),
        Some(&retained("a/config", b"one"))
    );
    let a = session_of(&loaded, "computer-a").unwrap();
    assert_eq!(a.session, session("customer-b/computer-a/#"));
    let seqs: Vec<u64> = a.queue.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [1, 2, 10]);
    assert_eq!(a.queue[0].1, queued("t", 1));
    assert_eq!(session_of(&loaded, "computer-b").unwrap().queue.len(), 2);

    rt.block_on(store.submit(vec![
        Op::DeleteRetained {
            topic: "a/config".into(),
        },
        Op::DeleteSession {
            client_id: "computer-a".into(),
        },
        Op::DeleteQueued {
            client_id: "computer-b".into(),
            seq: 1,
        },
    ]))
    .unwrap();
    drop(store);

    let (store, loaded) = open(&path);
    let topics: Vec<_> = loaded
        .retained
        .iter()
        .map(|r| r.msg.topic.as_str())
        .collect();
    assert_eq!(topics, ["b/config"]);
    assert!(session_of(&loaded, "computer-a").is_none());
    let b = session_of(&loaded, "computer-b").unwrap();
    assert_eq!(b.queue.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
    drop(store);
    // DeleteSession removed the queue itself, not just the session it hangs from.
    let db = Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let queue = txn.open_table(QUEUE).unwrap();
    let left: Vec<(String, u64)> = queue
        .iter()
        .unwrap()
        .map(|e| {
            let (k, _) = e.unwrap();
            let (c, s) = k.value();
            (c.to_owned(), s)
        })
        .collect();
    assert_eq!(left, [("computer-b".to_owned(), 2)]);
}

#[test]
fn concurrent_submits_share_commits() {
    const SUBMITS: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rt = runtime();
    let (store, _) = open(&path);
    rt.block_on(store.submit(vec![Op::PutSession {
        client_id: "c".into(),
        session: session("#"),
    }]))
    .unwrap();
    let before = store.commit_count();
    rt.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(SUBMITS as usize));
        let tasks: Vec<_> = (0..SUBMITS)
            .map(|i| {
                let store = store.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.submit(vec![put_queued("c", i)]).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    });
    let commits = store.commit_count() - before;
    assert!(
        commits * 10 <= SUBMITS,
        "{commits} commits for {SUBMITS} submits: not grouped"
    );
    drop(store);
    let (_, loaded) = open(&path);
    assert_eq!(
        session_of(&loaded, "c").unwrap().queue.len() as u64,
        SUBMITS
    );
}

#[test]
fn batches_respect_max_batch_ops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let (store, _) = Store::open(&path, StoreOptions { max_batch_ops: 8 }).unwrap();
    store.submit_nowait(vec![Op::PutSession {
        client_id: "c".into(),
        session: session("#"),
    }]);
    for seq in 0..64 {
        store.submit_nowait(vec![put_queued("c", seq)]);
    }
    store.flush_blocking().unwrap();
    // 65 single-op requests, at most 8 a transaction.
    assert!(store.commit_count() >= 9, "{}", store.commit_count());
    drop(store);
    let (_, loaded) = open(&path);
    assert_eq!(session_of(&loaded, "c").unwrap().queue.len(), 64);
}

#[test]
fn other_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    drop(open(&path));
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_KEY, 4u64)
            .unwrap();
        txn.commit().unwrap();
    }
    let err =
        Store::open(&path, StoreOptions::default()).expect_err("a version 4 file must be refused");
    assert!(
        matches!(
            err,
            StoreError::SchemaVersion {
                found: 4,
                expected: 3,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("schema version 4") && text.contains("reads version 3"));
}

/// The message of [`V1_RETAINED`].
fn v1_message() -> StoredMessage {
    StoredMessage {
        topic: "acct/dev1/config".into(),
        payload: br#"{"poll":60}"#.to_vec(),
        qos: 1,
        retain: true,
        expires_at_ms: None,
        payload_format_utf8: Some(true),
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("deviceName".into(), "alpha".into())],
    }
}

/// A `retained` record exactly as schema 1 wrote it (postcard of a bare StoredMessage),
/// byte for byte, so the migration is tested against the old layout and not against
/// whatever the code encodes today.
const V1_RETAINED: &[u8] = &[
    16, b'a', b'c', b'c', b't', b'/', b'd', b'e', b'v', b'1', b'/', b'c', b'o', b'n', b'f', b'i',
    b'g', // topic
    11, b'{', b'"', b'p', b'o', b'l', b'l', b'"', b':', b'6', b'0', b'}', // payload
    1,    // qos
    1,    // retain
    0,    // expires_at_ms: None
    1, 1, // payload_format_utf8: Some(true)
    0, 0, 0, // content_type, response_topic, correlation_data: None
    1, 10, b'd', b'e', b'v', b'i', b'c', b'e', b'N', b'a', b'm', b'e', 5, b'a', b'l', b'p', b'h',
    b'a', // user_properties
];

fn encoded<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap()
}

/// StoredMessage is also the message inside queued deliveries; a change to its layout
/// needs a schema version and a migration of its own. This pins it.
#[test]
fn stored_message_layout_is_still_schema_1() {
    assert_eq!(postcard::to_allocvec(&v1_message()).unwrap(), V1_RETAINED);
}

#[test]
fn a_schema_1_file_is_migrated_once_keeping_sessions_queues_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        // The file as a schema 1 fleetcore left it.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, 1u64)
                .unwrap();
            let mut retained = txn.open_table(RETAINED).unwrap();
            retained.insert("acct/dev1/config", V1_RETAINED).unwrap();
            retained.insert("unreadable", &[0xff_u8; 12][..]).unwrap();
            txn.open_table(SESSIONS)
                .unwrap()
                .insert("computer-a", encoded(&session("#")).as_slice())
                .unwrap();
            txn.open_table(QUEUE)
                .unwrap()
                .insert(
                    ("computer-a", 1u64),
                    encoded(&v2_row(&queued("t", 1))).as_slice(),
                )
                .unwrap();
            txn.open_table(REGISTRY)
                .unwrap()
                .insert(("thing", "computer-a"), &b"opaque"[..])
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let before = fleetcore_core::time::now_ms();
    let (store, loaded) = open(&path);
    let after = fleetcore_core::time::now_ms();
    assert_eq!(loaded.retained.len(), 1, "{:?}", loaded.retained);
    let migrated = loaded.retained[0].clone();
    assert_eq!(migrated.msg, v1_message());
    assert!(
        (before..=after).contains(&migrated.stored_at_ms),
        "stamped with the migration time: {} not in {before}..={after}",
        migrated.stored_at_ms
    );
    let a = session_of(&loaded, "computer-a").unwrap();
    assert_eq!(a.session, session("#"));
    assert_eq!(a.queue, vec![(1, queued("t", 1))]);
    // Written before revisions were kept: revision 0.
    assert_eq!(
        loaded.records,
        [("thing".into(), "computer-a".into(), b"opaque".to_vec(), 0)]
    );
    // New records are written in the new layout next to the migrated one.
    runtime()
        .block_on(store.submit(vec![Op::PutRetained {
            topic: "b/config".into(),
            retained: retained("b/config", b"two"),
        }]))
        .unwrap();
    drop(store);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(
            meta.get(SCHEMA_KEY).unwrap().unwrap().value(),
            SCHEMA_VERSION
        );
        // The unreadable record was left alone, not deleted.
        let raw = txn.open_table(RETAINED).unwrap();
        assert_eq!(
            raw.get("unreadable").unwrap().unwrap().value(),
            [0xff_u8; 12]
        );
    }
    // Opening again does not migrate again: the time stays the one stamped the first time.
    let (_store, again) = open(&path);
    let mut got: Vec<_> = again
        .retained
        .iter()
        .map(|r| (r.msg.topic.clone(), r.stored_at_ms))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("acct/dev1/config".to_string(), migrated.stored_at_ms),
            ("b/config".to_string(), 1_750_000_000_123)
        ]
    );
}

#[test]
fn corrupt_record_is_skipped_and_the_rest_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let rt = runtime();
    {
        let (store, _) = open(&path);
        rt.block_on(store.submit(vec![
            Op::PutRetained {
                topic: "good".into(),
                retained: retained("good", b"x"),
            },
            Op::PutSession {
                client_id: "ok".into(),
                session: session("#"),
            },
            Op::PutSession {
                client_id: "bad".into(),
                session: session("#"),
            },
            put_queued("ok", 1),
            put_queued("ok", 2),
            put_queued("bad", 1),
            // Queued for a session that is not there.
            put_queued("gone", 1),
        ]))
        .unwrap();
    }
    {
        let garbage: &[u8] = &[0xff; 12];
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(RETAINED)
                .unwrap()
                .insert("bad", garbage)
                .unwrap();
            txn.open_table(SESSIONS)
                .unwrap()
                .insert("bad", garbage)
                .unwrap();
            txn.open_table(QUEUE)
                .unwrap()
                .insert(("ok", 2u64), garbage)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let (_store, loaded) = open(&path);
    let topics: Vec<_> = loaded
        .retained
        .iter()
        .map(|r| r.msg.topic.as_str())
        .collect();
    assert_eq!(topics, ["good"]);
    assert_eq!(loaded.sessions.len(), 1);
    let ok = session_of(&loaded, "ok").unwrap();
    assert_eq!(ok.queue, vec![(1, queued("t", 1))]);
    // What is on disk but not loaded is named, so the broker can delete it.
    assert_eq!(loaded.unloaded_sessions, ["bad", "gone"]);
}

#[test]
fn commit_and_flush_report_closed_store() {
    let rt = runtime();
    let (tx, rx) = oneshot::channel::<Result<(), StoreError>>();
    drop(tx);
    let commit = Commit::waiting(rx);
    assert!(matches!(rt.block_on(commit), Err(StoreError::Closed)));
    assert!(rt.block_on(Commit::<()>::ready()).is_ok());
}

/// Wraps the file so a test can make writes fail as a full disk does.
#[derive(Debug)]
struct FlakyBackend {
    file: FileBackend,
    full: Arc<AtomicBool>,
}

impl FlakyBackend {
    fn check(&self) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FlakyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
}

#[test]
fn writer_survives_a_failed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let full = Arc::new(AtomicBool::new(false));
    let opener: Opener = {
        let (path, full) = (path.clone(), full.clone());
        Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            Builder::new().create_with_backend(FlakyBackend {
                file: FileBackend::new(file)?,
                full: full.clone(),
            })
        })
    };
    let rt = runtime();
    let (store, _) = Store::open_with(&path, StoreOptions::default(), opener).unwrap();
    let put = |topic: &str| {
        store.submit(vec![Op::PutRetained {
            topic: topic.into(),
            retained: retained(topic, b"x"),
        }])
    };
    rt.block_on(put("before")).unwrap();

    full.store(true, Ordering::SeqCst);
    let err = rt.block_on(put("lost")).unwrap_err();
    assert!(matches!(err, StoreError::DiskFull(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the disk holding the store is full (No space left on device (os error 28)); \
         nothing of this change was written"
    );
    full.store(false, Ordering::SeqCst);

    assert!(
        rt.block_on(store.flush()).is_err(),
        "flush reports the lost batch"
    );
    rt.block_on(store.flush()).unwrap();
    rt.block_on(put("after")).unwrap();
    assert_eq!(store.commit_count(), 2);
    drop(store);

    let (_, loaded) = open(&path);
    let mut topics: Vec<_> = loaded
        .retained
        .iter()
        .map(|r| r.msg.topic.as_str())
        .collect();
    topics.sort();
    assert_eq!(topics, ["after", "before"]);
}

const CHILD_ENV: &str = "FLEETCORE_STORE_TEST_CHILD_PATH";
const COMMITTED_SESSIONS: u64 = 50;

/// Child half of `committed_ops_survive_sigkill`: commits, says so, then keeps writing
/// until the parent kills it, so the kill lands in the middle of later transactions.
fn sigkill_child(path: &Path) {
    let rt = runtime();
    let (store, _) = open(path);
    rt.block_on(async {
        let commits: Vec<_> = (0..COMMITTED_SESSIONS)
            .map(|i| {
                store.submit(vec![
                    Op::PutSession {
                        client_id: format!("client-{i}"),
                        session: session("#"),
                    },
                    put_queued(&format!("client-{i}"), 1),
                ])
            })
            .collect();
        for commit in commits {
            commit.await.unwrap();
        }
    });
    println!("COMMITTED");
    // Bounded, in case the parent dies before it kills this process.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for seq in 2.. {
        if std::time::Instant::now() > deadline {
            break;
        }
        store.submit_nowait(vec![put_queued("client-0", seq)]);
        if seq % 64 == 0 {
            store.flush_blocking().unwrap();
        }
    }
}

#[test]
fn committed_ops_survive_sigkill() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        sigkill_child(Path::new(&path));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::committed_ops_survive_sigkill",
            "--nocapture",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let committed = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.trim() == "COMMITTED");
    // Let it write some more, so the kill interrupts a transaction.
    std::thread::sleep(std::time::Duration::from_millis(50));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(committed, "child exited before committing");

    let (_store, loaded) = open(&path);
    assert_eq!(loaded.sessions.len() as u64, COMMITTED_SESSIONS);
    for i in 0..COMMITTED_SESSIONS {
        let s = session_of(&loaded, &format!("client-{i}")).unwrap();
        assert_eq!(s.session, session("#"));
        assert_eq!(s.queue.first(), Some(&(1, queued("t", 1))));
    }
}

#[tokio::test]
async fn registry_records_survive_reopen_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let (store, _) = open(&path);
        store
            .submit(vec![
                Op::PutRecord {
                    kind: "thing",
                    key: "computer-a".into(),
                    value: b"a".to_vec(),
                },
                Op::PutRecord {
                    kind: "thing",
                    key: "computer-b".into(),
                    value: b"b".to_vec(),
                },
                Op::PutRecord {
                    kind: "policy",
                    key: "agent".into(),
                    value: b"p".to_vec(),
                },
            ])
            .await
            .unwrap();
        store
            .submit(vec![Op::DeleteRecord {
                kind: "thing",
                key: "computer-b".into(),
            }])
            .await
            .unwrap();
    }
    let (_store, loaded) = open(&path);
    assert_eq!(
        loaded.records,
        vec![
            // Each write took the next revision: a, b, agent, then b's delete.
            ("policy".to_string(), "agent".to_string(), b"p".to_vec(), 3),
            (
                "thing".to_string(),
                "computer-a".to_string(),
                b"a".to_vec(),
                1
            ),
        ]
    );
}

/// The file holds token-signing keys: a new one is owner-only, whatever the umask
/// (under the usual 022 redb alone makes it 0644); reopening works and keeps the mode.
#[test]
fn a_new_store_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/fleetcore.redb");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let (store, _) = open(&path);
    assert_eq!(mode(&path), 0o600);
    drop(store);
    let (store, _) = open(&path);
    assert_eq!(mode(&path), 0o600);
    drop(store);
}

/// A queue row as schemas 1 and 2 wrote it: the message inline.
fn v2_row(q: &StoredQueued) -> crate::QueueRowV2 {
    crate::QueueRowV2 {
        msg: (*q.msg).clone(),
        qos: q.qos,
        retain: q.retain,
        subscription_ids: q.subscription_ids.clone(),
    }
}

fn body_ids(path: &std::path::Path) -> Vec<u64> {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(crate::BODIES).unwrap();
    t.iter().unwrap().map(|e| e.unwrap().0.value()).collect()
}

#[tokio::test]
async fn one_body_serves_every_queued_copy_and_goes_with_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let (store, _) = open(&path);
        let big = StoredQueued {
            body: store.next_body_id(),
            msg: std::sync::Arc::new(msg("orders", &[7u8; 65536])),
            qos: 1,
            retain: false,
            subscription_ids: vec![],
        };
        // One submit per session, as the broker does: separate transactions or not,
        // the body is written once.
        for c in ["a", "b", "c"] {
            store
                .submit(vec![
                    Op::PutSession {
                        client_id: c.into(),
                        session: session("#"),
                    },
                    Op::PutQueued {
                        client_id: c.into(),
                        seq: 1,
                        item: big.clone(),
                    },
                ])
                .await
                .unwrap();
        }
        store
            .submit(vec![Op::DeleteQueued {
                client_id: "a".into(),
                seq: 1,
            }])
            .await
            .unwrap();
    }
    assert_eq!(body_ids(&path).len(), 1, "one body for three copies");
    {
        let (store, loaded) = open(&path);
        let queues: Vec<_> = loaded.sessions.iter().map(|s| s.queue.len()).collect();
        assert_eq!(queues, vec![0, 1, 1]);
        let b = &loaded.sessions[1].queue[0].1;
        let c = &loaded.sessions[2].queue[0].1;
        assert!(
            std::sync::Arc::ptr_eq(&b.msg, &c.msg),
            "loaded once, shared"
        );
        assert_eq!(b.msg.payload.len(), 65536);
        // A new id is above every id on disk.
        assert!(store.next_body_id() > b.body);
        // The last references go: with a queued delete and with the whole session.
        store
            .submit(vec![Op::DeleteQueued {
                client_id: "b".into(),
                seq: 1,
            }])
            .await
            .unwrap();
        store
            .submit(vec![Op::DeleteSession {
                client_id: "c".into(),
            }])
            .await
            .unwrap();
    }
    assert!(
        body_ids(&path).is_empty(),
        "the body went with its last copy"
    );
}

#[tokio::test]
async fn a_rewritten_row_moves_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let (store, _) = open(&path);
        store
            .submit(vec![
                Op::PutSession {
                    client_id: "a".into(),
                    session: session("#"),
                },
                put_queued("a", 1),
            ])
            .await
            .unwrap();
        // The same key again with another message: the first body has no row left.
        store
            .submit(vec![Op::PutQueued {
                client_id: "a".into(),
                seq: 1,
                item: queued("t", 2),
            }])
            .await
            .unwrap();
    }
    assert_eq!(body_ids(&path), vec![2]);
}

#[test]
fn a_schema_2_file_gets_a_body_per_queued_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, 2u64)
                .unwrap();
            txn.open_table(SESSIONS)
                .unwrap()
                .insert("computer-a", encoded(&session("#")).as_slice())
                .unwrap();
            let mut q = txn.open_table(QUEUE).unwrap();
            q.insert(
                ("computer-a", 1u64),
                encoded(&v2_row(&queued("t", 9))).as_slice(),
            )
            .unwrap();
            q.insert(
                ("computer-a", 2u64),
                encoded(&v2_row(&queued("u", 9))).as_slice(),
            )
            .unwrap();
            txn.open_table(RETAINED).unwrap();
        }
        txn.commit().unwrap();
    }
    let (_store, loaded) = open(&path);
    let q = &loaded.sessions[0].queue;
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].1.msg.topic, "t");
    assert_eq!(q[1].1.msg.topic, "u");
    assert_ne!(q[0].1.body, q[1].1.body);
    drop(_store);
    assert_eq!(body_ids(&path).len(), 2);
}
