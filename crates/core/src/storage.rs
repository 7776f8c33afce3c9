//! What the durable stores keep, and the [`Commit`] that says when a change is on disk.
//!
//! These are the records of the single-node store (`fleetcore-store`, one redb file):
//! retained messages, persistent sessions with their queues, and opaque registry records.
//! The broker, the registry and the services write through one trait per aggregate —
//! [`SessionStore`] (persistent sessions and their queues), [`RetainedStore`] (retained
//! messages), [`RecordStore`] (registry and service records) — handed to them together
//! as a [`Storage`], so none of them knows a database. Each op names one key (a client
//! id, a client id and sequence number, a topic, a record kind and key), so a store
//! without multi-key transactions (a cluster's) can implement the same traits.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Why the store could not do what was asked. Messages are written for an operator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The file could not be created, opened or read at start.
    #[error("cannot open store {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    /// The file was written by a fleetcore with another layout.
    #[error(
        "store {} has schema version {found}, this fleetcore reads version {expected}; \
         use the fleetcore release that wrote it, or move the file away to start empty",
        path.display()
    )]
    SchemaVersion {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// The disk holding the store is full: nothing of the change was written.
    #[error("the disk holding the store is full ({0}); nothing of this change was written")]
    DiskFull(String),
    /// A write transaction failed (an I/O error); its ops are lost.
    #[error("store commit failed: {0}")]
    Io(String),
    /// A record could not be encoded; nothing of its batch was written.
    #[error("cannot encode a store record: {0}")]
    Encode(String),
    /// A record in the file does not decode. On load such records are skipped, not returned.
    #[error("corrupt record in store table `{table}` at key {key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// The writer thread is gone, so nothing more can be written.
    #[error("store is closed: its writer thread has stopped")]
    Closed,
    /// A write carried a [`Fence`] the session no longer has: someone claimed it since
    /// (another node, or a later connection). Nothing of that submit was written; the
    /// writer must stop acting for the session.
    #[error(
        "session {client_id:?} was claimed again (fence {held}, now {current}): write refused"
    )]
    Fenced {
        client_id: String,
        held: u64,
        current: u64,
    },
    /// A record write that expected the record at one revision ([`RecordOp::Expect`])
    /// found it at another: another writer (another node) changed it since this one read
    /// it. The write and the ops after it in its submit were not written.
    #[error(
        "record {kind} {key:?} was changed by another writer (expected {}, found {}): \
         change refused, read it again and retry",
        revision_text(*expected),
        revision_text(*found)
    )]
    Conflict {
        kind: String,
        key: String,
        expected: Option<u64>,
        found: Option<u64>,
    },
}

fn revision_text(r: Option<u64>) -> String {
    match r {
        Some(r) => format!("revision {r}"),
        None => "no record".to_owned(),
    }
}

/// A published message as kept on disk: retained, or inside a queued delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Absolute expiry, unix milliseconds (MQTT 5 message expiry), if any.
    pub expires_at_ms: Option<u64>,
    pub payload_format_utf8: Option<bool>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl StoredMessage {
    /// Rough encoded size, to bound the bytes of one transaction.
    pub fn approx_len(&self) -> usize {
        let props: usize = self
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum();
        32 + self.topic.len()
            + self.payload.len()
            + self.content_type.as_ref().map_or(0, String::len)
            + self.response_topic.as_ref().map_or(0, String::len)
            + self.correlation_data.as_ref().map_or(0, Vec::len)
            + props
    }
}

/// A retained message as the `retained` table keeps it: the message, and when the broker
/// stored it (IoT Core's `lastModifiedTime`). Queued deliveries carry no such time, so it
/// lives here rather than in [`StoredMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRetained {
    /// When this message became the topic's retained message, unix milliseconds.
    pub stored_at_ms: u64,
    pub msg: StoredMessage,
}

