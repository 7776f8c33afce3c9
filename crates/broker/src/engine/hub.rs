//! The hub: state shared by every connection, and the operations on it.
//!
//! It holds the subscription router, the retained-message tree, the session
//! session index, the device registry and the store handle. The publish path reads the router (sharded,
//! read-locked) and the per-session queues (one lock per session); the
//! session-index lock is taken only when clients connect, disconnect or expire.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetcore_core::storage::{LoadedSession, StoredSession, StoredSubscription};
use fleetcore_core::storage::{RetainedOp, SessionOp, Storage};
use mqtt_proto::v5::RetainHandling;
use mqtt_proto::QoS;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::engine::certs::CertIndex;
use crate::engine::services::ServiceHost;
use crate::engine::undo::{Guarded, Undo};
use crate::message::Delivery;
use crate::metrics as m;
use crate::retained::{Retained, RetainedTree};
use crate::router::{Match, Router};
use crate::session::{
    ConnLink, Enqueued, Inflight, Kick, KickReceiver, PendingWill, Session, SessionId, SubOptions,
};
use fleetcore_core::fabric::{Control, Fabric, Inbound, Standalone};
use fleetcore_core::message::Message;
use fleetcore_core::protocol::Version;
use fleetcore_core::service::{
    Event, Handled, Publisher, RefuseCode, Requester, ServiceContext, ServiceRequest,
};
use fleetcore_core::time::now_ms;
use fleetcore_core::topic::{parse_filter, TopicLimits};
use fleetcore_identity::registry::RegistryEvent;

/// What the router stores for one subscription.
#[derive(Debug, Clone)]
pub struct SubEntry {
    pub session: Arc<Session>,
    pub opts: SubOptions,
    /// A shared subscription's filter without its `$share/group/` prefix
    /// (with the group, the key its members are picked by); `None` for the
    /// rest, which would carry an allocation for nothing.
    pub filter: Option<Arc<str>>,
}

/// What a publish did.
/// A store commit (or two) a publish waits for before it is acknowledged.
pub type PendingCommit = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), fleetcore_core::storage::StoreError>> + Send>,
>;

pub struct Routed {
    /// Resolves when the durable copies this publish created are on disk.
    /// `None` when there was nothing to write.
    pub commit: Option<PendingCommit>,
    /// How many subscriptions received it.
    pub matched: usize,
}

#[derive(Default)]
struct SessionIndex {
    sessions: HashMap<Arc<str>, Arc<Session>>,
    /// Client ids with data on disk that no session here stands for (see
    /// `Loaded::unloaded_sessions`): deleted when the client connects.
    unloaded: HashSet<String>,
    /// (deadline unix ms, session id, client id) of detached persistent sessions.
    expiring: BTreeSet<(u64, SessionId, Arc<str>)>,
}

/// What ending a session leaves to do once its lock is let go.
struct Ending {
    filters: Vec<String>,
    will: Option<Box<crate::session::PendingWill>>,
    persistent: bool,
}

/// The result of attaching a connection to a session.
pub struct Attached {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub kick_rx: KickReceiver,
    /// In-flight messages to resend (DUP) before anything new.
    pub resend: Vec<Inflight>,
    pub incoming_qos2: crate::session::PidSet,
}

pub struct Hub {
    pub config: Config,
    pub topic_limits: TopicLimits,
    pub router: Router<SubEntry>,
    pub retained: Arc<RwLock<RetainedTree<Retained>>>,
    /// The store revision of each retained topic as last applied here, where the store
    /// has other writers (cluster mode; empty on a single node): what another node
    /// stored and this node's own writes go into the tree in revision order, so every
    /// node ends with the same message (taken under the tree's lock, after it).
    retained_revisions: Arc<Mutex<HashMap<String, u64>>>,
    index: Mutex<SessionIndex>,
    /// Where sessions, retained messages and records are written (one redb file on a
    /// single node).
    pub storage: Storage,
    /// Things, certificates, policies and their attachments.
    pub registry: Arc<fleetcore_identity::registry::Registry>,
    /// Who provisions unknown certificates of registered CAs at their first CONNECT.
    pub jit: std::sync::OnceLock<Arc<dyn fleetcore_identity::jit::JustInTime>>,
    next_id: AtomicU64,
    shared_rr: AtomicUsize,
    /// Connections currently open (all listeners).
    pub connections: AtomicUsize,
    /// Signalled whenever a connection ends (used to wait for drain at shutdown).
    pub connection_gone: Notify,
    shutdown_tx: watch::Sender<bool>,
    /// TLS configurations of registry listeners, rebuilt when CAs are registered.
    pub tls_sources: Mutex<Vec<Arc<crate::transport::tls::TlsSource>>>,
    /// The `$aws/...` services publishes are dispatched to, and events go to.
    services: ServiceHost,
    /// Live connections by the certificate they authenticated with.
    certs: CertIndex,
    /// The world outside this node.
    fabric: Arc<dyn Fabric>,
}

impl Hub {
    /// Builds the hub and restores retained messages and persistent sessions
    /// from what the store loaded.
    pub fn new(
        config: Config,
        storage: Storage,
        loaded: fleetcore_core::storage::Loaded,
        services: ServiceHost,
    ) -> Arc<Hub> {
        Hub::with_fabric(config, storage, loaded, services, Arc::new(Standalone))
    }

