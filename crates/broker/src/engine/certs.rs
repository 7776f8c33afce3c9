//! Which live connections authenticated with which certificate, so that a certificate
//! leaving ACTIVE cuts off exactly its connections without a walk over every session.
//!
//! A connection is added once it is attached and removed when it ends; token sessions
//! are filed under the registered certificate their token stands for. Entries hold the
//! session weakly and name the connection, so a stale entry (a connection taken over,
//! a session ended) is recognised and skipped.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use mqtt_proto::v5::DisconnectReasonCode;
use parking_lot::Mutex;

use crate::session::{Kick, Session};

/// One live connection: its number and its session.
type Entry = (u64, Weak<Session>);

#[derive(Default)]
pub struct CertIndex {
    by_cert: Mutex<HashMap<Arc<str>, Vec<Entry>>>,
}

impl CertIndex {
    /// Files connection `conn_id` of `session` under `cert_id`.
    pub fn add(&self, cert_id: &Arc<str>, session: &Arc<Session>, conn_id: u64) {
        self.by_cert
            .lock()
            .entry(cert_id.clone())
            .or_default()
            .push((conn_id, Arc::downgrade(session)));
    }

    /// Forgets connection `conn_id` under `cert_id`.
    pub fn remove(&self, cert_id: &str, conn_id: u64) {
        let mut map = self.by_cert.lock();
        if let Some(list) = map.get_mut(cert_id) {
            list.retain(|(c, _)| *c != conn_id);
            if list.is_empty() {
                map.remove(cert_id);
            }
        }
    }

    /// Tells every live connection filed under `cert_id` to close with 0x87
    /// (Not authorized); returns how many were told.
    pub fn kick(&self, cert_id: &str, message: &str) -> usize {
        let entries: Vec<Entry> = match self.by_cert.lock().get(cert_id) {
            Some(list) => list.clone(),
            None => return 0,
        };
        let mut n = 0;
        for (conn_id, session) in entries {
            let Some(session) = session.upgrade() else {
                continue;
            };
            let st = session.state.lock();
            if let Some(link) = st.conn.as_ref().filter(|l| l.conn_id == conn_id) {
                link.kick.send(Kick {
                    reason: DisconnectReasonCode::NotAuthorized,
                    message: message.to_string(),
                });
                n += 1;
            }
        }
        n
    }

    /// How many connections are filed (for tests and metrics).
    pub fn len(&self) -> usize {
        self.by_cert.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{kick_slot, ConnLink, KickReceiver};
    use fleetcore_core::protocol::Version;

    fn attached(id: u64, conn_id: u64, cert: &str) -> (Arc<Session>, KickReceiver) {
        let s = Arc::new(Session::new(
            id,
            Arc::from(format!("c{id}")),
            0,
            Version::V5,
        ));
        let (tx, rx) = kick_slot();
        s.state.lock().conn = Some(ConnLink {
            conn_id,
            kick: tx,
            cert_id: Some(Arc::from(cert)),
            released: None,
        });
        (s, rx)
    }

    fn kicked(rx: &mut KickReceiver) -> bool {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        rx.poll_recv(&mut cx).is_ready()
    }

    #[test]
    fn only_the_live_connections_of_the_certificate_are_kicked() {
        let idx = CertIndex::default();
        let a: Arc<str> = Arc::from("aa");
        let b: Arc<str> = Arc::from("bb");
        let (s1, mut k1) = attached(1, 10, "aa");
        let (s2, mut k2) = attached(2, 20, "bb");
        let (s3, mut k3) = attached(3, 30, "aa");
        idx.add(&a, &s1, 10);
        idx.add(&b, &s2, 20);
        idx.add(&a, &s3, 30);
        // s3's connection 30 was taken over by 31: the entry is stale.
        s3.state.lock().conn.as_mut().unwrap().conn_id = 31;
        assert_eq!(idx.kick("aa", "revoked"), 1);
        assert!(kicked(&mut k1));
        assert!(
            !kicked(&mut k2),
            "another certificate's connection was kicked"
        );
        assert!(!kicked(&mut k3), "a stale entry was kicked");
        assert_eq!(idx.kick("cc", "unknown"), 0);
        idx.remove("aa", 10);
        idx.remove("aa", 30);
        idx.remove("bb", 20);
        assert!(idx.is_empty());
        // A dropped session is skipped.
        let (s4, _k4) = attached(4, 40, "dd");
        idx.add(&Arc::from("dd"), &s4, 40);
        drop(s4);
        assert_eq!(idx.kick("dd", "revoked"), 0);
    }
}
