//! fleetcore's storage on NATS JetStream: the second implementation of the storage traits of
//! `fleetcore_core::storage` ([`SessionStore`], [`RetainedStore`], [`RecordStore`]), for
//! cluster mode (issue #15). This is the first step: nothing in the broker uses it yet.
//!
//! # Buckets and keys
//! Four JetStream KV buckets, created at [`NatsStorage::connect`] if missing, with
//! [`NatsOptions::replicas`] replicas and history 1, named `<prefix>_sessions`,
//! `<prefix>_queue`, `<prefix>_retained`, `<prefix>_records`, plus `<prefix>_meta` for the
//! body-id epoch. Every key part is encoded by [`keys::encode_part`] (base64url, `=` for
//! the empty string), since client ids, topics and record keys may hold any UTF-8:
//!
//! | bucket | key | value |
//! |---|---|---|
//! | sessions | `E(client id)` | postcard `SessionEntry`: the fence of the last claim, its owner and the [`StoredSession`] (none after a fenced delete) |
//! | queue | `E(client id).<seq as 16 hex digits>` | postcard `QueueEntry`: the delivery with its message inline |
//! | retained | `E(topic)` | postcard [`StoredRetained`] |
//! | records | `E(kind).E(key)` | the record's bytes |
//! | meta | `body_epoch` | decimal, the last epoch handed out |
//!
//! Each op is one KV put or delete of one key; `DeleteSession` deletes the session key and
//! then every key the queue bucket lists under `E(client id).>`. A queued message is
//! inlined in each queue entry (redb writes a body once for many copies); the body id is
//! kept with it.
//!
//! # Commits
//! One writer task publishes the ops of every submit in submission order on one
//! connection (so a later submit never overtakes an earlier one on the same key), and an
//! acknowledgement task awaits JetStream's acks in that order. A submit's [`Commit`]
//! resolves once JetStream acknowledged (stored) every op of it, or with the first
//! error. With `sync_interval: always` on the servers an acknowledged op is on disk.
//!
//! # Body ids
//! `next_body_id` is `epoch << 40 | counter`: the epoch is taken at connect by a
//! compare-and-set increment of `body_epoch` in the meta bucket, so every connection (every
//! node, every restart) gets ids of its own; the counter starts at 1.
#![forbid(unsafe_code)]

pub mod fabric;
pub mod keys;
pub mod lease;
pub mod status;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, Context};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use fleetcore_core::storage::{
    ClaimFuture, Claimed, Commit, Fence, Loaded, LoadedSession, RecordChange, RecordCommit,
    RecordOp, RecordStore, RecordWatch, RetainedChange, RetainedCommit, RetainedOp, RetainedStore,
    RetainedWatch, SessionOp, SessionStore, Storage, StoreError, StoredMessage, StoredQueued,
    StoredRetained, StoredSession,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// Bits of a body id below the epoch.
const EPOCH_SHIFT: u32 = 40;
const BODY_EPOCH_KEY: &str = "body_epoch";

/// How to reach and lay out the JetStream buckets.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Bucket names start with this and `_` (letters, digits, `_`, `-`), so several
    /// fleetcore installations (or test runs) can share one NATS account.
    pub prefix: String,
    /// Replicas of each bucket when it is created (1 for a single server, 3 in production).
    /// An existing bucket keeps its own.
    pub replicas: usize,
    /// Name of the connection as NATS shows it.
    pub connection_name: String,
    /// How long a JetStream request or acknowledgement may take before it fails.
    pub request_timeout: Duration,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// CA certificates (PEM) for the servers' TLS certificates; set means TLS is required.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            prefix: "fleetcore".into(),
            replicas: 1,
            connection_name: "fleetcore".into(),
            request_timeout: Duration::from_secs(5),
            credentials_file: None,
            tls_ca_file: None,
            tls_client: None,
        }
    }
}

/// A sessions-bucket value: the session (`None` once a fenced delete removed it) and the
/// fence of its last claim, in one key so that a compare-and-set on the key checks both.
#[derive(Serialize, Deserialize)]
struct SessionEntry {
    fence: u64,
    owner: String,
    session: Option<StoredSession>,
}

/// A queue entry: the delivery, its message inline.
#[derive(Serialize, Deserialize)]
struct QueueEntry {
    body: u64,
    msg: StoredMessage,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bucket {
    Sessions,
    Queue,
    Retained,
    Records,
}

impl Bucket {
    fn suffix(self) -> &'static str {
        match self {
            Bucket::Sessions => "sessions",
            Bucket::Queue => "queue",
            Bucket::Retained => "retained",
            Bucket::Records => "records",
        }
    }
}

/// The four buckets and where they are, for error messages.
struct Buckets {
    /// This connection's name on its record writes (header [`ORIGIN_HEADER`]), so its
    /// own record watch can leave them out.
    origin: String,
    js: Context,
    sessions: kv::Store,
    queue: kv::Store,
    retained: kv::Store,
    records: kv::Store,
    servers: String,
}

impl Buckets {
    fn get(&self, b: Bucket) -> &kv::Store {
        match b {
            Bucket::Sessions => &self.sessions,
            Bucket::Queue => &self.queue,
            Bucket::Retained => &self.retained,
            Bucket::Records => &self.records,
        }
    }

    fn err(&self, b: Bucket, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io(format!(
            "NATS JetStream at {}, bucket {}: {what}: {e}",
            self.servers,
            self.get(b).name
        ))
    }
}