    /// As [`Hub::new`], telling `fabric` about interest, publishes and control events
    /// (a cluster's; [`Standalone`] for one node).
    pub fn with_fabric(
        config: Config,
        storage: Storage,
        loaded: fleetcore_core::storage::Loaded,
        services: ServiceHost,
        fabric: Arc<dyn Fabric>,
    ) -> Arc<Hub> {
        let topic_limits = TopicLimits {
            max_len: config.limits.max_topic_len,
            max_levels: config.limits.max_topic_levels,
        };
        let (shutdown_tx, _) = watch::channel(false);
        let registry = Arc::new(fleetcore_identity::registry::Registry::new(
            storage.records.clone(),
            &loaded.records,
            config.tokens.clone(),
        ));
        let hub = Arc::new(Hub {
            services,
            certs: CertIndex::default(),
            registry,
            jit: std::sync::OnceLock::new(),
            config,
            topic_limits,
            router: {
                let f = fabric.clone();
                Router::with_interest(Box::new(move |filter, group, on| {
                    f.interest(filter, group, on)
                }))
            },
            fabric,
            retained: Arc::new(RwLock::new(RetainedTree::new())),
            retained_revisions: Arc::new(Mutex::new(HashMap::new())),
            index: Mutex::new(SessionIndex::default()),
            storage,
            next_id: AtomicU64::new(1),
            shared_rr: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            connection_gone: Notify::new(),
            shutdown_tx,
            tls_sources: Mutex::new(Vec::new()),
        });
        let now = now_ms();
        {
            let mut tree = hub.retained.write();
            for r in &loaded.retained {
                if let Some(msg) = Message::from_stored(&r.msg) {
                    if !msg.is_expired(now) {
                        let msg = Arc::new(msg);
                        let stored_at_ms = r.stored_at_ms;
                        tree.insert(&r.msg.topic, Retained { msg, stored_at_ms });
                    }
                }
            }
        }
        // One `Message` per stored body, shared by the sessions it is queued for.
        let mut bodies = std::collections::HashMap::new();
        for ls in loaded.sessions {
            hub.restore_session(ls, now, &mut bodies);
        }
        drop(bodies);
        hub.index.lock().unloaded = loaded.unloaded_sessions.into_iter().collect();
        m::gauge_retained(hub.retained.read().len());
        // Weak: the registry is the hub's, a strong pointer back would be a cycle.
        if !hub.services.is_empty() {
            hub.services.start(ServiceContext {
                store: hub.storage.records.clone(),
                records: &loaded.records,
                publisher: Arc::new(WeakPublisher(Arc::downgrade(&hub))),
            });
        }
        let weak = Arc::downgrade(&hub);
        hub.registry.on_event(move |ev| {
            if let Some(hub) = weak.upgrade() {
                hub.on_registry_event(ev);
            }
        });
        let inbound: Arc<dyn Inbound> = hub.clone();
        hub.fabric.attach(Arc::downgrade(&inbound));
        hub
    }

