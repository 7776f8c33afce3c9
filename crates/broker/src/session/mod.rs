//! Sessions: what the broker remembers about a client across its connections.
//!
//! A session owns its subscriptions, the queue of messages waiting to be sent
//! to it, and (while no connection is attached) the messages that were in
//! flight when the last connection ended. Each session has its own lock, so
//! publishers to different clients never contend; a connection attached to the
//! session is woken through [`Session::wake`] when something is queued.
//!
//! A session with an expiry interval of 0 ends with its connection. Others
//! are persistent: they outlive the connection, their QoS 1/2 messages that
//! arrive while no connection is attached are written to the store before the
//! publisher is acknowledged, and they end when the expiry interval has passed
//! since the connection ended.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mqtt_proto::v5::{DisconnectReasonCode, RetainHandling};
use mqtt_proto::QoS;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::message::Delivery;
use fleetcore_core::message::Message;
use fleetcore_core::protocol::Version;

pub type SessionId = u64;

/// Options of one subscription, as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
    pub subscription_id: Option<u32>,
}

/// A session's subscriptions by raw filter. A device has one or two: those
/// sit in an exact-sized vector (an allocation of 32 bytes each, where a hash
/// table's first one is ~150); past [`Subscriptions::FEW`] they move to a map.
#[derive(Debug, Default)]
pub struct Subscriptions {
    few: Vec<(Box<str>, SubOptions)>,
    #[allow(clippy::box_collection)] // 8 bytes inline where a map is 48
    many: Option<Box<HashMap<Box<str>, SubOptions>>>,
}

impl Subscriptions {
    const FEW: usize = 8;

