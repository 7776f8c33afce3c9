//! The seam the `$aws/...` device services plug into.
//!
//! A [`TopicService`] claims topic filters (e.g. `$aws/things/+/shadow/#`). The broker's
//! engine consults the services only for topics that start with `$aws/`, and only after
//! the publishing connection's `iot:Publish` (and `iot:RetainPublish`) was allowed, so a
//! service sees authorized requests only. A service answers through the [`Publisher`] it
//! is handed: [`Publisher::publish`] routes like any other message (each delivery is
//! checked as `iot:Receive` against the subscriber's policy), [`Publisher::send_to`]
//! reaches one client only, whether it subscribed or not (IoT Core's rule for Jobs
//! answers), still checked as `iot:Receive`.
//!
//! The engine also tells every service what happened to connections and subscriptions
//! ([`Event`]), so lifecycle events and Jobs' `notify-next` need no hook of their own.

use std::sync::Arc;

use crate::message::Message;
use crate::storage::{Commit, RecordStore};

/// Who published a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub client_id: Arc<str>,
    /// The thing the connection's certificate or token names, if any.
    pub thing: Option<Arc<str>>,
    /// The certificate id (SHA-256 of the DER), if the client presented one.
    pub cert_id: Option<Arc<str>>,
}

/// An authorized PUBLISH to a topic a service claimed.
#[derive(Debug)]
pub struct ServiceRequest<'a> {
    pub message: &'a Message,
    pub from: &'a Requester,
}

/// What a service did with a request.
#[must_use]
pub enum Handled {
    /// The service took the request; it is not routed to subscribers. A QoS 1/2
    /// request is acknowledged once `commit` (if any) resolves, and with 0x80 if it
    /// fails: a service that writes state hands its commit here so the PUBACK means
    /// "on disk".
    Consumed { commit: Option<Commit> },
    /// Not for this service after all: the engine routes the message as usual.
    PassThrough,
    /// The publish is refused as a protocol matter (e.g. a client publishing to an
    /// answer topic only the service may publish to): MQTT 5 QoS 1/2 publishes get
    /// `code` in their PUBACK/PUBREC with `why` as the reason string; where MQTT
    /// cannot refuse a publish (3.1.1, QoS 0) the connection is closed, as IoT Core
    /// does for an unsupported publish to a reserved topic.
    Refused { code: RefuseCode, why: String },
}

/// The reason code of a [`Handled::Refused`] publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    /// 0x87: the topic is the service's to publish to, not a client's.
    NotAuthorized,
    /// 0x90: the topic is under the service's filter but names no request it serves.
    TopicNameInvalid,
}

impl RefuseCode {
    /// The MQTT 5 reason code byte.
    pub fn code(self) -> u8 {
        match self {
            RefuseCode::NotAuthorized => 0x87,
            RefuseCode::TopicNameInvalid => 0x90,
        }
    }
}

/// A registry record as loaded at start: (kind, key, value, revision); see
/// [`crate::storage::RecordStore`] for revisions.
pub type Record = (String, String, Vec<u8>, u64);

/// What a service that keeps state is handed once at start, before any listener
/// accepts: where to write its records, the records of its kinds as they were on
/// disk, and a [`Publisher`] for answers it sends outside [`TopicService::handle`]
/// (an HTTP request changing a shadow, a timer).
pub struct ServiceContext<'a> {
    pub store: Arc<dyn RecordStore>,
    /// Every record on disk; a service takes the kinds it owns.
    pub records: &'a [Record],
    pub publisher: Arc<dyn Publisher>,
}

/// Where a service's answers go.
pub trait Publisher: Send + Sync {
    /// Publishes `msg` as the broker itself; returns the number of sessions it reached.
    fn publish(&self, msg: Message) -> usize;
    /// Sends `msg` to the client `client_id` only, whether or not it subscribed to the
    /// topic, if it is connected (or has a persistent session). Returns whether it was
    /// queued for it. Delivery is still checked as `iot:Receive`.
    fn send_to(&self, client_id: &str, msg: Message) -> bool;
}

/// Why a connection ended, as the engine knows it; services map it to their own
/// vocabulary (IoT Core's `disconnectReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCause {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// Another connection took the client id over.
    Takeover,
    /// Nothing arrived within 1.5 times the keep-alive.
    KeepAliveTimeout,
    /// The certificate or token stopped being valid, or the policy refused an action
    /// that ends the connection.
    NotAuthorized,
    /// The client broke the protocol (malformed packet, protocol error, limits).
    ClientError,
    /// The broker is shutting down.
    ServerShutdown,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost,
    /// The broker ended the connection for another reason.
    ServerInitiated,
}

/// What happened, for the services to react to.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        client: Requester,
        /// The connection's address (after any PROXY header).
        ip: String,
        /// The connection's number: it grows per client id, and a connect and its
        /// matching disconnect share it.
        version: u64,
        at_ms: u64,
    },
    Disconnected {
        client: Requester,
        cause: DisconnectCause,
        version: u64,
        at_ms: u64,
    },
    Subscribed {
        client: Requester,
        filters: Vec<String>,
        /// The connection's number (as `version` of its `Connected`).
        connection: u64,
        at_ms: u64,
    },
    Unsubscribed {
        client: Requester,
        filters: Vec<String>,
        connection: u64,
        at_ms: u64,
    },
}

/// A device service on `$aws/...` topics.
pub trait TopicService: Send + Sync + 'static {
    /// A short name for logs and metrics ("shadow", "jobs", "events").
    fn name(&self) -> &'static str;
    /// The topic filters whose publishes this service handles; empty for a service
    /// that only reacts to events. Each must start with `$aws/`.
    fn filters(&self) -> Vec<String>;
    /// Handles one authorized publish to a topic matching [`TopicService::filters`].
    fn handle(&self, req: ServiceRequest<'_>, out: &Arc<dyn Publisher>) -> Handled;
    /// Reacts to an engine event; the default ignores it.
    fn on_event(&self, _ev: &Event, _out: &Arc<dyn Publisher>) {}
    /// Called once at start with the store, the records and a publisher; the default
    /// ignores them (a service without state).
    fn start(&self, _ctx: ServiceContext<'_>) {}
    /// A record another node stored (`RecordStore::watch_records`; `value` `None` for a
    /// delete), of any kind: a service that keeps records of its own in memory takes
    /// them in, so requests here see what was written there. `revision` orders the
    /// changes of one record (see [`crate::storage::RecordStore`]): one no newer than
    /// what the service holds is stale. The default ignores it.
    fn apply_stored(&self, _kind: &str, _key: &str, _value: Option<&[u8]>, _revision: u64) {}
}