/// One delivery waiting for an offline client: the message and how it is to be delivered.
///
/// The message is a body of its own in the store (id `body`), written with the first
/// queued copy and shared by every other copy with the same id: a message queued for
/// 2,000 offline sessions is on disk once. The store counts the references and deletes
/// a body with its last queued copy.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredQueued {
    /// The id of the message's body (never 0), from `Store::next_body_id`.
    pub body: u64,
    pub msg: std::sync::Arc<StoredMessage>,
    /// Delivery QoS (the minimum of the published and the subscribed QoS).
    pub qos: u8,
    /// Retain flag as it will be delivered (retain-as-published applied).
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

/// A subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// As the client sent it, including any `$share/group/` prefix.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// A persistent MQTT session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    pub protocol_version: u8,
    pub expiry_interval_secs: u32,
    /// When the client went away, unix milliseconds; `None` while connected.
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
}

/// Proof of owning a session: handed out by [`SessionStore::claim`], each claim of the
/// same client id a larger one. A write that carries a fence is refused with
/// [`StoreError::Fenced`] once a later claim has been made, so an owner that lost the
/// session (a takeover on another node it never heard of) cannot overwrite what the new
/// owner wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence(pub u64);

/// What [`SessionStore::claim`] found: the new fence and the session as stored (with its
/// queue), if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub fence: Fence,
    pub session: Option<LoadedSession>,
}

/// Resolves to what a claim found, once the claim is durable.
pub type ClaimFuture = Pin<Box<dyn Future<Output = Result<Claimed, StoreError>> + Send>>;

/// One change to the file. The ops of one submit are applied in order, in one transaction.
#[derive(Debug, Clone)]
pub enum Op {
    PutRetained {
        topic: String,
        retained: StoredRetained,
    },
    DeleteRetained {
        topic: String,
    },
    PutSession {
        client_id: String,
        session: StoredSession,
    },
    /// Deletes the session AND every queued message of it.
    DeleteSession {
        client_id: String,
    },
    PutQueued {
        client_id: String,
        seq: u64,
        item: StoredQueued,
    },
    DeleteQueued {
        client_id: String,
        seq: u64,
    },
    /// Writes one registry record (kind: "thing", "certificate", "policy", ...).
    PutRecord {
        kind: &'static str,
        key: String,
        value: Vec<u8>,
    },
    DeleteRecord {
        kind: &'static str,
        key: String,
    },
    /// Applies its submit only if the record is at `revision` (`None`: there is none);
    /// otherwise nothing of the submit is written and it fails with
    /// [`StoreError::Conflict`].
    ExpectRecord {
        kind: &'static str,
        key: String,
        revision: Option<u64>,
    },
    /// Applies the rest of its submit only if `client_id`'s fence is still `fence`;
    /// otherwise nothing of the submit is written and it fails with
    /// [`StoreError::Fenced`].
    CheckFence {
        client_id: String,
        fence: Fence,
    },
    /// Takes the next fence of `client_id` for `owner` and reads its session back.
    ClaimSession {
        client_id: String,
        owner: String,
    },
}

impl Op {
    /// Rough bytes this op adds to a transaction.
    pub fn approx_len(&self) -> usize {
        match self {
            Op::PutRetained { topic, retained } => topic.len() + 8 + retained.msg.approx_len(),
            Op::PutSession { client_id, session } => {
                let subs: usize = session
                    .subscriptions
                    .iter()
                    .map(|s| s.filter.len() + 16)
                    .sum();
                client_id.len() + 32 + subs
            }
            Op::PutQueued {
                client_id, item, ..
            } => client_id.len() + 16 + item.msg.approx_len() + 4 * item.subscription_ids.len(),
            Op::DeleteRetained { topic } => topic.len(),
            Op::PutRecord { kind, key, value } => kind.len() + key.len() + value.len(),
            Op::DeleteRecord { kind, key } | Op::ExpectRecord { kind, key, .. } => {
                kind.len() + key.len()
            }
            Op::DeleteSession { client_id }
            | Op::DeleteQueued { client_id, .. }
            | Op::CheckFence { client_id, .. } => client_id.len() + 8,
            Op::ClaimSession { client_id, owner } => client_id.len() + owner.len() + 8,
        }
    }
}