    fn restore_session(
        self: &Arc<Self>,
        ls: LoadedSession,
        now: u64,
        bodies: &mut std::collections::HashMap<u64, Arc<Message>>,
    ) {
        let version = match ls.session.protocol_version {
            5 => Version::V5,
            3 => Version::V31,
            _ => Version::V311,
        };
        let client_id: Arc<str> = Arc::from(ls.client_id.as_str());
        let session = Arc::new(Session::new(
            self.next_session_id(),
            client_id.clone(),
            ls.session.expiry_interval_secs,
            version,
        ));
        let disconnected_at = ls.session.disconnected_at_ms.unwrap_or(now);
        {
            let mut st = session.state.lock();
            st.disconnected_at_ms = Some(disconnected_at);
            st.stored = true;
            let mut max_seq = 0;
            for (seq, q) in &ls.queue {
                max_seq = max_seq.max(*seq);
                if let Some(d) = Delivery::from_stored(*seq, q, bodies) {
                    st.queue.push_back(d);
                }
            }
            st.next_seq = max_seq + 1;
            for sub in &ls.session.subscriptions {
                let Ok(parsed) = parse_filter(&sub.filter, &self.topic_limits) else {
                    tracing::warn!(client_id = %client_id, filter = %sub.filter, "stored subscription no longer valid; dropped");
                    continue;
                };
                let opts = SubOptions {
                    qos: QoS::from_u8(sub.qos).unwrap_or(QoS::Level0),
                    no_local: sub.no_local,
                    retain_as_published: sub.retain_as_published,
                    retain_handling: RetainHandling::from_u8(sub.retain_handling)
                        .unwrap_or(RetainHandling::SendAtSubscribe),
                    subscription_id: sub.subscription_id,
                };
                self.router.subscribe(
                    &parsed.filter,
                    parsed.group.as_deref(),
                    session.id,
                    SubEntry {
                        session: session.clone(),
                        opts: opts.clone(),
                        filter: parsed
                            .group
                            .is_some()
                            .then(|| Arc::from(parsed.filter.as_str())),
                    },
                );
                st.subscriptions.insert(sub.filter.clone(), opts);
            }
            // Exactly what the store holds (subscriptions that no longer parse
            // were dropped here, so then the record must be rewritten).
            st.subscriptions_stored = st.subscriptions.len() == ls.session.subscriptions.len();
        }
        let deadline = disconnected_at + ls.session.expiry_interval_secs as u64 * 1000;
        let mut index = self.index.lock();
        index
            .expiring
            .insert((deadline, session.id, client_id.clone()));
        index.sessions.insert(client_id, session);
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Stops the listeners and tells every attached connection to close
    /// (MQTT 5: DISCONNECT 0x8B). Connections hear it through their kick
    /// slots, so an idle one waits on nothing more than it already does; one
    /// that attaches after this sweep sees the flag in [`Hub::attach`].
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        let sessions: Vec<Arc<Session>> = self.index.lock().sessions.values().cloned().collect();
        for s in sessions {
            if let Some(link) = &s.state.lock().conn {
                link.kick.send(shutdown_kick());
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    pub fn session_count(&self) -> usize {
        self.index.lock().sessions.len()
    }

    // ----- publish -------------------------------------------------------

    /// Whether any `$aws/...` service is installed (events are made only then).
    pub fn has_services(&self) -> bool {
        !self.services.is_empty()
    }

    /// Publishes a client's authorized message: to the service that claims its topic
    /// (`$aws/...` only), else to subscribers as [`Hub::publish`]. `from` is called only
    /// when a service takes the message.
    pub fn publish_from(
        self: &Arc<Self>,
        msg: Message,
        from: impl FnOnce() -> Requester,
    ) -> Result<Routed, (RefuseCode, String)> {
        if let Some(service) = self.services.find(&msg.topic) {
            let out: Arc<dyn Publisher> = self.clone();
            let from = from();
            let handled = service.handle(
                ServiceRequest {
                    message: &msg,
                    from: &from,
                },
                &out,
            );
            match handled {
                Handled::Consumed { commit } => {
                    return Ok(Routed {
                        commit: commit.map(|c| Box::pin(c) as PendingCommit),
                        matched: 1,
                    })
                }
                Handled::Refused { code, why } => return Err((code, why)),
                Handled::PassThrough => {}
            }
        }
        Ok(self.publish(msg))
    }

    /// Tells every service what happened (nothing to do without services).
    pub fn emit(self: &Arc<Self>, ev: Event) {
        if self.services.is_empty() {
            return;
        }
        let out: Arc<dyn Publisher> = self.clone();
        self.services.emit(&ev, &out);
    }

    /// Stores (if retained) and routes one message to every matching
    /// subscription. QoS 1/2 copies for detached persistent sessions and the
    /// retained copy are written to the store; `Routed::commit` resolves once
    /// they are durable.
    pub fn publish(&self, msg: Message) -> Routed {
        self.route(msg, true)
    }

    /// [`Hub::publish`]; `local` false for a message another node published: it was
    /// stored and forwarded there, so here it only goes to this node's subscribers.
    fn route(&self, msg: Message, local: bool) -> Routed {
        let msg = Arc::new(msg);
        let mut commits = Vec::new();
        let mut retained_commit = None;
        if msg.retain && local {
            let topic = msg.topic.to_string();
            // The store op is submitted while the tree is still locked, so
            // memory and disk see concurrent changes to one topic in one order.
            let mut tree = self.retained.write();
            let (op, ours, previous) = if msg.payload.is_empty() {
                let previous = tree.remove(&topic);
                let op = previous.as_ref().map(|_| RetainedOp::Delete {
                    topic: topic.clone(),
                });
                (op, None, previous)
            } else {
                let stored_at_ms = now_ms();
                let retained = Retained {
                    msg: msg.clone(),
                    stored_at_ms,
                };
                let previous = tree.insert(&topic, retained);
                let op = RetainedOp::Put {
                    topic: topic.clone(),
                    retained: fleetcore_core::storage::StoredRetained {
                        stored_at_ms,
                        msg: msg.to_stored(),
                    },
                };
                (Some(op), Some(msg.clone()), previous)
            };
            if let Some(op) = op {
                // If the commit fails the tree is put back, so new subscribers are
                // never served a retained message the disk does not have.
                let commit = self.storage.retained.submit_retained(vec![op]);
                let ordered = retained_written(
                    self.retained.clone(),
                    self.retained_revisions.clone(),
                    topic.clone(),
                    ours.clone(),
                );
                let guarded = Guarded::new(
                    fleetcore_core::storage::Commit::from_future(async move {
                        commit.await.map(ordered)
                    }),
                    undo_retained(self.retained.clone(), topic, ours, previous),
                );
                if msg.qos == QoS::Level0 {
                    drop(guarded); // nobody to tell; the undo still runs on failure
                } else {
                    retained_commit = Some(guarded);
                }
            }
            let n = tree.len();
            drop(tree);
            m::gauge_retained(n);
        }
        let remote_commit = if local {
            self.fabric.forward(&msg)
        } else {
            None
        };
        let mut matches: Vec<Match<SubEntry>> = Vec::new();
        self.router.matches(&msg.topic, &mut matches);
        let mut matched = 0;
        let mut groups: HashMap<(Arc<str>, Arc<str>), Vec<SubEntry>> = HashMap::new();
        let mut direct: Vec<SubEntry> = Vec::with_capacity(matches.len());
        for mt in matches {
            match mt.group {
                Some(g) => groups
                    .entry((g, mt.value.filter.clone().unwrap_or_default()))
                    .or_default()
                    .push(mt.value),
                None => direct.push(mt.value),
            }
        }
        // A session with several matching subscriptions gets one copy, at the
        // highest granted QoS, carrying every subscription identifier.
        if direct.len() > 1 {
            direct.sort_by_key(|e| e.session.id);
        }
        let mut i = 0;
        while i < direct.len() {
            let mut j = i + 1;
            while j < direct.len() && direct[j].session.id == direct[i].session.id {
                j += 1;
            }
            if self.deliver(&msg, &direct[i..j], &mut commits) {
                matched += 1;
            }
            i = j;
        }
        for (_, members) in groups {
            // Round robin, preferring members with a connection attached.
            let start = self.shared_rr.fetch_add(1, Ordering::Relaxed);
            let n = members.len();
            let pick = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| members[i].session.state.lock().conn.is_some())
                .unwrap_or(start % n);
            if self.deliver(&msg, &members[pick..=pick], &mut commits) {
                matched += 1;
            }
        }
        // Another node must store it first (cluster mode); nothing to undo here.
        if let Some(c) = remote_commit {
            commits.push(Guarded::new(c, Box::new(|| {})));
        }
        let rest: Option<PendingCommit> = match commits.len() {
            0 => None,
            1 => commits.pop().map(|c| Box::pin(c) as PendingCommit),
            _ => Some(Box::pin(async move {
                futures_util::future::try_join_all(commits)
                    .await
                    .map(|_| ())
            })),
        };
        let commit: Option<PendingCommit> = match (retained_commit, rest) {
            (None, None) => None,
            (Some(c), None) => Some(Box::pin(c)),
            (None, Some(c)) => Some(c),
            (Some(a), Some(b)) => Some(Box::pin(async move {
                a.await?;
                b.await
            })),
        };
        Routed { commit, matched }
    }

    /// Offers `msg` to one session through its matching subscriptions `subs`.
    fn deliver(&self, msg: &Arc<Message>, subs: &[SubEntry], commits: &mut Vec<Guarded>) -> bool {
        let mut qos = None;
        let mut retain = false;
        let mut subscription_ids = Vec::new();
        for e in subs {
            if e.opts.no_local && msg.origin == e.session.id {
                continue;
            }
            let q = msg.qos.min(e.opts.qos);
            qos = Some(qos.map_or(q, |x: QoS| x.max(q)));
            retain |= e.opts.retain_as_published && msg.retain;
            subscription_ids.extend(e.opts.subscription_id);
        }
        let Some(qos) = qos else { return false };
        let d = Delivery {
            msg: msg.clone(),
            qos,
            retain,
            subscription_ids,
            seq: None,
        };
        let entry = &subs[0];
        match entry.session.enqueue(
            d,
            self.config.limits.max_queued_messages,
            &*self.storage.sessions,
        ) {
            Enqueued::Queued => true,
            Enqueued::Stored(commit, seq) => {
                commits.push(undo_queued(&entry.session, commit, seq));
                true
            }
            Enqueued::Dropped(reason) => {
                m::dropped(reason);
                false
            }
        }
    }

    /// Applies a record another node stored (see `RecordStore::watch_records`): to the
    /// registry, then to the services that keep records of their own.
    pub fn apply_stored_record(&self, kind: &str, key: &str, value: Option<&[u8]>, revision: u64) {
        self.registry.apply_stored(kind, key, value, revision);
        self.services.apply_stored(kind, key, value, revision);
    }

    /// Applies a retained message another node stored or deleted (see
    /// `RetainedStore::watch_retained`) to this node's tree, without writing it: new
    /// subscribers here are served what the other node retained. Its subscribers here had
    /// the publish itself through the fabric. An expired or unreadable message is dropped.
    pub fn apply_stored_retained(&self, change: fleetcore_core::storage::RetainedChange) {
        let mut tree = self.retained.write();
        {
            // A change no newer than what the tree holds (loaded already, or overtaken
            // by a later write of this node or another) changes nothing.
            let mut revisions = self.retained_revisions.lock();
            let known = revisions.entry(change.topic.clone()).or_insert(0);
            if change.revision <= *known {
                return;
            }
            *known = change.revision;
        }
        match change.retained {
            Some(r) => match Message::from_stored(&r.msg) {
                Some(msg) if !msg.is_expired(now_ms()) => {
                    tree.insert(
                        &change.topic,
                        Retained {
                            msg: Arc::new(msg),
                            stored_at_ms: r.stored_at_ms,
                        },
                    );
                }
                _ => {
                    tree.remove(&change.topic);
                }
            },
            None => {
                tree.remove(&change.topic);
            }
        }
        m::gauge_retained(tree.len());
    }

    /// Retained messages matching `filter`, for a new subscription.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained.read().matching(filter, &mut out);
        let now = now_ms();
        out.into_iter()
            .map(|(_, r)| r.msg)
            .filter(|m| !m.is_expired(now))
            .collect()
    }

    // ----- sessions ------------------------------------------------------

    /// Attaches a new connection to the session of `client_id`, taking it
    /// over from any connection already attached (which is told to close
    /// with `kick`). With `clean_start` any existing session is ended first.
    pub async fn attach(
        self: &Arc<Self>,
        client_id: Arc<str>,
        clean_start: bool,
        expiry_secs: u32,
        version: Version,
        conn_id: u64,
        cert_id: Option<Arc<str>>,
    ) -> Attached {
        let mut kicked_once = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let existing = self.index.lock().sessions.get(&client_id).cloned();
            if let Some(s) = &existing {
                let busy = {
                    let mut st = s.state.lock();
                    st.conn.as_mut().map(|l| {
                        let released = l.released.get_or_insert_with(Default::default).clone();
                        (l.conn_id, l.kick.clone(), released)
                    })
                };
                if let Some((old_conn, kick, released)) = busy {
                    // Registered before the link is looked at again, so a release
                    // in between is not missed.
                    let notified = released.notified();
                    let mut notified = std::pin::pin!(notified);
                    notified.as_mut().enable();
                    if !kicked_once {
                        // The old connection handles what its client sent before this
                        // reconnect (a DISCONNECT, say), then detaches.
                        kick.send(Kick {
                            reason: mqtt_proto::v5::DisconnectReasonCode::SessionTakenOver,
                            message: "another connection with the same client id".into(),
                        });
                        kicked_once = true;
                    }
                    let still_attached =
                        || s.state.lock().conn.as_ref().map(|l| l.conn_id) == Some(old_conn);
                    if still_attached() && tokio::time::timeout_at(deadline, notified).await.is_ok()
                    {
                        continue;
                    }
                    let mut st = s.state.lock();
                    if st.conn.as_ref().map(|l| l.conn_id) == Some(old_conn) {
                        // The old connection did not let go in time: detach it by force.
                        tracing::warn!(client_id = %client_id, "previous connection did not close in 5 s; detaching it");
                        st.conn = None;
                    }
                    drop(st);
                    continue;
                }
            }
            let (kick_tx, kick_rx) = crate::session::kick_slot();
            let own_kick = kick_tx.clone();
            let link = ConnLink {
                conn_id,
                kick: kick_tx,
                cert_id: cert_id.clone(),
                released: None,
            };
            match existing {
                Some(old) if !clean_start && old.state.lock().ended => {
                    // Ended (under its lock, by the detach this waited for) and
                    // about to leave the index: a new session follows.
                    tokio::task::yield_now().await;
                    continue;
                }
                Some(old) if !clean_start => {
                    let mut st = old.state.lock();
                    if st.conn.is_some() || st.ended {
                        continue;
                    }
                    let deadline_key = st
                        .disconnected_at_ms
                        .map(|t| (t + st.expiry_secs as u64 * 1000, old.id, client_id.clone()));
                    st.conn = Some(link);
                    st.expiry_secs = expiry_secs;
                    st.version = version;
                    st.disconnected_at_ms = None;
                    // Reconnected in time: a delayed will is not sent.
                    st.pending_will = None;
                    if let Some(t) = st.will_timer.take() {
                        t.abort();
                    }
                    let resend = std::mem::take(&mut st.inflight);
                    let incoming_qos2 = std::mem::take(&mut st.incoming_qos2);
                    let record = (expiry_secs > 0).then(|| stored_session(&st));
                    st.stored |= record.is_some();
                    drop(st);
                    if let Some(k) = deadline_key {
                        self.index.lock().expiring.remove(&k);
                    }
                    match record {
                        Some(rec) => {
                            self.storage
                                .sessions
                                .submit_sessions_nowait(vec![SessionOp::Put {
                                    client_id: client_id.to_string(),
                                    session: rec,
                                    fence: None,
                                }])
                        }
                        None => self.forget_stored_session(&client_id),
                    }
                    // After the link is set (and the session indexed): a
                    // shutdown sweep that began before this check missed it.
                    if self.is_shutting_down() {
                        own_kick.send(shutdown_kick());
                    }
                    return Attached {
                        session: old,
                        session_present: true,
                        kick_rx,
                        resend,
                        incoming_qos2,
                    };
                }
                _ => {
                    let session = Arc::new(Session::new(
                        self.next_session_id(),
                        client_id.clone(),
                        expiry_secs,
                        version,
                    ));
                    session.state.lock().conn = Some(link);
                    let replaced = {
                        let mut index = self.index.lock();
                        let current = index.sessions.get(&client_id).cloned();
                        let same = match (&current, &existing) {
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            (None, None) => true,
                            _ => false,
                        };
                        if !same {
                            continue;
                        }
                        index.sessions.insert(client_id.clone(), session.clone());
                        // Every session on disk was restored into the index, and one
                        // leaves the index only with its record deleted: only what
                        // the store could not load may still be there.
                        let unloaded = current.is_none() && index.unloaded.remove(&*client_id);
                        (current, unloaded)
                    };
                    match replaced {
                        (Some(old), _) => self.end_session(&old, false),
                        (None, true) => self.forget_stored_session(&client_id),
                        (None, false) => {}
                    }
                    if expiry_secs > 0 {
                        let rec = {
                            let mut st = session.state.lock();
                            st.stored = true;
                            stored_session(&st)
                        };
                        self.storage
                            .sessions
                            .submit_sessions_nowait(vec![SessionOp::Put {
                                client_id: client_id.to_string(),
                                session: rec,
                                fence: None,
                            }]);
                    }
                    // After the link is set (and the session indexed): a
                    // shutdown sweep that began before this check missed it.
                    if self.is_shutting_down() {
                        own_kick.send(shutdown_kick());
                    }
                    return Attached {
                        session,
                        session_present: false,
                        kick_rx,
                        resend: Vec::new(),
                        incoming_qos2: Default::default(),
                    };
                }
            }
        }
    }

