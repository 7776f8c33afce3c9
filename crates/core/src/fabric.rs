//! The only way out of the node: what a cluster needs to hear from the engine.
//!
//! In single-node mode the [`Standalone`] fabric has nobody to tell: every publish is
//! routed locally, interest stays local, control events have no other node to reach.
//! A cluster fabric (NATS, see `shared/design/cluster-design.md` §3.3) implements the
//! same trait: it subscribes once per distinct filter the node's sessions hold
//! ([`Fabric::interest`]), hands publishes to nodes with interest ([`Fabric::forward`]),
//! and relays control events ([`Fabric::broadcast`]) so a revocation or a trust change
//! on one node reaches every node. What other nodes send comes back into the engine
//! through [`Inbound`], which the engine hands the fabric once it is built
//! ([`Fabric::attach`]). Session claims across nodes are not part of this seam: they are
//! compare-and-set writes of the session store (`SessionStore::claim`).

use crate::message::Message;
use crate::storage::Commit;

/// An event every node must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Cut off every connection authenticated by this certificate.
    KickCertificate { cert_id: String },
    /// The set of trusted CAs changed: rebuild TLS trust.
    TrustChanged,
}

/// The engine as a fabric sees it: where publishes and control events from other nodes go.
pub trait Inbound: Send + Sync + 'static {
    /// A message published on another node, for this node's subscribers: routed here
    /// only, never forwarded again. Retained state is not changed by it (the publishing
    /// node stored that).
    fn remote_publish(&self, msg: Message);
    /// A control event another node broadcast.
    fn remote_control(&self, ev: Control);
}

/// What the engine tells the world outside this node.
pub trait Fabric: Send + Sync + 'static {
    /// The engine is built: what arrives from other nodes goes to `inbound` (held weakly,
    /// since the engine holds the fabric). Called once, before any other call.
    fn attach(&self, inbound: std::sync::Weak<dyn Inbound>) {
        let _ = inbound;
    }
    /// The node's first subscriber to `filter` (with share `group`) came (`on`), or its
    /// last one left. Called under the router's shard lock: must not block.
    fn interest(&self, filter: &str, group: Option<&str>, on: bool);
    /// A message published on this node, for subscribers elsewhere. `Some(commit)` when
    /// its publisher must not be acknowledged before another node stored it.
    fn forward(&self, msg: &Message) -> Option<Commit>;
    /// A control event for the other nodes (this node has acted on it already).
    fn broadcast(&self, ev: &Control);
}

/// Single-node mode: there is no other node.
#[derive(Debug, Default, Clone, Copy)]
pub struct Standalone;

impl Fabric for Standalone {
    fn interest(&self, _filter: &str, _group: Option<&str>, _on: bool) {}

    fn forward(&self, _msg: &Message) -> Option<Commit> {
        None
    }

    fn broadcast(&self, _ev: &Control) {}
}
