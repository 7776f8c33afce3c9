//! The fabric on core NATS: publishes reach the nodes whose sessions hold a matching
//! filter, control events reach every node (`cluster-design.md` §3.3).
//!
//! - **Interest.** A node subscribes once per distinct NATS subject its sessions' filters
//!   map to, reference-counted ([`filter_subjects`]: `+` is `*`, and `#` is two subjects,
//!   the parent and `parent.>`, since MQTT's `a/#` also matches `a`). NATS propagates that
//!   interest, so a publish goes only to the servers, and then the nodes, that want it.
//! - **Forward.** Every publish of this node goes to `<prefix>.m.<T(topic)>`
//!   ([`topic_subject`]), with the whole message (properties, expiry) in the body. The
//!   receiving node matches it against its own router again, so a subject that over-matches
//!   (a `$` topic under `#`, say) costs a wasted hop, never a wrong delivery.
//! - **Once per node.** A message matching two of a node's subjects arrives twice; each
//!   carries its origin node and a sequence number, and a window of the last 4,096
//!   sequences per origin drops the second copy.
//! - **Control** events go to `<prefix>.ctl` and reach every node.
//! - The connection is made with `no_echo`, so a node never hears its own publishes.
//!
//! What this path does not do (yet): a QoS 1 message for a persistent session held by
//! another node is not stored in that session's queue before the publisher is answered
//! (it is delivered live if the session is connected there); that needs the per-session
//! inbox and doorbells of §3.3. Shared subscriptions get one copy per node that holds
//! members, not one per cluster.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use fleetcore_core::fabric::{Control, Fabric, Inbound};
use fleetcore_core::message::Message;
use fleetcore_core::storage::{Commit, StoreError, StoredMessage};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::NatsOptions;

/// Commands waiting for the fabric's task; beyond this many a forward is dropped (and
/// counted) instead of growing memory while NATS is slow.
const QUEUE: usize = 65_536;
/// Sequences per origin remembered to drop the second copy of a message.
const WINDOW: usize = 4_096;

/// The NATS token for one topic level: the level itself when it is made of
/// `[A-Za-z0-9_-]` only, else `~` and the hex of its UTF-8 (so `.`, `*`, `>`, spaces, `$`
/// and the empty level are all representable, and the mapping is one to one).
pub fn level_token(level: &str) -> String {
    if !level.is_empty()
        && level
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return level.to_string();
    }
    let mut out = String::with_capacity(1 + 2 * level.len());
    out.push('~');
    for b in level.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The subject a message on `topic` is published to.
pub fn topic_subject(prefix: &str, topic: &str) -> String {
    let mut s = format!("{prefix}.m");
    for level in topic.split('/') {
        s.push('.');
        s.push_str(&level_token(level));
    }
    s
}

/// The subjects a node subscribes to for an MQTT `filter`: one, or two for a filter
/// ending in `#` (its parent level too; `#` alone is every topic).
pub fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let (body, multi) = match levels.split_last() {
        Some((&"#", rest)) => (rest, true),
        _ => (&levels[..], false),
    };
    let mut base = format!("{prefix}.m");
    for level in body {
        base.push('.');
        if *level == "+" {
            base.push('*');
        } else {
            base.push_str(&level_token(level));
        }
    }
    if !multi {
        return vec![base];
    }
    if body.is_empty() {
        return vec![format!("{base}.>")];
    }
    vec![base.clone(), format!("{base}.>")]
}

/// A forwarded publish as it travels.
#[derive(Serialize, Deserialize)]
struct Envelope {
    origin: u64,
    seq: u64,
    msg: StoredMessage,
}

#[derive(Serialize, Deserialize)]
enum WireControl {
    KickCertificate(String),
    TrustChanged,
}

enum Cmd {
    Interest { subject: String, on: bool },
    Publish { subject: String, body: Bytes },
}

/// Which sequences of each origin were delivered lately.
#[derive(Default)]
struct Seen(HashMap<u64, Box<[u64]>>);

impl Seen {
    /// True the first time `(origin, seq)` is offered (sequences start at 1).
    fn first(&mut self, origin: u64, seq: u64) -> bool {
        let ring = self
            .0
            .entry(origin)
            .or_insert_with(|| vec![0; WINDOW].into_boxed_slice());
        let slot = &mut ring[(seq % WINDOW as u64) as usize];
        if *slot == seq {
            return false;
        }
        *slot = seq;
        true
    }
}