/// Everything in the file at open, for the broker to rebuild its state from.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Retained messages, in topic order; the topic is inside each.
    pub retained: Vec<StoredRetained>,
    pub sessions: Vec<LoadedSession>,
    /// Registry records as (kind, key, value, revision), in key order (see
    /// [`RecordStore`] for revisions).
    pub records: Vec<(String, String, Vec<u8>, u64)>,
    /// Client ids with something on disk that is not in `sessions`: a session record
    /// that could not be read, or queued messages whose session is missing. The
    /// broker deletes these when the client connects again.
    pub unloaded_sessions: Vec<String>,
}

/// A persistent session with its queue of waiting deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedSession {
    pub client_id: String,
    pub session: StoredSession,
    /// Queued deliveries in ascending `seq`.
    pub queue: Vec<(u64, StoredQueued)>,
}

/// Resolves once the ops of one submit are durable, or with why they are not.
/// A writer that went away gives [`StoreError::Closed`].
///
/// `T` is what a successful commit tells besides: nothing for sessions and retained
/// messages, the records' new revisions for a [`RecordCommit`].
#[must_use = "dropping a Commit loses its result; use Store::submit_nowait when it is not needed"]
pub struct Commit<T = ()> {
    state: CommitState<T>,
}

enum CommitState<T> {
    Done(Result<T, StoreError>),
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    Running(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>),
}

/// The commit of [`RecordStore::submit_records`]: resolves to the revision each
/// `Put`/`Delete` of the submit left its record at, in the order of the ops.
pub type RecordCommit = Commit<Vec<u64>>;

/// The commit of [`RetainedStore::submit_retained`]: resolves to the revision of each op
/// (empty from a store that is the only writer of its retained messages).
pub type RetainedCommit = Commit<Vec<u64>>;

impl<T: Default> Commit<T> {
    /// An already successful commit, for a change that needed no write.
    pub fn ready() -> Commit<T> {
        Commit {
            state: CommitState::Done(Ok(T::default())),
        }
    }
}

impl<T> Commit<T> {
    /// A commit that failed before it was queued.
    pub fn failed(e: StoreError) -> Commit<T> {
        Commit {
            state: CommitState::Done(Err(e)),
        }
    }

    /// A commit the writer completes through `rx`; a dropped sender reads as
    /// [`StoreError::Closed`].
    pub fn waiting(rx: oneshot::Receiver<Result<T, StoreError>>) -> Commit<T> {
        Commit {
            state: CommitState::Waiting(rx),
        }
    }

    /// A commit that resolves as `f` does (another commit, followed by what must happen
    /// once it resolved).
    pub fn from_future(
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Commit<T> {
        Commit {
            state: CommitState::Running(Box::pin(f)),
        }
    }
}

impl<T: Clone + Unpin> Future for Commit<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            CommitState::Done(result) => Poll::Ready(result.clone()),
            CommitState::Waiting(rx) => {
                let result = ready!(Pin::new(rx).poll(cx)).unwrap_or(Err(StoreError::Closed));
                this.state = CommitState::Done(result.clone());
                Poll::Ready(result)
            }
            CommitState::Running(f) => {
                let result = ready!(f.as_mut().poll(cx));
                this.state = CommitState::Done(result.clone());
                Poll::Ready(result)
            }
        }
    }
}

/// One change to a keyed record (a thing, a certificate, a policy, a shadow...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOp {
    /// The next `Put` or `Delete` of this record in the submit is written only if the
    /// record is at `revision` (`None`: it has none, never written or deleted); if not,
    /// neither it nor any later op of the submit is written, and the commit fails with
    /// [`StoreError::Conflict`]. This is how a writer that changed what it read makes
    /// sure nobody changed it in between (a compare-and-set).
    Expect {
        kind: &'static str,
        key: String,
        revision: Option<u64>,
    },
    Put {
        kind: &'static str,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        kind: &'static str,
        key: String,
    },
}