    pub fn len(&self) -> usize {
        self.many.as_ref().map_or(self.few.len(), |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.get(filter).is_some()
    }

    pub fn get(&self, filter: &str) -> Option<&SubOptions> {
        match &self.many {
            Some(m) => m.get(filter),
            None => self
                .few
                .iter()
                .find(|(f, _)| &**f == filter)
                .map(|(_, o)| o),
        }
    }

    pub fn get_mut(&mut self, filter: &str) -> Option<&mut SubOptions> {
        match &mut self.many {
            Some(m) => m.get_mut(filter),
            None => self
                .few
                .iter_mut()
                .find(|(f, _)| &**f == filter)
                .map(|(_, o)| o),
        }
    }

    /// Adds or replaces; the options it replaced.
    pub fn insert(&mut self, filter: String, opts: SubOptions) -> Option<SubOptions> {
        if let Some(existing) = self.get_mut(&filter) {
            return Some(std::mem::replace(existing, opts));
        }
        let filter = filter.into_boxed_str();
        match &mut self.many {
            Some(m) => {
                m.insert(filter, opts);
            }
            None if self.few.len() < Self::FEW => {
                self.few.reserve_exact(1);
                self.few.push((filter, opts));
            }
            None => {
                let mut m: HashMap<_, _> = std::mem::take(&mut self.few).into_iter().collect();
                m.insert(filter, opts);
                self.many = Some(Box::new(m));
            }
        }
        None
    }

    pub fn remove(&mut self, filter: &str) -> Option<SubOptions> {
        match &mut self.many {
            Some(m) => m.remove(filter),
            None => {
                let i = self.few.iter().position(|(f, _)| &**f == filter)?;
                Some(self.few.swap_remove(i).1)
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SubOptions)> {
        let many = self.many.iter().flat_map(|m| m.iter());
        self.few
            .iter()
            .map(|(f, o)| (f, o))
            .chain(many)
            .map(|(f, o)| (&**f, o))
    }

    /// Removes every subscription; their filters.
    pub fn take_filters(&mut self) -> Vec<String> {
        let filters = self.iter().map(|(f, _)| f.to_owned()).collect();
        *self = Subscriptions::default();
        filters
    }
}

/// Packet ids of incoming QoS 2 messages not yet released. Made on first
/// use: most clients never send QoS 2, and an empty set is 48 bytes inline
/// in every session and every connection.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(clippy::box_collection)] // 8 bytes inline where a set is 48
pub struct PidSet(Option<Box<HashSet<u16>>>);

impl PidSet {
    pub fn insert(&mut self, pid: u16) -> bool {
        self.0.get_or_insert_with(Default::default).insert(pid)
    }

    pub fn remove(&mut self, pid: &u16) -> bool {
        self.0.as_mut().is_some_and(|s| s.remove(pid))
    }

    pub fn contains(&self, pid: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(pid))
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds every id of `other`.
    pub fn extend(&mut self, other: PidSet) {
        for pid in other.0.into_iter().flat_map(|s| s.into_iter()) {
            self.insert(pid);
        }
    }
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent (QoS 1 awaiting PUBACK, QoS 2 awaiting PUBREC).
    Published,
    /// QoS 2: PUBREL sent, awaiting PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub pid: u16,
    pub delivery: Delivery,
    pub state: InflightState,
}

/// A request to the connection attached to a session to close itself.
#[derive(Debug, Clone)]
pub struct Kick {
    pub reason: DisconnectReasonCode,
    pub message: String,
}

/// Wakes the one task that waits on it; a notification that comes while
/// nobody waits is kept for the next wait. Polled by a connection on every
/// wake-up: an atomic load when nothing happened (a `Notify` takes its lock),
/// and nothing to keep between polls but the waker it holds.
#[derive(Debug, Default)]
pub struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn notify(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once notified since it was last ready. One task at a time may
    /// wait: a second one takes the waker over.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A notification between the check and the registration woke nobody.
        if self.take() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn take(&self) -> bool {
        self.set.load(Ordering::Acquire) && self.set.swap(false, Ordering::AcqRel)
    }
}

/// Where a kick waits for its connection: the first kick wins, later ones are
/// dropped (the connection is ending anyway). About 100 bytes a connection,
/// against some 1.5 KB for an unbounded channel.
#[derive(Debug, Default)]
struct KickSlot {
    /// Boxed: the slot lives as long as the connection, a kick comes once.
    kick: Mutex<Option<Box<Kick>>>,
    signal: Signal,
}

/// The hub's end of a connection's kick slot.
#[derive(Debug, Clone)]
pub struct KickSender(Arc<KickSlot>);

/// The connection's end of its kick slot.
#[derive(Debug)]
pub struct KickReceiver(Arc<KickSlot>);

/// A new kick slot.
pub fn kick_slot() -> (KickSender, KickReceiver) {
    let slot = Arc::new(KickSlot::default());
    (KickSender(slot.clone()), KickReceiver(slot))
}

impl KickSender {
    /// Tells the connection to close, unless an earlier kick already did.
    pub fn send(&self, kick: Kick) {
        {
            let mut k = self.0.kick.lock();
            if k.is_none() {
                *k = Some(Box::new(kick));
            }
        }
        self.0.signal.notify();
    }
}

impl KickReceiver {
    /// Ready with the kick once there is one; a kick is taken only when
    /// returned. Only the slot's atomic flag is read until one comes.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Kick> {
        loop {
            std::task::ready!(self.0.signal.poll_notified(cx));
            if let Some(k) = self.0.kick.lock().take() {
                return Poll::Ready(*k);
            }
        }
    }
}

/// The link from a session to the connection currently attached to it.
#[derive(Debug)]
pub struct ConnLink {
    pub conn_id: u64,
    pub kick: KickSender,
    /// The registered certificate the connection authenticated with.
    pub cert_id: Option<Arc<str>>,
    /// Made by a connection that takes this one's session over and waits for it to
    /// let go: notified when the link is dropped, whichever way the connection leaves
    /// the session (detach, the session ending, a forced detach).
    pub released: Option<Arc<tokio::sync::Notify>>,
}

impl Drop for ConnLink {
    fn drop(&mut self) {
        if let Some(released) = &self.released {
            released.notify_waiters();
        }
    }
}

/// A will waiting for its delay (or for the session to end).
#[derive(Debug)]
pub struct PendingWill {
    pub msg: Message,
    pub generation: u64,
}

/// Outcome of offering a delivery to a session.
pub enum Enqueued {
    /// Queued in memory.
    Queued,
    /// Queued, and its durable copy was submitted to the store (under the
    /// session's lock, so it is ordered before any later delete of it); the
    /// publisher is acknowledged once this commit completes. The number is the copy's store key.
    Stored(fleetcore_core::storage::Commit, u64),
    /// Not queued (the reason is a metrics label).
    Dropped(&'static str),
}

#[derive(Debug)]
pub struct SessionState {
    /// 0: the session ends with its connection.
    pub expiry_secs: u32,
    pub version: Version,
    /// Raw filter as subscribed (including any `$share/group/` prefix).
    pub subscriptions: Subscriptions,
    pub queue: VecDeque<Delivery>,
    /// Outgoing messages in flight when the last connection ended.
    pub inflight: Vec<Inflight>,
    /// Incoming QoS 2 packet ids received but not yet released (PUBREL).
    pub incoming_qos2: PidSet,
    pub conn: Option<ConnLink>,
    /// Unix ms when the last connection ended; `None` while attached.
    pub disconnected_at_ms: Option<u64>,
    pub next_seq: u64,
    /// Boxed: most sessions never have one, and every session carries the field.
    pub pending_will: Option<Box<PendingWill>>,
    pub will_generation: u64,
    /// The timer task of a delayed will, aborted when the client comes back.
    pub will_timer: Option<tokio::task::AbortHandle>,
    /// A record of this session was written to the store (so ending it must delete it).
    pub stored: bool,
    /// The store durably holds exactly `subscriptions` for this session (a
    /// session restored at startup whose subscriptions have not changed since):
    /// a SUBSCRIBE that changes nothing needs no write and no wait.
    pub subscriptions_stored: bool,
    /// Set once the session has been removed; a late publisher's delivery is dropped.
    pub ended: bool,
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub client_id: Arc<str>,
    pub state: Mutex<SessionState>,
    /// Wakes the attached connection when a delivery is queued.
    pub wake: Signal,
}

impl SessionState {
    /// Adds or replaces a subscription; whether one with this filter existed.
    pub fn subscribe(&mut self, filter: String, opts: SubOptions) -> bool {
        match self.subscriptions.get_mut(&filter) {
            Some(existing) => {
                if *existing != opts {
                    *existing = opts;
                    self.subscriptions_stored = false;
                }
                true
            }
            None => {
                self.subscriptions.insert(filter, opts);
                self.subscriptions_stored = false;
                false
            }
        }
    }

    /// Removes a subscription; whether it existed.
    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        let removed = self.subscriptions.remove(filter).is_some();
        if removed {
            self.subscriptions_stored = false;
        }
        removed
    }
}

impl Session {
    pub fn new(id: SessionId, client_id: Arc<str>, expiry_secs: u32, version: Version) -> Session {
        Session {
            id,
            client_id,
            state: Mutex::new(SessionState {
                expiry_secs,
                version,
                subscriptions: Subscriptions::default(),
                queue: VecDeque::new(),
                inflight: Vec::new(),
                incoming_qos2: PidSet::default(),
                conn: None,
                disconnected_at_ms: None,
                next_seq: 1,
                pending_will: None,
                will_generation: 0,
                will_timer: None,
                stored: false,
                subscriptions_stored: false,
                ended: false,
            }),
            wake: Signal::default(),
        }
    }

    /// Offers a delivery. An attached session queues everything (up to
    /// `max_queued`); a detached persistent one queues QoS 1/2 only, durably.
    pub fn enqueue(
        &self,
        mut d: Delivery,
        max_queued: usize,
        store: &dyn fleetcore_core::storage::SessionStore,
    ) -> Enqueued {
        let mut st = self.state.lock();
        if st.ended {
            return Enqueued::Dropped("session_ended");
        }
        let attached = st.conn.is_some();
        if !attached && d.qos == QoS::Level0 {
            return Enqueued::Dropped("offline_qos0");
        }
        if st.queue.len() >= max_queued {
            return Enqueued::Dropped("queue_full");
        }
        let result = if !attached && st.expiry_secs > 0 {
            let seq = st.next_seq;
            st.next_seq += 1;
            d.seq = Some(seq);
            Enqueued::Stored(
                store.submit_sessions(vec![fleetcore_core::storage::SessionOp::PutQueued {
                    client_id: self.client_id.to_string(),
                    seq,
                    item: d.to_stored(|| store.next_body_id()),
                }]),
                seq,
            )
        } else {
            Enqueued::Queued
        };
        st.queue.push_back(d);
        drop(st);
        if attached {
            self.wake.notify();
        }
        result
    }

    /// Takes the queued copy with store key `seq` back out (its write failed); a copy
    /// already sent is left to its in-flight window.
    pub fn unqueue(&self, seq: u64) {
        let mut st = self.state.lock();
        if let Some(i) = st.queue.iter().position(|d| d.seq == Some(seq)) {
            st.queue.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn poll_once(s: &Signal) -> Poll<()> {
        let waker = futures_util::task::noop_waker();
        s.poll_notified(&mut Context::from_waker(&waker))
    }

    #[tokio::test]
    async fn a_signal_keeps_a_notification_for_the_next_wait_and_wakes_a_waiter() {
        let s = Arc::new(Signal::default());
        assert!(poll_once(&s).is_pending());
        // Notified while nobody waits: the next wait returns at once, once.
        s.notify();
        assert!(poll_once(&s).is_ready());
        assert!(poll_once(&s).is_pending());
        // A task already waiting is woken.
        let waiting = s.clone();
        let waiter =
            tokio::spawn(async move { std::future::poll_fn(|cx| waiting.poll_notified(cx)).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.notify();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was not woken")
            .unwrap();
    }

    #[test]
    fn subscriptions_keep_their_options_across_the_move_from_vector_to_map() {
        let opts = |qos| SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
            subscription_id: None,
        };
        let mut subs = Subscriptions::default();
        for i in 0..20 {
            assert!(subs.insert(format!("a/{i}/#"), opts(QoS::Level0)).is_none());
            // Replacing one already there, before and after the move to the map.
            let old = subs.insert("a/0/#".into(), opts(QoS::Level1));
            assert_eq!(
                old.map(|o| o.qos),
                Some(if i == 0 { QoS::Level0 } else { QoS::Level1 })
            );
            assert_eq!(subs.len(), i + 1);
        }
        assert_eq!(subs.get("a/0/#").map(|o| o.qos), Some(QoS::Level1));
        assert!(subs.contains_key("a/19/#") && !subs.contains_key("a/20/#"));
        assert_eq!(subs.remove("a/7/#").map(|o| o.qos), Some(QoS::Level0));
        assert!(subs.remove("a/7/#").is_none());
        assert_eq!(subs.iter().count(), 19);
        let mut filters = subs.take_filters();
        filters.sort();
        assert_eq!(filters.len(), 19);
        assert!(!filters.contains(&"a/7/#".to_string()));
        assert!(subs.is_empty());
    }

    #[tokio::test]
    async fn a_kick_sent_before_the_wait_is_received_and_the_first_one_wins() {
        let (tx, mut rx) = kick_slot();
        let kick = |message: &str| Kick {
            reason: DisconnectReasonCode::SessionTakenOver,
            message: message.into(),
        };
        tx.send(kick("first"));
        tx.send(kick("second"));
        let k = std::future::poll_fn(|cx| rx.poll_recv(cx)).await;
        assert_eq!(k.message, "first");
        let waker = futures_util::task::noop_waker();
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
    }

    #[tokio::test]
    async fn a_copy_whose_write_failed_is_taken_back_out_of_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            fleetcore_store::Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let s = Session::new(
            1,
            Arc::from("c1"),
            3600,
            fleetcore_core::protocol::Version::V5,
        );
        let msg = |p: &'static str| crate::message::Delivery {
            msg: Arc::new(fleetcore_core::message::Message::from_publish(
                mqtt_proto::TopicName::try_from("t").unwrap(),
                bytes::Bytes::from_static(p.as_bytes()),
                QoS::Level1,
                false,
                Default::default(),
                0,
            )),
            qos: QoS::Level1,
            retain: false,
            subscription_ids: Vec::new(),
            seq: None,
        };
        let mut seqs = Vec::new();
        for p in ["a", "b", "c"] {
            match s.enqueue(msg(p), 10, &store) {
                Enqueued::Stored(commit, seq) => {
                    commit.await.unwrap();
                    seqs.push(seq);
                }
                _ => panic!("a detached persistent session stores its copies"),
            }
        }
        s.unqueue(seqs[1]);
        s.unqueue(999);
        let left: Vec<_> = s.state.lock().queue.iter().map(|d| d.seq).collect();
        assert_eq!(left, vec![Some(seqs[0]), Some(seqs[2])]);
    }
}
