//! The session lifecycle in the engine, without sockets: attach, subscribe, detach,
//! offline queueing, reattach, restart, clean start and expiry 0.

use std::sync::Arc;

use bytes::Bytes;
use fleetcore_core::message::Message;
use fleetcore_core::protocol::Version;
use fleetcore_store::{Store, StoreOptions};
use mqtt_proto::v5::RetainHandling;
use mqtt_proto::{QoS, TopicName};

use super::hub::{Hub, SubEntry};
use super::services::ServiceHost;
use crate::config::Config;
use crate::session::{PidSet, Session, SubOptions};

fn open(dir: &std::path::Path) -> Arc<Hub> {
    let (store, loaded) =
        Store::open(&dir.join("fleetcore.redb"), StoreOptions::default()).unwrap();
    Hub::new(
        Config::default(),
        store.storage(),
        loaded,
        ServiceHost::default(),
    )
}

async fn subscribe(hub: &Arc<Hub>, session: &Arc<Session>, filter: &str) {
    let opts = SubOptions {
        qos: QoS::Level1,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
        subscription_id: None,
    };
    session
        .state
        .lock()
        .subscribe(filter.to_string(), opts.clone());
    hub.router.subscribe(
        filter,
        None,
        session.id,
        SubEntry {
            session: session.clone(),
            opts,
            filter: None,
        },
    );
    if let Some(commit) = hub.persist_session(session) {
        commit.await.unwrap();
    }
}

fn order(topic: &str, payload: &'static str) -> Message {
    Message::from_publish(
        TopicName::try_from(topic).unwrap(),
        Bytes::from_static(payload.as_bytes()),
        QoS::Level1,
        false,
        Default::default(),
        0,
    )
}

fn queued_payloads(session: &Session) -> Vec<Bytes> {
    let st = session.state.lock();
    st.queue.iter().map(|d| d.msg.payload.clone()).collect()
}

#[tokio::test]
async fn a_persistent_session_keeps_its_queue_across_reattach_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let a = hub
        .attach("dev".into(), false, 3600, Version::V5, 1, None)
        .await;
    assert!(!a.session_present);
    subscribe(&hub, &a.session, "acct/dev/#").await;
    hub.detach(&a.session, 1, Vec::new(), PidSet::default(), None);

    // Offline: the order is acknowledged only once its copy is on disk.
    let routed = hub.publish(order("acct/dev/cmd", "reboot"));
    assert_eq!(routed.matched, 1);
    routed
        .commit
        .expect("a copy for an offline session is written")
        .await
        .unwrap();
    let b = hub
        .attach("dev".into(), false, 3600, Version::V5, 2, None)
        .await;
    assert!(b.session_present);
    assert!(Arc::ptr_eq(&a.session, &b.session));
    assert_eq!(queued_payloads(&b.session), ["reboot"]);
    hub.detach(&b.session, 2, Vec::new(), PidSet::default(), None);
    hub.storage.flush().await.unwrap();
    drop((a, b));
    drop(hub);

    // After a restart the session, its subscription and its queue are back.
    let hub = open(dir.path());
    let c = hub
        .attach("dev".into(), false, 3600, Version::V5, 3, None)
        .await;
    assert!(c.session_present);
    assert_eq!(queued_payloads(&c.session), ["reboot"]);
    let routed = hub.publish(order("acct/dev/cfg", "poll=60"));
    assert_eq!(routed.matched, 1, "the subscription came back");
}

#[tokio::test]
async fn clean_start_and_expiry_0_leave_no_session_behind() {
    let dir = tempfile::tempdir().unwrap();
    let hub = open(dir.path());
    let a = hub
        .attach("dev".into(), false, 3600, Version::V5, 1, None)
        .await;
    subscribe(&hub, &a.session, "acct/dev/#").await;
    hub.detach(&a.session, 1, Vec::new(), PidSet::default(), None);
    hub.publish(order("acct/dev/cmd", "x"))
        .commit
        .unwrap()
        .await
        .unwrap();

    // Clean start: the old session, its subscription and its queue are gone.
    let b = hub
        .attach("dev".into(), true, 0, Version::V5, 2, None)
        .await;
    assert!(!b.session_present);
    assert!(queued_payloads(&b.session).is_empty());
    assert_eq!(hub.publish(order("acct/dev/cmd", "y")).matched, 0);

    // Expiry 0: the session ends with its connection.
    hub.detach(&b.session, 2, Vec::new(), PidSet::default(), None);
    assert_eq!(hub.session_count(), 0);
    let c = hub
        .attach("dev".into(), false, 3600, Version::V5, 3, None)
        .await;
    assert!(!c.session_present);
    hub.detach(&c.session, 3, Vec::new(), PidSet::default(), None);
    hub.storage.flush().await.unwrap();
    drop((a, b, c));
    drop(hub);
    let hub = open(dir.path());
    let d = hub
        .attach("dev".into(), false, 3600, Version::V5, 4, None)
        .await;
    assert!(d.session_present, "the last session (expiry 3600) is kept");
    assert!(
        queued_payloads(&d.session).is_empty(),
        "the cleaned queue stayed gone"
    );
}

/// A fabric that writes down what it is told.
#[derive(Default)]
struct Recording(parking_lot::Mutex<Vec<String>>);

impl fleetcore_core::fabric::Fabric for Recording {
    fn interest(&self, filter: &str, group: Option<&str>, on: bool) {
        self.0
            .lock()
            .push(format!("interest {filter} {group:?} {on}"));
    }
    fn forward(&self, msg: &Message) -> Option<fleetcore_store::Commit> {
        self.0.lock().push(format!("forward {}", &*msg.topic));
        None
    }
    fn broadcast(&self, ev: &fleetcore_core::fabric::Control) {
        self.0.lock().push(format!("broadcast {ev:?}"));
    }
}

#[tokio::test]
async fn the_fabric_hears_interest_publishes_and_revocations() {
    use fleetcore_identity::registry::{CertState, NewCert};
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) =
        Store::open(&dir.path().join("fleetcore.redb"), StoreOptions::default()).unwrap();
    let fabric = Arc::new(Recording::default());
    let hub = Hub::with_fabric(
        Config::default(),
        store.storage(),
        loaded,
        ServiceHost::default(),
        fabric.clone(),
    );
    let take = || std::mem::take(&mut *fabric.0.lock());
    let a = hub
        .attach("dev".into(), true, 0, Version::V5, 1, None)
        .await;
    subscribe(&hub, &a.session, "acct/dev/#").await;
    assert_eq!(take(), ["interest acct/dev/# None true"]);
    let _ = hub.publish(order("acct/dev/cmd", "x"));
    assert_eq!(take(), ["forward acct/dev/cmd"]);
    hub.detach(&a.session, 1, Vec::new(), PidSet::default(), None);
    assert_eq!(take(), ["interest acct/dev/# None false"]);
    hub.registry
        .register_certificate(
            NewCert {
                id: "c1".into(),
                pem: String::new(),
                subject: "CN=dev".into(),
                subject_cn: Some("dev".into()),
                issuer: "CN=ca".into(),
                serial: "01".into(),
                not_after_ms: u64::MAX,
            },
            CertState::Active,
        )
        .await
        .unwrap();
    hub.registry
        .set_certificate_state("c1", CertState::Revoked)
        .await
        .unwrap();
    assert_eq!(take(), [r#"broadcast KickCertificate { cert_id: "c1" }"#]);
}
