//! Leases on a real nats-server (one of the test's own, killed by PID at the end): one
//! holder at a time, taken over only after the holder stopped renewing, and a holder
//! that lost its lease (taken, or cut off from NATS) is told.

#[path = "support/nats.rs"]
mod support_nats;

use std::time::{Duration, Instant};

use fleetcore_cluster::lease::LeaseError;
use fleetcore_cluster::{NatsOptions, NatsStorage};
use support_nats::Nats;

const TTL: Duration = Duration::from_millis(1000);

async fn connect(nats: &Nats) -> NatsStorage {
    let opts = NatsOptions {
        prefix: "lease".into(),
        request_timeout: Duration::from_secs(2),
        ..NatsOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match NatsStorage::connect(&[nats.url()], opts.clone()).await {
            Ok((s, _)) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("NATS: {e}\n{}", nats.log()),
        }
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("a lease step took over 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_keeps_the_lease_and_a_released_one_is_free_at_once() {
    let nats = Nats::start();
    let (a, b) = (connect(&nats).await, connect(&nats).await);
    let held = bounded(a.lease("node", "node-a", TTL))
        .await
        .expect("a takes it");
    // B watches for more than a time to live: A renews, so B is refused.
    let started = Instant::now();
    match bounded(b.lease("node", "node-b", TTL)).await {
        Err(LeaseError::Held { by, .. }) => assert_eq!(by, "node-a"),
        other => panic!("B got {other:?} while A renews"),
    }
    assert!(
        started.elapsed() < TTL * 2,
        "refused after {:?}",
        started.elapsed()
    );
    assert!(held.lost().borrow().is_none());
    // Released: B takes it without waiting out a time to live.
    held.release().await;
    let started = Instant::now();
    let b_held = bounded(b.lease("node", "node-b", TTL))
        .await
        .expect("b takes it");
    assert!(started.elapsed() < TTL, "took {:?}", started.elapsed());
    b_held.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_stops_renewing_is_taken_over_after_the_ttl() {
    let nats = Nats::start();
    let (a, b) = (connect(&nats).await, connect(&nats).await);
    let held = bounded(a.lease("node", "node-a", TTL))
        .await
        .expect("a takes it");
    // As a kill -9: renewing stops, nothing is released.
    drop(held);
    let started = Instant::now();
    let b_held = bounded(b.lease("node", "node-b", TTL))
        .await
        .expect("b takes it over");
    assert!(
        started.elapsed() >= TTL,
        "taken over after {:?}",
        started.elapsed()
    );
    // The same name comes back (a restart of node-b): at once.
    drop(b_held);
    let started = Instant::now();
    let again = bounded(b.lease("node", "node-b", TTL))
        .await
        .expect("b again");
    assert!(started.elapsed() < TTL, "took {:?}", started.elapsed());
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_is_told_when_its_lease_is_taken_or_nats_is_gone() {
    let mut nats = Nats::start();
    let a = connect(&nats).await;
    // Another holder took it while A was paused (written behind A's back): A's next
    // renewal is refused.
    {
        let held = bounded(a.lease("taken", "node-a", TTL))
            .await
            .expect("a takes it");
        let mut lost = held.lost();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let meta = async_nats::jetstream::new(client)
            .get_key_value("lease_meta")
            .await
            .unwrap();
        meta.put("lease.taken", "node-b".into()).await.unwrap();
        bounded(lost.wait_for(|l| l.is_some())).await.unwrap();
        let why = lost.borrow().clone().unwrap();
        assert!(why.contains("taken by another holder"), "{why}");
        drop(held);
    }

    let held = bounded(a.lease("cut", "node-a", TTL))
        .await
        .expect("a takes it");
    let mut lost = held.lost();
    nats.kill();
    let started = Instant::now();
    bounded(lost.wait_for(|l| l.is_some())).await.unwrap();
    let why = lost.borrow().clone().unwrap();
    assert!(why.contains("could not be renewed"), "{why}");
    assert!(
        started.elapsed() >= TTL / 2,
        "lost after {:?}",
        started.elapsed()
    );
}
