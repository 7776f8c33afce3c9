//! Records and retained messages stored by one node reach the others (`RecordStore::watch_records`) on a real
//! nats-server (the test's own, killed by PID at the end): in the order they were stored,
//! deletes included, a node's own writes left out, nothing stored between a node's load
//! and its watch missed; and through `Registry::apply_stored`, a certificate revoked on
//! one node is revoked on the other, which is told to cut it off.

#[path = "support/nats.rs"]
mod support_nats;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcore_cluster::{NatsOptions, NatsStorage};
use fleetcore_core::storage::{
    Loaded, RecordChange, RecordOp, RecordWatch, RetainedOp, Storage, StoredMessage, StoredRetained,
};
use fleetcore_identity::registry::{CertState, NewCert, Registry, RegistryEvent};
use fleetcore_identity::token::TokenConfig;
use support_nats::Nats;

async fn open(nats: &Nats) -> (Storage, Loaded) {
    let opts = NatsOptions {
        prefix: "watch".into(),
        request_timeout: Duration::from_secs(3),
        ..NatsOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match NatsStorage::connect(&[nats.url()], opts.clone()).await {
            Ok((store, loaded)) => return (store.storage(), loaded),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("NATS open: {e}\nserver log:\n{}", nats.log()),
        }
    }
}

fn put(kind: &'static str, key: &str, value: &str) -> RecordOp {
    RecordOp::Put {
        kind,
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn change(kind: &str, key: &str, value: Option<&str>, revision: u64) -> RecordChange {
    RecordChange {
        kind: kind.into(),
        key: key.into(),
        value: value.map(|v| v.as_bytes().to_vec()),
        revision,
    }
}

/// The next change, within 10 s.
async fn next(watch: &mut RecordWatch) -> RecordChange {
    tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .expect("no change within 10 s")
        .expect("the watch ended")
}

#[tokio::test]
async fn records_another_node_stores_are_watched_in_order_and_its_own_are_not() {
    let nats = Nats::start();
    let (a, _) = open(&nats).await;
    let (b, _) = open(&nats).await;
    // Stored after b loaded and before it watched: still seen.
    let early = a
        .records
        .submit_records(vec![put("thing", "early", "1")])
        .await
        .unwrap();
    let mut b_watch = b.records.watch_records().expect("NATS records are watched");
    let mut a_watch = a.records.watch_records().expect("NATS records are watched");

    let first = a
        .records
        .submit_records(vec![
            put("thing", "dev/1", "{\"v\":1}"),
            put("certificate", "ab.cd", "c"),
        ])
        .await
        .unwrap();
    let second = a
        .records
        .submit_records(vec![
            put("thing", "dev/1", "{\"v\":2}"),
            RecordOp::Delete {
                kind: "certificate",
                key: "ab.cd".into(),
            },
        ])
        .await
        .unwrap();
    let from_b = b
        .records
        .submit_records(vec![put("policy", "from-b", "p")])
        .await
        .unwrap();
    // Each write's revision is its place in the stream: later writes, larger ones.
    let all: Vec<u64> = [&early, &first, &second, &from_b]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(all.len(), 6, "one revision per put or delete: {all:?}");
    assert!(all.windows(2).all(|w| w[0] < w[1]), "revisions {all:?}");

    // Every key's last change comes, in the order stored; a value written over before
    // the watcher read it may be skipped (the bucket keeps one value per key), which
    // leaves the watcher where the writer is.
    let stored = vec![
        change("thing", "early", Some("1"), early[0]),
        change("thing", "dev/1", Some("{\"v\":1}"), first[0]),
        change("certificate", "ab.cd", Some("c"), first[1]),
        change("thing", "dev/1", Some("{\"v\":2}"), second[0]),
        change("certificate", "ab.cd", None, second[1]),
    ];
    let last = stored.last().unwrap().clone();
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        match tokio::time::timeout(Duration::from_secs(10), b_watch.recv()).await {
            Ok(Some(c)) => seen.push(c),
            _ => panic!("b saw only {seen:?} of {stored:?}"),
        }
    }
    let mut rest = stored.iter();
    assert!(
        seen.iter().all(|c| rest.any(|s| s == c)),
        "b saw {seen:?}, not in the order of {stored:?}, or something a did not store"
    );
    for must in [&stored[0], &stored[3], &stored[4]] {
        assert!(seen.contains(must), "b missed {must:?}: saw {seen:?}");
    }
    // a sees b's one change, none of its own.
    assert_eq!(
        next(&mut a_watch).await,
        change("policy", "from-b", Some("p"), from_b[0])
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a_watch.recv())
            .await
            .is_err(),
        "a was handed a change it made itself"
    );
    drop(nats);
}