    fn forget_stored_session(&self, client_id: &str) {
        self.storage
            .sessions
            .submit_sessions_nowait(vec![SessionOp::Delete {
                client_id: client_id.to_string(),
                fence: None,
            }]);
    }

    /// Called by a connection as it ends. Saves what was in flight, then
    /// either ends the session (expiry 0) or keeps it for its expiry interval.
    /// `will` is the will to publish now or after its delay, if the
    /// connection did not end with a normal DISCONNECT.
    pub fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        inflight: Vec<Inflight>,
        incoming_qos2: crate::session::PidSet,
        will: Option<(Message, u32)>,
    ) {
        let mut st = session.state.lock();
        if st.conn.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            // Forced off by a takeover that could not wait: the session now
            // belongs to the new connection. Hand back what was in flight (it
            // goes out again, first) and keep quiet about the will: the client
            // is back.
            if !st.ended {
                for inf in inflight.into_iter().rev() {
                    st.queue.push_front(inf.delivery);
                }
                st.incoming_qos2.extend(incoming_qos2);
            }
            drop(will);
            return;
        }
        st.conn = None;
        let now = now_ms();
        st.disconnected_at_ms = Some(now);
        st.inflight = inflight;
        st.incoming_qos2 = incoming_qos2;
        if st.expiry_secs == 0 || st.ended {
            // Ended while still locked: a reconnect waiting for this detach must
            // not find the session free and not yet ended (it would come back to
            // life, and its new connection be told to close by the ending).
            let ending = Self::end_state(&mut st);
            drop(st);
            if let Some(ending) = ending {
                self.finish_end(session, ending, true);
            }
            if let Some((w, _)) = will {
                self.publish_will(w);
            }
            return;
        }
        // Persist whatever is still only in memory, so a crash while the
        // client is away loses nothing that was queued for it.
        let mut ops = Vec::new();
        let mut next_seq = st.next_seq;
        let client = session.client_id.to_string();
        let parts: &mut crate::session::SessionState = &mut st;
        for d in parts
            .inflight
            .iter_mut()
            .map(|i| &mut i.delivery)
            .chain(parts.queue.iter_mut())
        {
            if d.seq.is_none() && d.qos != QoS::Level0 {
                d.seq = Some(next_seq);
                ops.push(SessionOp::PutQueued {
                    client_id: client.clone(),
                    seq: next_seq,
                    item: d.to_stored(|| self.storage.sessions.next_body_id()),
                });
                next_seq += 1;
            }
        }
        st.queue.retain(|d| d.qos != QoS::Level0);
        st.next_seq = next_seq;
        st.stored = true;
        ops.push(SessionOp::Put {
            client_id: client,
            session: stored_session(&st),
            fence: None,
        });
        let expiry = st.expiry_secs;
        let mut will_due = None;
        if let Some((w, delay)) = will {
            let delay = delay.min(expiry);
            if delay == 0 {
                will_due = Some(w);
            } else {
                st.will_generation += 1;
                let generation = st.will_generation;
                st.pending_will = Some(Box::new(PendingWill { msg: w, generation }));
                let hub = self.clone();
                let s = session.clone();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(delay as u64)).await;
                    hub.fire_pending_will(&s, generation);
                });
                if let Some(old) = st.will_timer.replace(timer.abort_handle()) {
                    old.abort();
                }
            }
        }
        // Submitted before the lock is released, so a reconnecting client's
        // acknowledgements (deletes) can only come after these writes.
        self.storage.sessions.submit_sessions_nowait(ops);
        drop(st);
        self.index.lock().expiring.insert((
            now + expiry as u64 * 1000,
            session.id,
            session.client_id.clone(),
        ));
        if let Some(w) = will_due {
            self.publish_will(w);
        }
    }

    /// Publishes a will; its expiry interval starts now.
    pub fn publish_will(&self, mut will: Message) {
        will.restamp();
        self.publish(will);
    }

    fn fire_pending_will(&self, session: &Arc<Session>, generation: u64) {
        let will = {
            let mut st = session.state.lock();
            match &st.pending_will {
                Some(w) if w.generation == generation => st.pending_will.take(),
                _ => None,
            }
        };
        if let Some(w) = will {
            self.publish_will(w.msg);
        }
    }

    /// Removes a session: its subscriptions, its stored state, and publishes
    /// a will still waiting for its delay.
    pub fn end_session(&self, session: &Arc<Session>, remove_from_index: bool) {
        let ending = Self::end_state(&mut session.state.lock());
        if let Some(ending) = ending {
            self.finish_end(session, ending, remove_from_index);
        }
    }

    /// The part of ending a session done under its lock, so that no reconnect can
    /// attach between the decision to end it and its end: marks it ended, tells a
    /// connection still attached to close, and takes what the rest of the ending
    /// needs. `None` when it had already ended.
    fn end_state(st: &mut crate::session::SessionState) -> Option<Ending> {
        if st.ended {
            return None;
        }
        st.ended = true;
        // A connection still attached (a reconnect racing with expiry) must
        // not live on without its session.
        if let Some(link) = st.conn.take() {
            link.kick.send(Kick {
                reason: mqtt_proto::v5::DisconnectReasonCode::AdministrativeAction,
                message: "session ended".into(),
            });
        }
        st.queue.clear();
        if let Some(t) = st.will_timer.take() {
            t.abort();
        }
        Some(Ending {
            filters: st.subscriptions.take_filters(),
            will: st.pending_will.take(),
            persistent: st.expiry_secs > 0 || st.stored,
        })
    }

    /// The rest of ending a session, after [`Hub::end_state`], without its lock.
    fn finish_end(&self, session: &Arc<Session>, ending: Ending, remove_from_index: bool) {
        for raw in ending.filters {
            if let Ok(p) = parse_filter(&raw, &self.topic_limits) {
                self.router
                    .unsubscribe(&p.filter, p.group.as_deref(), session.id);
            }
        }
        if remove_from_index {
            let mut index = self.index.lock();
            if index
                .sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                index.sessions.remove(&session.client_id);
            }
        }
        if ending.persistent {
            self.forget_stored_session(&session.client_id);
        }
        if let Some(w) = ending.will {
            self.publish_will(w.msg);
        }
        m::gauge_sessions(self.session_count());
    }

    /// Ends detached persistent sessions whose expiry interval has passed.
    /// Returns how many ended.
    pub fn expire_sessions(&self) -> usize {
        let now = now_ms();
        let due: Vec<(u64, SessionId, Arc<str>)> = {
            let mut index = self.index.lock();
            let mut due = Vec::new();
            while let Some(first) = index.expiring.first() {
                if first.0 > now {
                    break;
                }
                if let Some(e) = index.expiring.pop_first() {
                    due.push(e);
                }
            }
            due
        };
        let mut ended = 0;
        for (_, id, client_id) in due {
            let session = self.index.lock().sessions.get(&client_id).cloned();
            let Some(session) = session else { continue };
            if session.id != id {
                continue;
            }
            // Decided and ended under one lock: a reconnect in between keeps it.
            let ending = {
                let mut st = session.state.lock();
                let expired = st.conn.is_none()
                    && st
                        .disconnected_at_ms
                        .is_some_and(|t| t + st.expiry_secs as u64 * 1000 <= now);
                if expired {
                    Self::end_state(&mut st)
                } else {
                    None
                }
            };
            if let Some(ending) = ending {
                tracing::debug!(client_id = %client_id, "session expired");
                self.finish_end(&session, ending, true);
                ended += 1;
            }
        }
        ended
    }

    /// Records the subscription set of a persistent session in the store.
    pub fn persist_session(&self, session: &Session) -> Option<fleetcore_core::storage::Commit> {
        let mut st = session.state.lock();
        if st.expiry_secs == 0 || st.ended {
            return None;
        }
        if st.subscriptions_stored {
            // Every record written since the store's copy was loaded holds
            // these same subscriptions, and that copy is durable: nothing to
            // write, nothing to wait for (a reconnect storm resubscribes).
            return Some(fleetcore_core::storage::Commit::ready());
        }
        st.stored = true;
        let rec = stored_session(&st);
        drop(st);
        Some(self.storage.sessions.submit_sessions(vec![SessionOp::Put {
            client_id: session.client_id.to_string(),
            session: rec,
            fence: None,
        }]))
    }

    /// Acts on a registry change at once: a certificate that left ACTIVE has its
    /// connections cut off (MQTT 5: DISCONNECT 0x87), a changed set of CAs is trusted
    /// by the registry listeners from the next handshake on. Whoever changed the
    /// registry (the admin API, a service), the engine reacts the same way.
    fn on_registry_event(&self, ev: &RegistryEvent) {
        match ev {
            RegistryEvent::CertificateLeftActive { cert_id, state } => {
                let n = self
                    .certs
                    .kick(cert_id, &format!("certificate {cert_id} is now {state}"));
                self.fabric.broadcast(&Control::KickCertificate {
                    cert_id: cert_id.clone(),
                });
                tracing::warn!(certificate = %cert_id, state = %state, connections = n, "certificate left ACTIVE; its connections were cut off");
            }
            RegistryEvent::CasChanged => {
                self.fabric.broadcast(&Control::TrustChanged);
                if let Err(e) = self.reload_trust() {
                    tracing::error!(error = %e, "registered CAs changed but rebuilding TLS trust with them failed; the listeners keep the previous trust");
                }
            }
            // Group membership changes no connection's authorization.
            RegistryEvent::GroupMembershipChanged { .. } => {}
        }
    }

    /// Files a newly attached connection under its certificate, so a revocation
    /// reaches it. A certificate that left ACTIVE between CONNECT's check and now
    /// (its event found nothing to kick) is caught here.
    pub fn track_certificate(&self, cert_id: &Arc<str>, session: &Arc<Session>, conn_id: u64) {
        self.certs.add(cert_id, session, conn_id);
        if let Some(state) = self.registry.certificate_state(cert_id) {
            if state != fleetcore_identity::registry::CertState::Active {
                self.certs
                    .kick(cert_id, &format!("certificate {cert_id} is now {state}"));
            }
        }
    }

    /// Forgets a connection that ended (see [`Hub::track_certificate`]).
    pub fn untrack_certificate(&self, cert_id: &str, conn_id: u64) {
        self.certs.remove(cert_id, conn_id);
    }

    /// Makes registry listeners trust the CAs registered in the registry
    /// (besides their `client_ca_file`), from the next handshake on.
    pub fn reload_trust(&self) -> Result<(), crate::transport::tls::TlsError> {
        let extra: Vec<String> = self.registry.cas().into_iter().map(|c| c.pem).collect();
        for src in self.tls_sources.lock().iter() {
            src.reload(&extra)?;
        }
        Ok(())
    }
}