impl From<RecordOp> for Op {
    fn from(op: RecordOp) -> Op {
        match op {
            RecordOp::Put { kind, key, value } => Op::PutRecord { kind, key, value },
            RecordOp::Delete { kind, key } => Op::DeleteRecord { kind, key },
            RecordOp::Expect {
                kind,
                key,
                revision,
            } => Op::ExpectRecord {
                kind,
                key,
                revision,
            },
        }
    }
}

/// Where keyed records live. Records are read once at start ([`Loaded::records`]) and
/// kept in memory by their owner.
///
/// Every write of a record gives it a new revision, larger than every revision the
/// store gave before (on NATS, the stream sequence of the write; on redb, a counter in
/// the file). Revisions order the changes of one record, so a reader that has applied
/// revision r of a record ignores a change it is told later with a revision ≤ r, and a
/// writer expects the revision it read ([`RecordOp::Expect`]).
pub trait RecordStore: Send + Sync + 'static {
    /// Writes `ops`; the commit resolves once they are durable, to the revision of each
    /// `Put`/`Delete` in order. The ops of one submit may be applied together (redb) or
    /// one by one (NATS: the ones stored before a failure stay).
    fn submit_records(&self, ops: Vec<RecordOp>) -> RecordCommit;

    /// The changes other writers of the same records make, in the order they were
    /// stored, from the moment [`Loaded::records`] was read (a change that was already
    /// in what was loaded may come again: applying a change twice must be harmless).
    /// This process's own writes are not in it: it applied them when their commit
    /// resolved. `None` where this process is the only writer (a single node on redb).
    fn watch_records(&self) -> Option<RecordWatch> {
        None
    }
}

/// One stored change to a record, as [`RecordStore::watch_records`] hands it on:
/// `value` is `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChange {
    pub kind: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
    /// The revision the change gave the record.
    pub revision: u64,
}

/// The changes of [`RecordStore::watch_records`]; ends when the store is closed.
pub type RecordWatch = tokio::sync::mpsc::Receiver<RecordChange>;

/// A change to one persistent session or its queue.
///
/// `fence`: `Some` when the writer claimed the session ([`SessionStore::claim`]) and
/// must not write it once someone claimed it after; `None` on a single node, where the
/// broker is the only writer. Queue ops carry no fence: an owner that lost the session
/// can at worst queue a copy twice (QoS 1 allows it) or drop one its client acknowledged.
#[derive(Debug, Clone)]
pub enum SessionOp {
    /// Writes (creates or replaces) the session record.
    Put {
        client_id: String,
        session: StoredSession,
        fence: Option<Fence>,
    },
    /// Deletes the session AND every queued message of it. The session's fence is
    /// kept, so a later claim is still a larger one.
    Delete {
        client_id: String,
        fence: Option<Fence>,
    },
    /// Appends a delivery to the session's queue under `seq` (idempotent: the same
    /// `seq` twice is one delivery).
    PutQueued {
        client_id: String,
        seq: u64,
        item: StoredQueued,
    },
    /// Removes one delivery from the queue (acknowledged, expired or dropped).
    DeleteQueued { client_id: String, seq: u64 },
}

impl SessionOp {
    /// As [`Op`]s of one transaction: a fenced op is preceded by its [`Op::CheckFence`].
    pub fn into_ops(self, out: &mut Vec<Op>) {
        let check = |out: &mut Vec<Op>, client_id: &String, fence: Option<Fence>| {
            if let Some(fence) = fence {
                out.push(Op::CheckFence {
                    client_id: client_id.clone(),
                    fence,
                });
            }
        };
        match self {
            SessionOp::Put {
                client_id,
                session,
                fence,
            } => {
                check(out, &client_id, fence);
                out.push(Op::PutSession { client_id, session });
            }
            SessionOp::Delete { client_id, fence } => {
                check(out, &client_id, fence);
                out.push(Op::DeleteSession { client_id });
            }
            SessionOp::PutQueued {
                client_id,
                seq,
                item,
            } => out.push(Op::PutQueued {
                client_id,
                seq,
                item,
            }),
            SessionOp::DeleteQueued { client_id, seq } => {
                out.push(Op::DeleteQueued { client_id, seq })
            }
        }
    }
}