/// One write, ready to publish.
enum Write {
    Put {
        bucket: Bucket,
        key: String,
        value: Bytes,
    },
    Delete {
        bucket: Bucket,
        key: String,
    },
    /// The session key and every queue key of the client (encoded client id).
    DeleteSession {
        client: String,
    },
    /// A session write that holds only while `fence` is the session's: `None` deletes
    /// the session (keeping the fence) and its queue.
    Fenced {
        client: String,
        client_id: String,
        fence: Fence,
        session: Option<StoredSession>,
    },
    /// A record write (a put, or a delete when `value` is `None`) that holds only while
    /// the record is at revision `expect` (`None`: it has no value), or, with `write`
    /// false, only that check ([`RecordOp::Expect`] with no write after it).
    Expecting {
        kind: &'static str,
        record: String,
        key: String,
        expect: Option<u64>,
        value: Option<Bytes>,
        write: bool,
    },
}

/// Who waits for a submit: told nothing besides success, or the revisions its record
/// writes left their keys at.
enum Reply {
    Unit(oneshot::Sender<Result<(), StoreError>>),
    Revisions(oneshot::Sender<Result<Vec<u64>, StoreError>>),
}

impl Reply {
    /// Tells the waiter; gives the error back if it failed and nobody was waiting.
    fn send(self, result: Result<Vec<u64>, StoreError>) -> Result<(), StoreError> {
        let unheard = match self {
            Reply::Unit(tx) => tx.send(result.map(|_| ())).err().map(|r| r.err()),
            Reply::Revisions(tx) => tx.send(result).err().map(|r| r.err()),
        };
        match unheard.flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

enum Request {
    Writes {
        writes: Vec<Write>,
        reply: Option<Reply>,
    },
    Flush(oneshot::Sender<Result<(), StoreError>>),
    Claim {
        client_id: String,
        owner: String,
        reply: oneshot::Sender<Result<Claimed, StoreError>>,
    },
}

/// A write published and not yet acknowledged: its bucket and key, the future of its
/// acknowledgement, and when it was published (for `fleetcore_jetstream_write_seconds`).
type Ack = (
    Bucket,
    String,
    jetstream::context::PublishAckFuture,
    std::time::Instant,
);

/// Acknowledgements to await, in order, then the reply.
struct AckBatch {
    acks: Vec<Ack>,
    /// The stream sequences of writes the writer already saw acknowledged (the
    /// compare-and-set ones), before those of `acks`.
    sequences: Vec<u64>,
    error: Option<StoreError>,
    reply: Option<Reply>,
    /// A flush: also reports a failure of an earlier submit nobody waited for.
    flush: bool,
}

/// Storage on NATS JetStream; cheap to clone. See the crate docs.
#[derive(Clone)]
pub struct NatsStorage {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<Request>,
    next_body: AtomicU64,
    client: async_nats::Client,
    /// The records bucket, its first stream sequence not in what was loaded, and the
    /// origin this connection writes records with (see [`RecordStore::watch_records`]).
    records: kv::Store,
    records_from: u64,
    /// The same for the retained bucket.
    retained: kv::Store,
    retained_from: u64,
    origin: String,
    /// The meta bucket, where leases live.
    meta: kv::Store,
}

impl std::fmt::Debug for NatsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStorage").finish_non_exhaustive()
    }
}

fn open_err(servers: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: PathBuf::from(format!("on NATS JetStream at {servers}")),
        reason: format!("{what}: {e}"),
    }
}

impl NatsStorage {
    /// Connects to `urls`, creates the buckets that are missing and reads everything
    /// into a [`Loaded`] (same rules as the redb store: retained in topic order, sessions
    /// in client id order, queues in seq order, records in (kind, key) order; queued
    /// items without a readable session put the client id in `unloaded_sessions`).
    /// Must be called within a tokio runtime.
    pub async fn connect(
        urls: &[String],
        opts: NatsOptions,
    ) -> Result<(NatsStorage, Loaded), StoreError> {
        let servers = urls.join(",");
        if opts.prefix.is_empty()
            || !opts
                .prefix
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            return Err(open_err(
                &servers,
                "bucket prefix",
                format!("{:?} must be letters, digits, _ or -", opts.prefix),
            ));
        }
        let client = connect_client(urls, &opts).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.request_timeout);

        let open = |b: Bucket| open_bucket(&js, &servers, &opts, b.suffix());
        let buckets = Buckets {
            sessions: open(Bucket::Sessions).await?,
            queue: open(Bucket::Queue).await?,
            retained: open(Bucket::Retained).await?,
            records: open(Bucket::Records).await?,
            origin: format!("{:016x}", rand::random::<u64>()),
            js: js.clone(),
            servers: servers.clone(),
        };
        let meta = open_bucket(&js, &servers, &opts, "meta").await?;
        let epoch = take_epoch(&meta)
            .await
            .map_err(|e| open_err(&servers, "body id epoch", e))?;
        // Read before the records are: a change stored after this is watched (maybe
        // also loaded, which the watcher's applying twice allows).
        let next_seq = |b: &kv::Store| {
            let (stream, name) = (b.stream.clone(), b.name.clone());
            let servers = servers.clone();
            async move {
                stream
                    .get_info()
                    .await
                    .map(|i| i.state.last_sequence + 1)
                    .map_err(|e| open_err(&servers, &format!("stream of {name}"), e))
            }
        };
        let records_from = next_seq(&buckets.records).await?;
        let retained_from = next_seq(&buckets.retained).await?;
        let loaded = load(&buckets).await?;
        let (records, retained, origin) = (
            buckets.records.clone(),
            buckets.retained.clone(),
            buckets.origin.clone(),
        );

        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let buckets = Arc::new(buckets);
        tokio::spawn(acker(ack_rx));
        tokio::spawn(writer(buckets, rx, ack_tx));
        let storage = NatsStorage {
            inner: Arc::new(Inner {
                tx,
                next_body: AtomicU64::new((epoch << EPOCH_SHIFT) | 1),
                client,
                meta,
                records,
                records_from,
                retained,
                retained_from,
                origin,
            }),
        };
        Ok((storage, loaded))
    }

    /// This store as the broker's [`Storage`].
    pub fn storage(&self) -> Storage {
        Storage {
            sessions: Arc::new(self.clone()),
            retained: Arc::new(self.clone()),
            records: Arc::new(self.clone()),
        }
    }

    /// Takes lease `name` (letters, digits, `-`, `_`, `.`) in this installation's meta
    /// bucket for `owner`; see [`lease`].
    pub async fn lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<lease::Lease, lease::LeaseError> {
        lease::Lease::acquire(
            self.inner.meta.clone(),
            &format!("lease.{name}"),
            owner,
            ttl,
        )
        .await
    }

    /// The NATS connection, e.g. for its state.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    fn submit(&self, writes: Result<Vec<Write>, StoreError>) -> Commit {
        let writes = match writes {
            Ok(w) if w.is_empty() => return Commit::ready(),
            Ok(w) => w,
            Err(e) => return Commit::failed(e),
        };
        let (tx, rx) = oneshot::channel();
        match self.inner.tx.send(Request::Writes {
            writes,
            reply: Some(Reply::Unit(tx)),
        }) {
            Ok(()) => Commit::waiting(rx),
            Err(_) => Commit::failed(StoreError::Closed),
        }
    }

    /// Submits `writes`; the commit resolves to the stream sequence of each.
    fn submit_revisions(&self, writes: Vec<Write>) -> RecordCommit {
        if writes.is_empty() {
            return Commit::ready();
        }
        let (tx, rx) = oneshot::channel();
        match self.inner.tx.send(Request::Writes {
            writes,
            reply: Some(Reply::Revisions(tx)),
        }) {
            Ok(()) => Commit::waiting(rx),
            Err(_) => Commit::failed(StoreError::Closed),
        }
    }
}