/// What other nodes send (cluster mode): their publishes go to this node's subscribers,
/// their control events are acted on as if they had happened here.
impl Inbound for Hub {
    fn remote_publish(&self, msg: Message) {
        if self.is_shutting_down() {
            return;
        }
        // A queued copy for a local offline session is written with its undo as for
        // any publish; nobody here waits for it (the publisher was answered by its node).
        drop(self.route(msg, false));
    }

    fn remote_control(&self, ev: Control) {
        match ev {
            Control::KickCertificate { cert_id } => {
                let n = self.certs.kick(
                    &cert_id,
                    &format!("certificate {cert_id} was revoked on another node"),
                );
                tracing::warn!(certificate = %cert_id, connections = n, "certificate left ACTIVE on another node; its connections here were cut off");
            }
            Control::TrustChanged => {
                if let Err(e) = self.reload_trust() {
                    tracing::error!(error = %e, "another node changed the registered CAs but rebuilding TLS trust failed; the listeners keep the previous trust");
                }
            }
        }
    }
}

/// Services answer through the hub: as the broker itself (origin 0), each delivery
/// checked as `iot:Receive` by the subscriber's connection like any other.
impl Publisher for Hub {
    fn publish(&self, msg: Message) -> usize {
        // Durable copies for offline sessions are written; nobody waits for them.
        Hub::publish(self, msg).matched
    }