fn cert(id: &str) -> NewCert {
    NewCert {
        id: id.into(),
        pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        subject: format!("CN={id}"),
        subject_cn: Some(id.into()),
        issuer: "CN=test CA".into(),
        serial: "01".into(),
        not_after_ms: u64::MAX / 2,
    }
}

/// A node's registry, fed by its store's watch as `Server::start_on` feeds it; the
/// events it tells are written down.
async fn node(nats: &Nats) -> (Arc<Registry>, Arc<Mutex<Vec<RegistryEvent>>>) {
    let (storage, loaded) = open(nats).await;
    let registry = Arc::new(Registry::new(
        storage.records.clone(),
        &loaded.records,
        TokenConfig::default(),
    ));
    let events = Arc::new(Mutex::new(Vec::new()));
    let told = events.clone();
    registry.on_event(move |ev| told.lock().unwrap().push(ev.clone()));
    let mut watch = storage.records.watch_records().unwrap();
    let fed = registry.clone();
    tokio::spawn(async move {
        while let Some(c) = watch.recv().await {
            fed.apply_stored(&c.kind, &c.key, c.value.as_deref(), c.revision);
        }
    });
    (registry, events)
}

/// Waits (at most 10 s) until `done` holds; returns how long it took.
async fn until(what: &str, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "after 10 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_certificate_revoked_on_one_node_is_revoked_and_cut_off_on_the_other() {
    let nats = Nats::start();
    let (a, _) = node(&nats).await;
    let (b, b_events) = node(&nats).await;

    a.create_thing("dev-1", None, Default::default())
        .await
        .unwrap();
    a.create_policy(
        "own-topics",
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#,
    )
    .await
    .unwrap();
    a.register_certificate(cert("c1"), CertState::Active)
        .await
        .unwrap();
    a.attach_policy("own-topics", "c1").await.unwrap();
    a.attach_thing("dev-1", "c1").await.unwrap();
    until("b has the thing, policy and certificate of a", || {
        b.thing("dev-1").is_some()
            && b.policy("own-topics").is_some()
            && b.certificate_state("c1") == Some(CertState::Active)
            && b.certificate_policies("c1") == vec!["own-topics".to_string()]
            && b.certificate_things("c1") == vec!["dev-1".to_string()]
    })
    .await;
    let generation = b.generation();

    let start = Instant::now();
    a.set_certificate_state("c1", CertState::Revoked)
        .await
        .unwrap();
    let stored = start.elapsed();
    until("b has c1 revoked", || {
        b.certificate_state("c1") == Some(CertState::Revoked)
    })
    .await;
    eprintln!(
        "revocation: stored by a after {stored:?}, in b's registry after {:?}",
        start.elapsed()
    );
    assert!(
        b.generation() > generation,
        "b's connections re-check their authorization"
    );
    until("b was told to cut c1 off", || {
        b_events
            .lock()
            .unwrap()
            .contains(&RegistryEvent::CertificateLeftActive {
                cert_id: "c1".into(),
                state: CertState::Revoked,
            })
    })
    .await;

    // A detach and a delete on a reach b too.
    a.detach_policy("own-topics", "c1").await.unwrap();
    until("b has the policy detached", || {
        b.certificate_policies("c1").is_empty()
    })
    .await;
    // Applying what b already has again changes nothing and tells nothing.
    let told = b_events.lock().unwrap().len();
    b.apply_stored("thing-group", "none", None, 1);
    b.apply_stored("shadow", "dev-1", Some(b"{}"), 1);
    assert_eq!(b_events.lock().unwrap().len(), told);
    drop(nats);
}

fn retained(topic: &str, payload: &str) -> StoredRetained {
    StoredRetained {
        stored_at_ms: 1_700_000_000_000,
        msg: StoredMessage {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec(),
            qos: 1,
            retain: true,
            expires_at_ms: None,
            payload_format_utf8: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("k".into(), "v".into())],
        },
    }
}