/// What both the command task and the subscription tasks share.
struct Shared {
    inbound: OnceLock<Weak<dyn Inbound>>,
    seen: Mutex<Seen>,
}

impl Shared {
    fn inbound(&self) -> Option<Arc<dyn Inbound>> {
        self.inbound.get().and_then(Weak::upgrade)
    }

    fn received(&self, body: &[u8]) {
        let env: Envelope = match postcard::from_bytes(body) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!("fleetcore_fabric_dropped_total", "reason" => "undecodable")
                    .increment(1);
                tracing::warn!(error = %e, "a forwarded message from another node could not be decoded; dropped");
                return;
            }
        };
        if !self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first(env.origin, env.seq)
        {
            metrics::counter!("fleetcore_fabric_duplicates_total").increment(1);
            return;
        }
        let Some(msg) = Message::from_stored(&env.msg) else {
            metrics::counter!("fleetcore_fabric_dropped_total", "reason" => "bad_topic")
                .increment(1);
            return;
        };
        let Some(inbound) = self.inbound() else {
            metrics::counter!("fleetcore_fabric_dropped_total", "reason" => "not_attached")
                .increment(1);
            return;
        };
        metrics::counter!("fleetcore_fabric_received_total").increment(1);
        inbound.remote_publish(msg);
    }
}