    fn send_to(&self, client_id: &str, msg: Message) -> bool {
        let Some(session) = self.index.lock().sessions.get(client_id).cloned() else {
            return false;
        };
        let d = Delivery {
            qos: msg.qos,
            msg: Arc::new(msg),
            retain: false,
            subscription_ids: Vec::new(),
            seq: None,
        };
        match session.enqueue(
            d,
            self.config.limits.max_queued_messages,
            &*self.storage.sessions,
        ) {
            Enqueued::Queued => true,
            Enqueued::Stored(commit, seq) => {
                drop(undo_queued(&session, commit, seq));
                true
            }
            Enqueued::Dropped(reason) => {
                m::dropped(reason);
                false
            }
        }
    }
}

/// The hub as a service's lasting [`Publisher`]: weak, since the hub owns the services
/// (a strong pointer back would be a cycle). Once the hub is gone nothing is sent.
struct WeakPublisher(std::sync::Weak<Hub>);

impl Publisher for WeakPublisher {
    fn publish(&self, msg: Message) -> usize {
        self.0
            .upgrade()
            .map_or(0, |hub| Publisher::publish(&*hub, msg))
    }

    fn send_to(&self, client_id: &str, msg: Message) -> bool {
        self.0
            .upgrade()
            .is_some_and(|hub| Publisher::send_to(&*hub, client_id, msg))
    }
}