/// A NATS connection with `opts`' name, timeout, credentials and TLS.
pub(crate) async fn connect_client(
    urls: &[String],
    opts: &NatsOptions,
) -> Result<async_nats::Client, StoreError> {
    connect_with(urls, opts, false).await
}

/// As [`connect_client`]; `no_echo`: the server sends this connection none of its own
/// publishes.
pub(crate) async fn connect_with(
    urls: &[String],
    opts: &NatsOptions,
    no_echo: bool,
) -> Result<async_nats::Client, StoreError> {
    let servers = urls.join(",");
    let mut connect = async_nats::ConnectOptions::new()
        .name(&opts.connection_name)
        .request_timeout(Some(opts.request_timeout));
    if no_echo {
        connect = connect.no_echo();
    }
    if let Some(path) = &opts.credentials_file {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|e| open_err(&servers, &format!("credentials file {}", path.display()), e))?;
    }
    if let Some(ca) = &opts.tls_ca_file {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &opts.tls_client {
        connect = connect.add_client_certificate(cert.clone(), key.clone());
    }
    let client = connect
        .connect(urls)
        .await
        .map_err(|e| open_err(&servers, "connect", e))?;
    Ok(client)
}

async fn open_bucket(
    js: &Context,
    servers: &str,
    opts: &NatsOptions,
    suffix: &str,
) -> Result<kv::Store, StoreError> {
    let name = format!("{}_{suffix}", opts.prefix);
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.clone(),
        description: format!("fleetcore {suffix}"),
        history: 1,
        num_replicas: opts.replicas.max(1),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| open_err(servers, &format!("create bucket {name}"), e))
}