#[tokio::test]
async fn retained_messages_another_node_stores_or_deletes_are_watched_and_its_own_are_not() {
    let nats = Nats::start();
    let (a, _) = open(&nats).await;
    let (b, _) = open(&nats).await;
    let mut b_watch = b
        .retained
        .watch_retained()
        .expect("NATS retained is watched");
    let mut a_watch = a
        .retained
        .watch_retained()
        .expect("NATS retained is watched");
    a.retained
        .submit_retained(vec![RetainedOp::Put {
            topic: "acct/dev 1/config".into(),
            retained: retained("acct/dev 1/config", "v1"),
        }])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), b_watch.recv())
        .await
        .expect("nothing within 10 s")
        .unwrap();
    assert_eq!(got.topic, "acct/dev 1/config");
    let r = got.retained.expect("a put");
    assert_eq!(r.msg.payload, b"v1");
    assert_eq!(r.msg.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(r.stored_at_ms, 1_700_000_000_000);

    a.retained
        .submit_retained(vec![RetainedOp::Delete {
            topic: "acct/dev 1/config".into(),
        }])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), b_watch.recv())
        .await
        .expect("nothing within 10 s")
        .unwrap();
    assert_eq!(got.topic, "acct/dev 1/config");
    assert!(got.retained.is_none(), "a delete");

    b.retained
        .submit_retained(vec![RetainedOp::Put {
            topic: "from/b".into(),
            retained: retained("from/b", "b"),
        }])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), a_watch.recv())
        .await
        .expect("nothing within 10 s")
        .unwrap();
    assert_eq!(got.topic, "from/b", "a saw its own write first");
    drop(nats);
}

/// Two nodes change one thing at the same moment, 24 times over: every change either
/// lands or is refused as a conflict (then tried again, as an admin client does on 409),
/// none is lost by being written over, and both nodes and a fresh load agree at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_changing_one_thing_at_once_lose_no_change_and_agree() {
    let nats = Nats::start();
    let (a, _) = node(&nats).await;
    let (b, _) = node(&nats).await;
    a.create_thing("dev", None, Default::default())
        .await
        .unwrap();
    until("b has the thing", || b.thing("dev").is_some()).await;

    /// Sets attribute `name`, trying again after each conflict (at most 400 times).
    async fn set(reg: Arc<Registry>, name: String) -> u32 {
        let mut conflicts = 0;
        loop {
            let attrs = std::collections::BTreeMap::from([(name.clone(), "1".to_string())]);
            match reg.update_thing("dev", None, Some(attrs), true).await {
                Ok(_) => return conflicts,
                Err(fleetcore_identity::registry::RegistryError::Conflict(why)) => {
                    assert!(why.contains("changed by another writer"), "{why}");
                    conflicts += 1;
                    assert!(conflicts < 400, "{name}: still conflicting");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
    let rounds = 24; // 48 attributes: a thing has at most 50
    let mut conflicts = 0;
    for round in 0..rounds {
        let (x, y) = tokio::join!(
            tokio::spawn(set(a.clone(), format!("a{round}"))),
            tokio::spawn(set(b.clone(), format!("b{round}")))
        );
        conflicts += x.unwrap() + y.unwrap();
    }
    let every = |reg: &Registry| {
        let t = reg.thing("dev").unwrap();
        (0..rounds).all(|r| {
            t.attributes.contains_key(&format!("a{r}"))
                && t.attributes.contains_key(&format!("b{r}"))
        })
    };
    until("both nodes hold every change", || every(&a) && every(&b)).await;
    let (ta, tb) = (a.thing("dev").unwrap(), b.thing("dev").unwrap());
    assert_eq!(ta, tb);
    // One version step per change that landed: none was written over.
    assert_eq!(ta.version, 1 + 2 * rounds as u64, "{ta:?}");
    let (_, loaded) = open(&nats).await;
    let fresh = Registry::new(Arc::new(NoWrites), &loaded.records, TokenConfig::default());
    assert_eq!(fresh.thing("dev").unwrap(), ta);
    eprintln!(
        "{} changes, {conflicts} refused as conflicts and tried again",
        2 * rounds
    );
    drop(nats);
}

/// A record store for a registry that only reads.
struct NoWrites;
impl fleetcore_core::storage::RecordStore for NoWrites {
    fn submit_records(&self, _: Vec<RecordOp>) -> fleetcore_core::storage::RecordCommit {
        fleetcore_core::storage::Commit::failed(fleetcore_core::storage::StoreError::Closed)
    }
}