/// Takes a retained change back if its commit fails: the tree gets `previous` again,
/// unless a later publish changed the topic meanwhile (then that one stands).
/// What follows a durable retained write of this node at the revisions its commit gave:
/// the topic's revision moves to it and the tree holds this node's message (`ours`,
/// `None` for a delete) again, unless a later change (from another node, through the
/// watch) is there already. A store with no other writer gives no revisions, and
/// nothing is done.
fn retained_written(
    retained: Arc<RwLock<RetainedTree<Retained>>>,
    revisions: Arc<Mutex<HashMap<String, u64>>>,
    topic: String,
    ours: Option<Arc<Message>>,
) -> impl FnOnce(Vec<u64>) + Send + 'static {
    move |written| {
        let Some(&revision) = written.first() else {
            return;
        };
        let mut tree = retained.write();
        let mut revisions = revisions.lock();
        let known = revisions.entry(topic.clone()).or_insert(0);
        if revision <= *known {
            return;
        }
        *known = revision;
        match ours {
            Some(msg) => {
                let held = tree.get(&topic).is_some_and(|r| Arc::ptr_eq(&r.msg, &msg));
                if !held {
                    tree.insert(
                        &topic,
                        Retained {
                            msg,
                            stored_at_ms: now_ms(),
                        },
                    );
                }
            }
            None => {
                tree.remove(&topic);
            }
        }
        m::gauge_retained(tree.len());
    }
}

fn undo_retained(
    retained: Arc<RwLock<RetainedTree<Retained>>>,
    topic: String,
    ours: Option<Arc<Message>>,
    previous: Option<Retained>,
) -> Undo {
    Box::new(move || {
        let mut tree = retained.write();
        let still_ours = match (&ours, tree.get(&topic)) {
            (Some(ours), Some(now)) => Arc::ptr_eq(ours, &now.msg),
            (None, None) => true,
            _ => false,
        };
        if still_ours {
            match previous {
                Some(p) => {
                    tree.insert(&topic, p);
                }
                None => {
                    tree.remove(&topic);
                }
            }
        }
        m::gauge_retained(tree.len());
    })
}

/// Takes a queued copy out of an offline session's queue if its commit fails, so the
/// session does not get a message its publisher was told was refused.
fn undo_queued(
    session: &Arc<Session>,
    commit: fleetcore_core::storage::Commit,
    seq: u64,
) -> Guarded {
    let session = session.clone();
    Guarded::new(commit, Box::new(move || session.unqueue(seq)))
}

fn stored_session(st: &crate::session::SessionState) -> StoredSession {
    StoredSession {
        protocol_version: st.version.level(),
        expiry_interval_secs: st.expiry_secs,
        disconnected_at_ms: st.disconnected_at_ms,
        subscriptions: st
            .subscriptions
            .iter()
            .map(|(f, o)| StoredSubscription {
                filter: f.to_owned(),
                qos: o.qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling as u8,
                subscription_id: o.subscription_id,
            })
            .collect(),
    }
}