/// The cluster fabric of one node: its own NATS connection (`no_echo`), one task that
/// owns the subscriptions and publishes in order, one task per subscribed subject.
pub struct NatsFabric {
    prefix: String,
    origin: u64,
    seq: AtomicU64,
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl NatsFabric {
    /// Connects to `urls` (with `opts`' credentials and TLS) and starts listening for
    /// control events of installation `opts.prefix`. Must be called inside a tokio runtime.
    pub async fn connect(urls: &[String], opts: &NatsOptions) -> Result<NatsFabric, StoreError> {
        let client = crate::connect_with(urls, opts, true).await?;
        let prefix = opts.prefix.clone();
        let shared = Arc::new(Shared {
            inbound: OnceLock::new(),
            seen: Mutex::new(Seen::default()),
        });
        let control = client
            .subscribe(format!("{prefix}.ctl"))
            .await
            .map_err(|e| StoreError::Io(format!("NATS at {}: subscribe: {e}", urls.join(","))))?;
        let ctl_shared = shared.clone();
        let ctl_task = tokio::spawn(async move {
            let mut control = control;
            while let Some(m) = control.next().await {
                let ev = match postcard::from_bytes::<WireControl>(&m.payload) {
                    Ok(WireControl::KickCertificate(cert_id)) => {
                        Control::KickCertificate { cert_id }
                    }
                    Ok(WireControl::TrustChanged) => Control::TrustChanged,
                    Err(e) => {
                        tracing::warn!(error = %e, "a control event from another node could not be decoded; ignored");
                        continue;
                    }
                };
                metrics::counter!("fleetcore_fabric_control_received_total").increment(1);
                if let Some(inbound) = ctl_shared.inbound() {
                    inbound.remote_control(ev);
                }
            }
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let cmd_task = tokio::spawn(run(client, rx, shared.clone()));
        Ok(NatsFabric {
            prefix,
            origin: rand::random::<u64>() | 1,
            seq: AtomicU64::new(0),
            tx,
            shared,
            tasks: vec![ctl_task, cmd_task],
        })
    }

    fn send(&self, cmd: Cmd, what: &'static str) {
        if self.tx.try_send(cmd).is_err() {
            metrics::counter!("fleetcore_fabric_dropped_total", "reason" => what).increment(1);
        }
    }
}

impl Drop for NatsFabric {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fabric for NatsFabric {
    fn attach(&self, inbound: Weak<dyn Inbound>) {
        let _ = self.shared.inbound.set(inbound);
    }

    fn interest(&self, filter: &str, _group: Option<&str>, on: bool) {
        for subject in filter_subjects(&self.prefix, filter) {
            self.send(Cmd::Interest { subject, on }, "queue_full_interest");
        }
    }

    fn forward(&self, msg: &Message) -> Option<Commit> {
        let env = Envelope {
            origin: self.origin,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            msg: msg.to_stored(),
        };
        match postcard::to_allocvec(&env) {
            Ok(body) => {
                let subject = topic_subject(&self.prefix, &env.msg.topic);
                self.send(
                    Cmd::Publish {
                        subject,
                        body: body.into(),
                    },
                    "queue_full",
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode a message for other nodes"),
        }
        None
    }

    fn broadcast(&self, ev: &Control) {
        let wire = match ev {
            Control::KickCertificate { cert_id } => WireControl::KickCertificate(cert_id.clone()),
            Control::TrustChanged => WireControl::TrustChanged,
        };
        if let Ok(body) = postcard::to_allocvec(&wire) {
            let subject = format!("{}.ctl", self.prefix);
            self.send(
                Cmd::Publish {
                    subject,
                    body: body.into(),
                },
                "queue_full_control",
            );
        }
    }
}

/// The command task: subscriptions (reference-counted per subject) and publishes, in the
/// order the engine made them.
async fn run(client: async_nats::Client, mut rx: mpsc::Receiver<Cmd>, shared: Arc<Shared>) {
    let mut subs: HashMap<String, (usize, JoinHandle<()>)> = HashMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Publish { subject, body } => match client.publish(subject, body).await {
                Ok(()) => metrics::counter!("fleetcore_fabric_forwarded_total").increment(1),
                Err(e) => {
                    metrics::counter!("fleetcore_fabric_dropped_total", "reason" => "publish")
                        .increment(1);
                    tracing::debug!(error = %e, "forwarding to other nodes failed");
                }
            },
            Cmd::Interest { subject, on: true } => {
                if let Some((n, _)) = subs.get_mut(&subject) {
                    *n += 1;
                    continue;
                }
                match client.subscribe(subject.clone()).await {
                    Ok(mut sub) => {
                        let shared = shared.clone();
                        let task = tokio::spawn(async move {
                            while let Some(m) = sub.next().await {
                                shared.received(&m.payload);
                            }
                        });
                        subs.insert(subject, (1, task));
                    }
                    Err(e) => {
                        tracing::error!(subject = %subject, error = %e, "cannot subscribe on NATS; publishes from other nodes to this filter will not arrive")
                    }
                }
            }
            Cmd::Interest { subject, on: false } => {
                if let Some((n, _)) = subs.get_mut(&subject) {
                    *n -= 1;
                    if *n == 0 {
                        if let Some((_, task)) = subs.remove(&subject) {
                            // Dropping the subscriber (with its task) unsubscribes.
                            task.abort();
                        }
                    }
                }
            }
        }
        metrics::gauge!("fleetcore_fabric_subjects").set(subs.len() as f64);
    }
    for (_, (_, task)) in subs {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_outside_the_safe_alphabet_are_escaped_one_to_one() {
        assert_eq!(level_token("device-1_a"), "device-1_a");
        assert_eq!(level_token(""), "~");
        assert_eq!(level_token("a.b"), "~612e62");
        assert_eq!(level_token("*"), "~2a");
        assert_eq!(level_token(">"), "~3e");
        assert_eq!(level_token("~"), "~7e");
        assert_eq!(level_token("$aws"), "~24617773");
        assert_eq!(level_token("a b"), "~612062");
        assert_ne!(level_token("~"), level_token(""));
    }

    #[test]
    fn topics_and_filters_map_to_subjects_that_match_as_mqtt_does() {
        assert_eq!(topic_subject("p", "a/b/c"), "p.m.a.b.c");
        assert_eq!(topic_subject("p", "/a//"), "p.m.~.a.~.~");
        assert_eq!(filter_subjects("p", "a/+/c"), ["p.m.a.*.c"]);
        assert_eq!(filter_subjects("p", "a/#"), ["p.m.a", "p.m.a.>"]);
        assert_eq!(filter_subjects("p", "#"), ["p.m.>"]);
        assert_eq!(filter_subjects("p", "+/#"), ["p.m.*", "p.m.*.>"]);
        assert_eq!(filter_subjects("p", "a/b"), ["p.m.a.b"]);
    }

    #[test]
    fn the_second_copy_of_a_sequence_is_dropped() {
        let mut seen = Seen::default();
        assert!(seen.first(7, 1));
        assert!(!seen.first(7, 1));
        assert!(seen.first(7, 3));
        assert!(seen.first(7, 2));
        assert!(!seen.first(7, 2));
        assert!(seen.first(8, 1), "another origin has its own sequence");
        assert!(seen.first(7, 1 + WINDOW as u64));
        assert!(!seen.first(7, 3));
    }
}