/// Takes the next body-id epoch by compare-and-set on the meta bucket.
async fn take_epoch(meta: &kv::Store) -> Result<u64, String> {
    let mut last = String::new();
    for _ in 0..50 {
        let attempt = match meta.entry(BODY_EPOCH_KEY).await {
            Err(e) => Err(e.to_string()),
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let current: u64 = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("{BODY_EPOCH_KEY} is not a number"))?;
                let next = current + 1;
                meta.update(BODY_EPOCH_KEY, next.to_string().into(), entry.revision)
                    .await
                    .map(|_| next)
                    .map_err(|e| e.to_string())
            }
            Ok(_) => meta
                .create(BODY_EPOCH_KEY, "1".into())
                .await
                .map(|_| 1)
                .map_err(|e| e.to_string()),
        };
        match attempt {
            Ok(epoch) if epoch >= 1 << (64 - EPOCH_SHIFT) => {
                return Err(format!("epoch {epoch} is past the last one"))
            }
            Ok(epoch) => return Ok(epoch),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The live keys under `filter` (a subject below the bucket's prefix, e.g. `>`), with
/// their values unless `headers_only`, in stream order of their last write.
async fn scan(
    store: &kv::Store,
    filter: &str,
    headers_only: bool,
) -> Result<Vec<(String, Bytes, u64)>, String> {
    // A pull consumer: a push one starts sending before its subscription exists.
    let consumer = store
        .stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{}{filter}", store.prefix),
            headers_only,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let info = message.info().map_err(|e| e.to_string())?;
        let (pending, seq) = (info.pending, info.stream_sequence);
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if !deleted {
            if let Some(key) = message.subject.strip_prefix(store.prefix.as_str()) {
                out.push((key.to_string(), message.payload.clone(), seq));
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

fn corrupt(bucket: &kv::Store, key: &str, reason: impl std::fmt::Display) {
    tracing::warn!(bucket = %bucket.name, key, %reason, "skipping a record that does not decode");
}

async fn load(b: &Buckets) -> Result<Loaded, StoreError> {
    let scan_all = |bucket: Bucket| async move {
        scan(b.get(bucket), ">", false).await.map_err(|e| {
            open_err(
                &b.servers,
                &format!("read bucket {}", b.get(bucket).name),
                e,
            )
        })
    };
    let mut loaded = Loaded::default();

    let mut sessions = std::collections::BTreeMap::new();
    let mut unloaded = std::collections::BTreeSet::new();
    for (key, value, _) in scan_all(Bucket::Sessions).await? {
        let Some(client_id) = keys::decode_part(&key) else {
            corrupt(&b.sessions, &key, "key is not an encoded client id");
            continue;
        };
        match postcard::from_bytes::<SessionEntry>(&value) {
            Ok(SessionEntry {
                session: Some(session),
                ..
            }) => {
                sessions.insert(client_id, (session, Vec::new()));
            }
            // Deleted by a fenced delete: only its fence is left.
            Ok(SessionEntry { session: None, .. }) => {}
            Err(e) => {
                corrupt(&b.sessions, &key, e);
                unloaded.insert(client_id);
            }
        }
    }
    for (key, value, _) in scan_all(Bucket::Queue).await? {
        let Some((client_id, seq)) = keys::split2(&key)
            .and_then(|(c, s)| Some((keys::decode_part(c)?, keys::decode_seq(s)?)))
        else {
            corrupt(&b.queue, &key, "key is not an encoded client id and seq");
            continue;
        };
        let entry = match postcard::from_bytes::<QueueEntry>(&value) {
            Ok(entry) => entry,
            Err(e) => {
                corrupt(&b.queue, &key, e);
                continue;
            }
        };
        match sessions.get_mut(&client_id) {
            Some((_, queue)) => queue.push((
                seq,
                StoredQueued {
                    body: entry.body,
                    msg: Arc::new(entry.msg),
                    qos: entry.qos,
                    retain: entry.retain,
                    subscription_ids: entry.subscription_ids,
                },
            )),
            None => {
                unloaded.insert(client_id);
            }
        }
    }
    for (client_id, (session, mut queue)) in sessions {
        queue.sort_by_key(|(seq, _)| *seq);
        loaded.sessions.push(LoadedSession {
            client_id,
            session,
            queue,
        });
    }
    loaded.unloaded_sessions = unloaded.into_iter().collect();

    let mut retained = Vec::new();
    for (key, value, _) in scan_all(Bucket::Retained).await? {
        if keys::decode_part(&key).is_none() {
            corrupt(&b.retained, &key, "key is not an encoded topic");
            continue;
        }
        match postcard::from_bytes::<StoredRetained>(&value) {
            Ok(r) => retained.push(r),
            Err(e) => corrupt(&b.retained, &key, e),
        }
    }
    retained.sort_by(|a, b| a.msg.topic.cmp(&b.msg.topic));
    loaded.retained = retained;

    for (key, value, revision) in scan_all(Bucket::Records).await? {
        let Some((kind, k)) = keys::split2(&key)
            .and_then(|(a, k)| Some((keys::decode_part(a)?, keys::decode_part(k)?)))
        else {
            corrupt(&b.records, &key, "key is not an encoded kind and key");
            continue;
        };
        loaded.records.push((kind, k, value.to_vec(), revision));
    }
    loaded
        .records
        .sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(loaded)
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, StoreError> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Encode(e.to_string()))
}

fn queue_key(client_id: &str, seq: u64) -> String {
    format!("{}.{}", keys::encode_part(client_id), keys::encode_seq(seq))
}

fn record_key(kind: &str, key: &str) -> String {
    format!("{}.{}", keys::encode_part(kind), keys::encode_part(key))
}

fn session_writes(ops: Vec<SessionOp>) -> Result<Vec<Write>, StoreError> {
    ops.into_iter()
        .map(|op| {
            Ok(match op {
                SessionOp::Put {
                    client_id,
                    session,
                    fence: Some(fence),
                } => Write::Fenced {
                    client: keys::encode_part(&client_id),
                    client_id,
                    fence,
                    session: Some(session),
                },
                SessionOp::Delete {
                    client_id,
                    fence: Some(fence),
                } => Write::Fenced {
                    client: keys::encode_part(&client_id),
                    client_id,
                    fence,
                    session: None,
                },
                // Unfenced: a single writer (see `SessionOp`); the entry has no fence.
                SessionOp::Put {
                    client_id,
                    session,
                    fence: None,
                } => Write::Put {
                    bucket: Bucket::Sessions,
                    key: keys::encode_part(&client_id),
                    value: encode(&SessionEntry {
                        fence: 0,
                        owner: String::new(),
                        session: Some(session),
                    })?,
                },
                SessionOp::Delete {
                    client_id,
                    fence: None,
                } => Write::DeleteSession {
                    client: keys::encode_part(&client_id),
                },
                SessionOp::PutQueued {
                    client_id,
                    seq,
                    item,
                } => Write::Put {
                    bucket: Bucket::Queue,
                    key: queue_key(&client_id, seq),
                    value: encode(&QueueEntry {
                        body: item.body,
                        msg: Arc::unwrap_or_clone(item.msg),
                        qos: item.qos,
                        retain: item.retain,
                        subscription_ids: item.subscription_ids,
                    })?,
                },
                SessionOp::DeleteQueued { client_id, seq } => Write::Delete {
                    bucket: Bucket::Queue,
                    key: queue_key(&client_id, seq),
                },
            })
        })
        .collect()
}

fn retained_writes(ops: Vec<RetainedOp>) -> Result<Vec<Write>, StoreError> {
    ops.into_iter()
        .map(|op| {
            Ok(match op {
                RetainedOp::Put { topic, retained } => Write::Put {
                    bucket: Bucket::Retained,
                    key: keys::encode_part(&topic),
                    value: encode(&retained)?,
                },
                RetainedOp::Delete { topic } => Write::Delete {
                    bucket: Bucket::Retained,
                    key: keys::encode_part(&topic),
                },
            })
        })
        .collect()
}

/// The writes of record ops: an `Expect` makes the next write of its record a
/// compare-and-set ([`Write::Expecting`]), or a check of its own when none follows.
fn record_writes(ops: Vec<RecordOp>) -> Vec<Write> {
    let mut out = Vec::with_capacity(ops.len());
    let mut expects: Vec<(&'static str, String, Option<u64>)> = Vec::new();
    for op in ops {
        let (kind, key, value) = match op {
            RecordOp::Expect {
                kind,
                key,
                revision,
            } => {
                expects.push((kind, key, revision));
                continue;
            }
            RecordOp::Put { kind, key, value } => (kind, key, Some(Bytes::from(value))),
            RecordOp::Delete { kind, key } => (kind, key, None),
        };
        match expects.iter().position(|(k, r, _)| *k == kind && *r == key) {
            Some(i) => {
                let (kind, record, expect) = expects.remove(i);
                out.push(Write::Expecting {
                    kind,
                    key: record_key(kind, &record),
                    record,
                    expect,
                    value,
                    write: true,
                });
            }
            None => out.push(match value {
                Some(value) => Write::Put {
                    bucket: Bucket::Records,
                    key: record_key(kind, &key),
                    value,
                },
                None => Write::Delete {
                    bucket: Bucket::Records,
                    key: record_key(kind, &key),
                },
            }),
        }
    }
    for (kind, record, expect) in expects {
        out.push(Write::Expecting {
            kind,
            key: record_key(kind, &record),
            record,
            expect,
            value: None,
            write: false,
        });
    }
    out
}

fn delete_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("KV-Operation", HeaderValue::from("DEL"));
    headers
}

/// Publishes one put or delete; the ack goes to `acks`, a failure to send into `error`.
async fn publish(
    b: &Buckets,
    bucket: Bucket,
    key: String,
    value: Option<Bytes>,
    acks: &mut Vec<Ack>,
    error: &mut Option<StoreError>,
) {
    let subject = format!("{}{key}", b.get(bucket).prefix);
    let started = std::time::Instant::now();
    // Records and retained messages carry their writer's origin (see `watch_bucket`).
    let watched = matches!(bucket, Bucket::Records | Bucket::Retained);
    let sent = match (value, bucket) {
        (Some(v), _) if watched => {
            let mut headers = HeaderMap::new();
            headers.insert(ORIGIN_HEADER, HeaderValue::from(b.origin.as_str()));
            b.js.publish_with_headers(subject, headers, v).await
        }
        (Some(v), _) => b.js.publish(subject, v).await,
        (None, _) => {
            let mut headers = delete_headers();
            if watched {
                headers.insert(ORIGIN_HEADER, HeaderValue::from(b.origin.as_str()));
            }
            b.js.publish_with_headers(subject, headers, Bytes::new())
                .await
        }
    };
    match sent {
        Ok(ack) => acks.push((bucket, key, ack, started)),
        Err(e) => {
            let what = format!("write key {key}");
            error.get_or_insert_with(|| b.err(bucket, &what, e));
        }
    }
}

/// Sessions this node claimed: the fence it holds, the owner name it wrote and the
/// revision of its last write of the key (by encoded client id).
type Owned = std::collections::HashMap<String, (Fence, String, u64)>;

/// Waits until JetStream acknowledged every write published so far (`acks` and what the
/// acker already holds), for a write that must see them stored (a compare-and-set, a
/// listing).
async fn settle(
    ack_tx: &mpsc::UnboundedSender<AckBatch>,
    acks: &mut Vec<Ack>,
) -> Result<(), StoreError> {
    let (tx, rx) = oneshot::channel();
    let _ = ack_tx.send(AckBatch {
        acks: std::mem::take(acks),
        sequences: Vec::new(),
        error: None,
        reply: Some(Reply::Unit(tx)),
        flush: false,
    });
    rx.await.unwrap_or(Err(StoreError::Closed))
}

/// The session entry of `client` as stored: (revision, entry), `None` for a key never
/// written; a delete marker reads as an entry without a session whose fence is the
/// marker's revision (every fence handed out before it is smaller, see [`claim`]).
async fn read_entry(b: &Buckets, client: &str) -> Result<Option<(u64, SessionEntry)>, StoreError> {
    let entry = b
        .sessions
        .entry(client)
        .await
        .map_err(|e| b.err(Bucket::Sessions, &format!("read key {client}"), e))?;
    Ok(entry.map(|e| {
        let value = match e.operation {
            kv::Operation::Put => {
                postcard::from_bytes::<SessionEntry>(&e.value).unwrap_or_else(|err| {
                    corrupt(&b.sessions, client, err);
                    SessionEntry {
                        fence: e.revision,
                        owner: String::new(),
                        session: None,
                    }
                })
            }
            kv::Operation::Delete | kv::Operation::Purge => SessionEntry {
                fence: e.revision,
                owner: String::new(),
                session: None,
            },
        };
        (e.revision, value)
    }))
}

/// Takes the next fence of `client_id` by compare-and-set on its session key and reads
/// the session and its queue back. The new fence is one more than the key's fence, or
/// than a delete marker's revision; as a fence is never larger than the revision of the
/// write that carries it, it is larger than every fence before it.
async fn claim(
    b: &Buckets,
    owned: &mut Owned,
    client_id: &str,
    owner: &str,
) -> Result<Claimed, StoreError> {
    let client = keys::encode_part(client_id);
    let mut last_err = None;
    for _ in 0..20 {
        let current = read_entry(b, &client).await?;
        let (fence, session, written) = match current {
            Some((rev, entry)) => {
                let fence = Fence(entry.fence + 1);
                let value = encode(&SessionEntry {
                    fence: fence.0,
                    owner: owner.to_owned(),
                    session: entry.session.clone(),
                })?;
                (
                    fence,
                    entry.session,
                    b.sessions
                        .update(&client, value, rev)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            None => {
                let fence = Fence(1);
                let value = encode(&SessionEntry {
                    fence: fence.0,
                    owner: owner.to_owned(),
                    session: None,
                })?;
                (
                    fence,
                    None,
                    b.sessions
                        .create(&client, value)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
        };
        match written {
            Ok(rev) => {
                owned.insert(client.clone(), (fence, owner.to_owned(), rev));
                let session = match session {
                    None => None,
                    Some(session) => Some(LoadedSession {
                        client_id: client_id.to_owned(),
                        session,
                        queue: read_queue(b, &client).await?,
                    }),
                };
                metrics::counter!("fleetcore_session_claims_total").increment(1);
                return Ok(Claimed { fence, session });
            }
            // Someone else wrote the key in between: read it again.
            Err(e) => last_err = Some(e),
        }
    }
    Err(b.err(
        Bucket::Sessions,
        &format!("claim key {client} (20 tries)"),
        last_err.unwrap_or_default(),
    ))
}

/// The queue of `client` (encoded client id), in seq order.
async fn read_queue(b: &Buckets, client: &str) -> Result<Vec<(u64, StoredQueued)>, StoreError> {
    let listed = scan(&b.queue, &format!("{client}.>"), false)
        .await
        .map_err(|e| b.err(Bucket::Queue, "read the queue of a claimed session", e))?;
    let mut queue = Vec::new();
    for (key, value, _) in listed {
        let Some(seq) = keys::split2(&key).and_then(|(_, s)| keys::decode_seq(s)) else {
            corrupt(&b.queue, &key, "key is not an encoded client id and seq");
            continue;
        };
        match postcard::from_bytes::<QueueEntry>(&value) {
            Ok(entry) => queue.push((
                seq,
                StoredQueued {
                    body: entry.body,
                    msg: Arc::new(entry.msg),
                    qos: entry.qos,
                    retain: entry.retain,
                    subscription_ids: entry.subscription_ids,
                },
            )),
            Err(e) => corrupt(&b.queue, &key, e),
        }
    }
    queue.sort_by_key(|(seq, _)| *seq);
    Ok(queue)
}

/// A session write that holds only while this node's `fence` is the session's: a
/// compare-and-set on the revision of this node's last write of the key (read again when
/// not known). Refused with [`StoreError::Fenced`] when someone claimed it since.
async fn fenced_write(
    b: &Buckets,
    owned: &mut Owned,
    client: &str,
    client_id: &str,
    fence: Fence,
    session: Option<StoredSession>,
) -> Result<(), StoreError> {
    let refused = |current: u64| StoreError::Fenced {
        client_id: client_id.to_owned(),
        held: fence.0,
        current,
    };
    let (owner, rev) = match owned.get(client) {
        Some((f, owner, rev)) if *f == fence => (owner.clone(), *rev),
        _ => match read_entry(b, client).await? {
            Some((rev, entry)) if entry.fence == fence.0 => (entry.owner, rev),
            Some((_, entry)) => return Err(refused(entry.fence)),
            None => return Err(refused(0)),
        },
    };
    let deleting = session.is_none();
    let value = encode(&SessionEntry {
        fence: fence.0,
        owner: owner.clone(),
        session,
    })?;
    match b.sessions.update(client, value, rev).await {
        Ok(rev) => {
            owned.insert(client.to_owned(), (fence, owner, rev));
        }
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            owned.remove(client);
            let current = read_entry(b, client).await?.map_or(0, |(_, e)| e.fence);
            metrics::counter!("fleetcore_store_fenced_writes_total").increment(1);
            return Err(refused(current));
        }
        Err(e) => {
            owned.remove(client);
            return Err(b.err(Bucket::Sessions, &format!("write key {client}"), e));
        }
    }
    if deleting {
        owned.remove(client);
    }
    Ok(())
}

/// The revision of the record at `key` as stored: `None` when it has no value (never
/// written, or a delete marker).
async fn record_revision(b: &Buckets, key: &str) -> Result<Option<u64>, StoreError> {
    let entry = b
        .records
        .entry(key)
        .await
        .map_err(|e| b.err(Bucket::Records, &format!("read key {key}"), e))?;
    Ok(entry.and_then(|e| (e.operation == kv::Operation::Put).then_some(e.revision)))
}

/// A record write that holds only while the record is at revision `expect` (`None`: it
/// has no value): published with JetStream's expected last subject sequence, and
/// awaited. Returns the stream sequence it was stored at (`None` for a check only);
/// refused with [`StoreError::Conflict`] when another writer changed the record.
async fn expecting_write(
    b: &Buckets,
    kind: &str,
    record: &str,
    key: &str,
    expect: Option<u64>,
    value: Option<Bytes>,
    write: bool,
) -> Result<Option<u64>, StoreError> {
    let conflict = |found: Option<u64>| {
        metrics::counter!("fleetcore_store_conflicts_total").increment(1);
        StoreError::Conflict {
            kind: kind.to_owned(),
            key: record.to_owned(),
            expected: expect,
            found,
        }
    };
    // The last sequence of the key's subject JetStream must find: the expected revision,
    // or for "no value" whatever marks it so (0 when never written, else the revision of
    // its delete marker).
    let last = match expect {
        Some(r) if write => r,
        _ => {
            let entry = b
                .records
                .entry(key)
                .await
                .map_err(|e| b.err(Bucket::Records, &format!("read key {key}"), e))?;
            let found = entry
                .as_ref()
                .and_then(|e| (e.operation == kv::Operation::Put).then_some(e.revision));
            if found != expect {
                return Err(conflict(found));
            }
            if !write {
                return Ok(None);
            }
            entry.map_or(0, |e| e.revision)
        }
    };
    let subject = format!("{}{key}", b.records.prefix);
    let mut headers = match value {
        Some(_) => HeaderMap::new(),
        None => delete_headers(),
    };
    headers.insert(ORIGIN_HEADER, HeaderValue::from(b.origin.as_str()));
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        HeaderValue::from(last.to_string().as_str()),
    );
    let started = std::time::Instant::now();
    let acked = match b
        .js
        .publish_with_headers(subject, headers, value.unwrap_or_default())
        .await
    {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    metrics::histogram!("fleetcore_jetstream_write_seconds", "bucket" => Bucket::Records.suffix())
        .record(started.elapsed().as_secs_f64());
    match acked {
        Ok(ack) => Ok(Some(ack.sequence)),
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
            Err(conflict(record_revision(b, key).await?))
        }
        Err(e) => Err(b.err(Bucket::Records, &format!("write key {key}"), e)),
    }
}

/// Deletes every queue key of `client`, publishing into `acks`.
async fn delete_queue(
    b: &Buckets,
    client: &str,
    acks: &mut Vec<Ack>,
    error: &mut Option<StoreError>,
) {
    match scan(&b.queue, &format!("{client}.>"), true).await {
        Ok(keys) => {
            for (key, _, _) in keys {
                publish(b, Bucket::Queue, key, None, acks, error).await;
            }
        }
        Err(e) => {
            let what = "list the queue of a deleted session";
            error.get_or_insert_with(|| b.err(Bucket::Queue, what, e));
        }
    }
}

/// Publishes every submit's writes in order and hands their acks to the [`acker`].
async fn writer(
    b: Arc<Buckets>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    ack_tx: mpsc::UnboundedSender<AckBatch>,
) {
    let mut owned = Owned::new();
    while let Some(request) = rx.recv().await {
        let (writes, reply) = match request {
            Request::Flush(reply) => {
                let _ = ack_tx.send(AckBatch {
                    acks: Vec::new(),
                    sequences: Vec::new(),
                    error: None,
                    reply: Some(Reply::Unit(reply)),
                    flush: true,
                });
                continue;
            }
            Request::Claim {
                client_id,
                owner,
                reply,
            } => {
                // Writes submitted before the claim are stored before it.
                let result = match settle(&ack_tx, &mut Vec::new()).await {
                    Ok(()) => claim(&b, &mut owned, &client_id, &owner).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
                continue;
            }
            Request::Writes { writes, reply } => (writes, reply),
        };
        let mut acks = Vec::new();
        let mut sequences = Vec::new();
        let mut error = None;
        // A submit with a compare-and-set is written one write at a time, each awaited,
        // so that nothing after a refused one is written.
        let one_by_one = writes.iter().any(|w| matches!(w, Write::Expecting { .. }));
        for write in writes {
            if one_by_one {
                if let Err(e) = settle(&ack_tx, &mut acks).await {
                    error.get_or_insert(e);
                    break;
                }
            }
            match write {
                Write::Put { bucket, key, value } => {
                    if bucket == Bucket::Sessions {
                        // Not fenced: the revision this node knew is stale now.
                        owned.remove(&key);
                    }
                    publish(&b, bucket, key, Some(value), &mut acks, &mut error).await
                }
                Write::Delete { bucket, key } => {
                    publish(&b, bucket, key, None, &mut acks, &mut error).await
                }
                Write::Expecting {
                    kind,
                    record,
                    key,
                    expect,
                    value,
                    write,
                } => match expecting_write(&b, kind, &record, &key, expect, value, write).await {
                    Ok(Some(seq)) => sequences.push(seq),
                    Ok(None) => {}
                    Err(e) => {
                        error.get_or_insert(e);
                        break;
                    }
                },
                Write::DeleteSession { client } => {
                    // Everything published so far must be stored before the queue is
                    // listed, so a queued item just written is deleted too.
                    if let Err(e) = settle(&ack_tx, &mut acks).await {
                        error.get_or_insert(e);
                    }
                    owned.remove(&client);
                    publish(
                        &b,
                        Bucket::Sessions,
                        client.clone(),
                        None,
                        &mut acks,
                        &mut error,
                    )
                    .await;
                    delete_queue(&b, &client, &mut acks, &mut error).await;
                }
                Write::Fenced {
                    client,
                    client_id,
                    fence,
                    session,
                } => {
                    if let Err(e) = settle(&ack_tx, &mut acks).await {
                        error.get_or_insert(e);
                    }
                    let deleting = session.is_none();
                    match fenced_write(&b, &mut owned, &client, &client_id, fence, session).await {
                        Ok(()) if deleting => {
                            delete_queue(&b, &client, &mut acks, &mut error).await
                        }
                        Ok(()) => {}
                        Err(e) => {
                            // Nothing after a refused write of this submit is written.
                            error.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
            if one_by_one {
                // The plain writes among them are acknowledged in order too.
                for (_, _, ack, _) in std::mem::take(&mut acks) {
                    match ack.await {
                        Ok(a) => sequences.push(a.sequence),
                        Err(e) => {
                            error.get_or_insert(StoreError::Io(format!(
                                "NATS JetStream did not acknowledge a record write: {e}"
                            )));
                        }
                    }
                }
                if error.is_some() {
                    break;
                }
            }
        }
        let _ = ack_tx.send(AckBatch {
            acks,
            sequences,
            error,
            reply,
            flush: false,
        });
    }
}

/// Awaits acknowledgements batch by batch, in order, and completes each batch's reply.
async fn acker(mut rx: mpsc::UnboundedReceiver<AckBatch>) {
    let mut unwaited_failure: Option<StoreError> = None;
    while let Some(batch) = rx.recv().await {
        let mut result = batch.error.map_or(Ok(batch.sequences), Err);
        for (bucket, key, ack, published) in batch.acks {
            let acked = ack.await;
            // From the publish to JetStream's acknowledgement: stored on the stream's
            // replicas (with `sync_interval: always`, on their disks).
            metrics::histogram!("fleetcore_jetstream_write_seconds", "bucket" => bucket.suffix())
                .record(published.elapsed().as_secs_f64());
            match (acked, &mut result) {
                (Ok(ack), Ok(sequences)) => sequences.push(ack.sequence),
                (Err(e), Ok(_)) => {
                    result = Err(StoreError::Io(format!(
                        "NATS JetStream did not acknowledge the write of key {key} \
                         in the {} bucket: {e}",
                        bucket.suffix()
                    )));
                }
                (_, Err(_)) => {}
            }
        }
        if batch.flush {
            if let Some(e) = unwaited_failure.take() {
                result = Err(e);
            }
        }
        match batch.reply {
            Some(reply) => {
                if let Err(e) = reply.send(result) {
                    note_failure(&e);
                    unwaited_failure.get_or_insert(e);
                }
            }
            None => {
                if let Err(e) = result {
                    note_failure(&e);
                    unwaited_failure.get_or_insert(e);
                }
            }
        }
    }
}

fn note_failure(e: &StoreError) {
    metrics::counter!("fleetcore_store_errors_total").increment(1);
    tracing::error!(error = %e, "store ops lost");
}

impl SessionStore for NatsStorage {
    fn submit_sessions(&self, ops: Vec<SessionOp>) -> Commit {
        self.submit(session_writes(ops))
    }

    fn submit_sessions_nowait(&self, ops: Vec<SessionOp>) {
        let n = ops.len();
        let sent = session_writes(ops).and_then(|writes| {
            self.inner
                .tx
                .send(Request::Writes {
                    writes,
                    reply: None,
                })
                .map_err(|_| StoreError::Closed)
        });
        if let Err(e) = sent {
            metrics::counter!("fleetcore_store_errors_total").increment(1);
            tracing::error!(error = %e, ops = n, "store ops dropped");
        }
    }

    fn next_body_id(&self) -> u64 {
        self.inner.next_body.fetch_add(1, Ordering::Relaxed)
    }

    fn flush(&self) -> Commit {
        let (tx, rx) = oneshot::channel();
        match self.inner.tx.send(Request::Flush(tx)) {
            Ok(()) => Commit::waiting(rx),
            Err(_) => Commit::failed(StoreError::Closed),
        }
    }

    fn claim(&self, client_id: &str, owner: &str) -> ClaimFuture {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.tx.send(Request::Claim {
            client_id: client_id.to_owned(),
            owner: owner.to_owned(),
            reply: tx,
        });
        Box::pin(async move {
            if sent.is_err() {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        })
    }
}

impl RetainedStore for NatsStorage {
    fn watch_retained(&self) -> Option<RetainedWatch> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(watch_bucket(
            self.inner.retained.clone(),
            self.inner.retained_from,
            self.inner.origin.clone(),
            tx,
            |key, value, revision| {
                let topic =
                    keys::decode_part(key).ok_or("key is not an encoded topic".to_string())?;
                let retained = match value {
                    Some(v) => {
                        Some(postcard::from_bytes::<StoredRetained>(v).map_err(|e| e.to_string())?)
                    }
                    None => None,
                };
                Ok(RetainedChange {
                    topic,
                    retained,
                    revision,
                })
            },
        ));
        Some(rx)
    }

    fn submit_retained(&self, ops: Vec<RetainedOp>) -> RetainedCommit {
        match retained_writes(ops) {
            Ok(writes) => self.submit_revisions(writes),
            Err(e) => Commit::failed(e),
        }
    }
}

impl RecordStore for NatsStorage {
    fn submit_records(&self, ops: Vec<RecordOp>) -> RecordCommit {
        self.submit_revisions(record_writes(ops))
    }

    fn watch_records(&self) -> Option<RecordWatch> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(watch_bucket(
            self.inner.records.clone(),
            self.inner.records_from,
            self.inner.origin.clone(),
            tx,
            |key, value, revision| {
                let (kind, key) = keys::split2(key)
                    .and_then(|(a, k)| Some((keys::decode_part(a)?, keys::decode_part(k)?)))
                    .ok_or("key is not an encoded kind and key".to_string())?;
                Ok(RecordChange {
                    kind,
                    key,
                    value: value.map(<[u8]>::to_vec),
                    revision,
                })
            },
        ));
        Some(rx)
    }
}

/// The header naming the connection that wrote a record (see [`Buckets::origin`]).
const ORIGIN_HEADER: &str = "Fleetcore-Origin";

/// Record changes a watcher may be behind by before the watch waits for it.
const WATCH_QUEUE: usize = 1024;

/// Feeds `tx` with the bucket's changes from stream sequence `from` on (`decode` makes
/// one of a key below the bucket's prefix and its value, `None` for a delete), those
/// written by `origin` left out, until `tx` is dropped. One ordered consumer per watcher,
/// not per key; when it fails, it is made again from the sequence after the last change
/// handed on, so nothing is skipped.
async fn watch_bucket<T: Send + 'static>(
    records: kv::Store,
    mut from: u64,
    origin: String,
    tx: mpsc::Sender<T>,
    decode: impl Fn(&str, Option<&[u8]>, u64) -> Result<T, String> + Send + 'static,
) {
    let mut retry = Duration::from_millis(100);
    loop {
        // A pull consumer: a push one starts sending before its subscription exists,
        // and what it sends in between is lost until it notices the gap.
        let consumer = records
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{}>", records.prefix),
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(bucket = %records.name, error = %e, "record watch: cannot read; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            Err(e) => {
                if tx.is_closed() {
                    return;
                }
                tracing::warn!(bucket = %records.name, error = %e, "record watch: cannot start; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        retry = Duration::from_millis(100);
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(bucket = %records.name, error = %e, "record watch interrupted; resuming");
                    break;
                }
            };
            let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
                continue;
            };
            from = seq + 1;
            let headers = message.headers.as_ref();
            if headers
                .and_then(|h| h.get(ORIGIN_HEADER))
                .is_some_and(|o| o.as_str() == origin)
            {
                continue;
            }
            let deleted = headers
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            let Some(key) = message.subject.strip_prefix(records.prefix.as_str()) else {
                continue;
            };
            let change = match decode(key, (!deleted).then_some(&message.payload[..]), seq) {
                Ok(c) => c,
                Err(why) => {
                    corrupt(&records, key, why);
                    continue;
                }
            };
            metrics::counter!("fleetcore_store_changes_watched_total", "bucket" => records.name.clone())
                .increment(1);
            if tx.send(change).await.is_err() {
                return;
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}