/// A change to one retained message.
#[derive(Debug, Clone)]
pub enum RetainedOp {
    Put {
        topic: String,
        retained: StoredRetained,
    },
    Delete {
        topic: String,
    },
}

impl From<RetainedOp> for Op {
    fn from(op: RetainedOp) -> Op {
        match op {
            RetainedOp::Put { topic, retained } => Op::PutRetained { topic, retained },
            RetainedOp::Delete { topic } => Op::DeleteRetained { topic },
        }
    }
}

/// Where persistent sessions and their queues live. The ops of one submit may be
/// applied together (redb: one transaction) but each names one session, and the broker
/// never relies on two sessions' ops landing together.
pub trait SessionStore: Send + Sync + 'static {
    /// Writes `ops`; the [`Commit`] resolves once they are durable.
    fn submit_sessions(&self, ops: Vec<SessionOp>) -> Commit;
    /// Writes `ops` without waiting (deletes after acknowledgement, updates nobody
    /// waits for); a failure is logged and counted by the store.
    fn submit_sessions_nowait(&self, ops: Vec<SessionOp>);
    /// A new message body id: every queued copy of one message carries the same id
    /// ([`StoredQueued::body`]), and the body is written once.
    fn next_body_id(&self) -> u64;
    /// Resolves once everything submitted so far is durable (at shutdown).
    fn flush(&self) -> Commit;
    /// Claims `client_id`'s session for `owner` (a node name, for operators): takes a
    /// fence larger than every earlier one, so writes fenced by an earlier claim are
    /// refused from now on, and reads the session and its queue back as stored. Writes
    /// submitted before the claim are applied before it. Resolves once the claim is
    /// durable; two claims racing get different fences, the later one wins.
    fn claim(&self, client_id: &str, owner: &str) -> ClaimFuture;
}

/// Where retained messages live, by topic.
pub trait RetainedStore: Send + Sync + 'static {
    /// Writes `ops`; the commit resolves once they are durable, to the revision each op
    /// gave its topic (ordered as [`RecordStore`] revisions are), or to none where this
    /// process is the only writer (no watch: nothing to order).
    fn submit_retained(&self, ops: Vec<RetainedOp>) -> RetainedCommit;

    /// The retained messages other writers store or delete, as
    /// [`RecordStore::watch_records`] does for records (same order, same rules: this
    /// process's own writes left out, a change already loaded may come again). `None`
    /// where this process is the only writer.
    fn watch_retained(&self) -> Option<RetainedWatch> {
        None
    }
}

/// One stored change to a retained message: `retained` is `None` for a delete.
#[derive(Debug, Clone)]
pub struct RetainedChange {
    pub topic: String,
    pub retained: Option<StoredRetained>,
    /// The revision the change gave the topic.
    pub revision: u64,
}

/// The changes of [`RetainedStore::watch_retained`]; ends when the store is closed.
pub type RetainedWatch = tokio::sync::mpsc::Receiver<RetainedChange>;

/// The stores the broker, the registry and the services write through, handed to the
/// hub at start (see [`SessionStore`], [`RetainedStore`], [`RecordStore`]).
#[derive(Clone)]
pub struct Storage {
    pub sessions: std::sync::Arc<dyn SessionStore>,
    pub retained: std::sync::Arc<dyn RetainedStore>,
    pub records: std::sync::Arc<dyn RecordStore>,
}

impl Storage {
    /// Resolves once everything submitted to the stores so far is durable (shutdown).
    /// The session store's barrier covers all three where they share one writer, as on
    /// a single node; a store with writers of its own acknowledges each write durably,
    /// so it has nothing left to flush.
    pub fn flush(&self) -> Commit {
        self.sessions.flush()
    }
}