/// What a connection is told when the server shuts down.
fn shutdown_kick() -> Kick {
    Kick {
        reason: mqtt_proto::v5::DisconnectReasonCode::ServerShuttingDown,
        message: "server shutting down".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_store::{Op, Store, StoreOptions};

    fn sub_opts() -> SubOptions {
        SubOptions {
            qos: QoS::Level1,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
            subscription_id: None,
        }
    }

    /// What a connection does at CONNECT and at a SUBSCRIBE that changes nothing
    /// costs no store write; what must be on disk still is.
    #[tokio::test]
    async fn connect_and_unchanged_resubscribe_write_only_what_they_must() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetcore.redb");
        {
            let (store, _) = Store::open(&path, StoreOptions::default()).unwrap();
            let stored = StoredSession {
                protocol_version: 4,
                expiry_interval_secs: 3600,
                disconnected_at_ms: Some(now_ms()),
                subscriptions: vec![StoredSubscription {
                    filter: "acct1/dev1/#".into(),
                    qos: 1,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                }],
            };
            store
                .submit(vec![
                    Op::PutSession {
                        client_id: "dev1".into(),
                        session: stored,
                    },
                    // Queued for a session that is not on disk.
                    Op::PutQueued {
                        client_id: "orphan".into(),
                        seq: 1,
                        item: fleetcore_store::StoredQueued {
                            body: store.next_body_id(),
                            msg: Arc::new(fleetcore_store::StoredMessage {
                                topic: "t".into(),
                                payload: b"x".to_vec(),
                                qos: 1,
                                retain: false,
                                expires_at_ms: None,
                                payload_format_utf8: None,
                                content_type: None,
                                response_topic: None,
                                correlation_data: None,
                                user_properties: Vec::new(),
                            }),
                            qos: 1,
                            retain: false,
                            subscription_ids: Vec::new(),
                        },
                    },
                ])
                .await
                .unwrap();
        }
        let (store, loaded) = Store::open(&path, StoreOptions::default()).unwrap();
        assert_eq!(loaded.unloaded_sessions, ["orphan"]);
        let hub = Hub::new(
            Config::default(),
            store.storage(),
            loaded,
            ServiceHost::default(),
        );
        let commits = |_: &Arc<Hub>| store.commit_count();
        let commits = &commits;

        // A clean session of a client with nothing on disk: no write at all.
        let clean = hub
            .attach("fresh".into(), true, 0, Version::V311, 1, None)
            .await;
        assert!(!clean.session_present);
        hub.storage.flush().await.unwrap();
        assert_eq!(commits(&hub), 0);

        // A client whose data the store could not load: deleted when it connects.
        hub.attach("orphan".into(), true, 0, Version::V311, 2, None)
            .await;
        hub.storage.flush().await.unwrap();
        assert_eq!(commits(&hub), 1);
        let (store2, loaded2) = {
            drop(hub);
            drop(store);
            Store::open(&path, StoreOptions::default()).unwrap()
        };
        assert!(loaded2.unloaded_sessions.is_empty());
        let hub = Hub::new(
            Config::default(),
            store2.storage(),
            loaded2,
            ServiceHost::default(),
        );
        let commits = |_: &Arc<Hub>| store2.commit_count();

        // A restored session: the reconnect is recorded, resubscribing the same
        // filter with the same options writes nothing and is acknowledged at once.
        let back = hub
            .attach("dev1".into(), false, 3600, Version::V311, 3, None)
            .await;
        assert!(back.session_present);
        hub.storage.flush().await.unwrap();
        let after_attach = commits(&hub);
        assert_eq!(after_attach, 1);
        assert!(back
            .session
            .state
            .lock()
            .subscribe("acct1/dev1/#".into(), sub_opts()));
        hub.persist_session(&back.session).unwrap().await.unwrap();
        hub.storage.flush().await.unwrap();
        assert_eq!(commits(&hub), after_attach);

        // Any change is written (and waited for) as before.
        let mut qos0 = sub_opts();
        qos0.qos = QoS::Level0;
        assert!(back
            .session
            .state
            .lock()
            .subscribe("acct1/dev1/#".into(), qos0));
        hub.persist_session(&back.session).unwrap().await.unwrap();
        assert_eq!(commits(&hub), after_attach + 1);
        // Also once the options are back to what was loaded: the record on disk
        // is no longer the loaded one.
        back.session
            .state
            .lock()
            .subscribe("acct1/dev1/#".into(), sub_opts());
        hub.persist_session(&back.session).unwrap().await.unwrap();
        assert_eq!(commits(&hub), after_attach + 2);
    }

    /// A takeover attaches as soon as the old connection detaches: it waits on the
    /// release of the old link, not by polling (the 5 ms sleep loop it replaced made
    /// the new connection wait up to 5 ms more).
    #[tokio::test(start_paused = true)]
    async fn takeover_attaches_as_soon_as_the_old_connection_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) =
            Store::open(&dir.path().join("fleetcore.redb"), StoreOptions::default()).unwrap();
        let hub = Hub::new(
            Config::default(),
            store.storage(),
            loaded,
            ServiceHost::default(),
        );
        let first = hub
            .attach("twin".into(), false, 0, Version::V5, 1, None)
            .await;
        let start = tokio::time::Instant::now();
        let h = hub.clone();
        let second = tokio::spawn(async move {
            let a = h
                .attach("twin".into(), false, 0, Version::V5, 2, None)
                .await;
            (a, tokio::time::Instant::now())
        });
        let mut kick_rx = first.kick_rx;
        let kick = std::future::poll_fn(|cx| kick_rx.poll_recv(cx)).await;
        assert_eq!(
            kick.reason,
            mqtt_proto::v5::DisconnectReasonCode::SessionTakenOver
        );
        // The old connection takes 2 ms to handle its last input and let go.
        tokio::time::sleep(Duration::from_millis(2)).await;
        hub.detach(&first.session, 1, Vec::new(), Default::default(), None);
        let (attached, at) = second.await.unwrap();
        assert!(!attached.session_present, "expiry 0: the session ended");
        assert_eq!(at - start, Duration::from_millis(2), "attached late");
    }

    /// A DISCONNECT with Session Expiry 0 ends the session in the detach that follows
    /// it; a reconnect (clean start 0) waiting for that detach never finds the session
    /// free but not yet ended: it gets a new session, and nothing tells its connection
    /// to close. Before the fix, the detach let go of the session's lock between taking
    /// the link off and ending it; a reconnect in that gap came back to the old session
    /// (Session Present 1) and was then kicked by the ending, before its CONNACK went
    /// out. Raced on two threads, many times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reconnect_racing_a_detach_with_expiry_0_gets_a_new_session_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) =
            Store::open(&dir.path().join("fleetcore.redb"), StoreOptions::default()).unwrap();
        let hub = Hub::new(
            Config::default(),
            store.storage(),
            loaded,
            ServiceHost::default(),
        );
        let mut conn = 0;
        for round in 0..20_000 {
            conn += 2;
            let old = hub
                .attach("racer".into(), true, 300, Version::V5, conn, None)
                .await;
            // What a DISCONNECT with Session Expiry 0 does to the session.
            old.session.state.lock().expiry_secs = 0;
            let h = hub.clone();
            let new = tokio::spawn(async move {
                h.attach("racer".into(), false, 300, Version::V5, conn + 1, None)
                    .await
            });
            let mut kick_rx = old.kick_rx;
            let _ = std::future::poll_fn(|cx| kick_rx.poll_recv(cx)).await;
            hub.detach(&old.session, conn, Vec::new(), Default::default(), None);
            let mut new = new.await.unwrap();
            assert!(
                !new.session_present,
                "round {round}: the ended session came back"
            );
            let kicked = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match new.kick_rx.poll_recv(cx) {
                    std::task::Poll::Ready(k) => Some(k),
                    std::task::Poll::Pending => None,
                })
            })
            .await;
            assert!(
                kicked.is_none(),
                "round {round}: the new connection was told to close: {:?}",
                kicked.map(|k| k.message)
            );
            hub.detach(&new.session, conn + 1, Vec::new(), Default::default(), None);
        }
    }
}
