//! Durable state of fleetcore in one redb file: retained messages, persistent MQTT sessions
//! (metadata and subscriptions) and the queues of messages waiting for offline clients.
//!
//! # Layout
//! - this file: the records ([`StoredRetained`], [`StoredMessage`], [`StoredSession`],
//!   [`StoredQueued`]), the [`Op`]s that change them, [`Store::open`] (create or open the
//!   file, check the schema version, migrate an older one, load everything into
//!   [`Loaded`]) and the [`Store`] handle the broker submits ops through, with the
//!   [`Commit`] future that tells when they are durable.
//! - `writer`: the one writer thread and its group commit. It blocks for the first request,
//!   drains every request already waiting (up to [`StoreOptions::max_batch_ops`] ops or about
//!   8 MiB), applies them in one write transaction, commits with fsync, and only then
//!   completes the waiters. One fsync covers many publishes; never one per message.
//!
//! # File
//! Tables: `retained` (topic → postcard [`StoredRetained`]), `sessions` (client id →
//! postcard [`StoredSession`]), `queue` ((client id, seq) → postcard `QueueRow`: the
//! delivery with its message's body id), `bodies` (body id → postcard [`StoredMessage`],
//! one per message however many sessions it is queued for; the writer counts the rows
//! that reference each and deletes a body with its last row),
//! `registry` ((kind, key) → bytes: things, certificates, policies) and `meta`
//! (`schema_version` → [`SCHEMA_VERSION`]). A file with a newer or unknown schema
//! version is refused at open; a record that fails to decode is skipped with a warning,
//! so one bad record never stops the broker.
//!
//! # Schema versions and migration
//! - 1: `retained` held a bare [`StoredMessage`].
//! - 2: `retained` holds a [`StoredRetained`]: the message and when it was stored (the
//!   retained-message API's `lastModifiedTime`, which must survive restarts).
//! - 3: `queue` rows reference a body in `bodies` instead of holding the message, so a
//!   64 KiB order queued for 2,000 offline agents is written once, not 2,000 times.
//!   Opening a schema 2 file gives each existing row a body of its own, in one write
//!   transaction (a schema 1 file is migrated to 2 first, in the same transaction).
//!
//! Postcard records carry no field names or lengths, so a field cannot be appended to
//! [`StoredMessage`] with a default for old records, and [`StoredMessage`] is also the
//! message inside every queued delivery, which has no use for the time. Hence a record of
//! its own for the `retained` table and an explicit migration: opening a version 1 file
//! rewrites every `retained` record as a [`StoredRetained`] stamped with the time of the
//! migration (the real time was never recorded; the migration is the latest it can have
//! been) and sets the version to 2, all in one write transaction, so a crash leaves
//! either the old file or the new one. The other tables are not touched. A record that
//! does not decode as version 1 is left as it is (it was skipped at load before, and it
//! is skipped now). A fleetcore that reads only version 1 refuses a migrated file with
//! [`StoreError::SchemaVersion`] instead of misreading it.
#![forbid(unsafe_code)]

mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::Deserialize;
use tokio::sync::oneshot;

pub use fleetcore_core::storage::{
    Commit, Loaded, LoadedSession, Op, StoreError, StoredMessage, StoredQueued, StoredRetained,
    StoredSession, StoredSubscription,
};

use crate::writer::{Reply, Request};

const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
/// Message bodies of queued deliveries: body id -> postcard [`StoredMessage`].
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Registry records (things, certificates, policies, ...): (kind, key) -> opaque bytes.
/// The broker owns their types; the store only keeps them.
const REGISTRY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("registry");
/// Session fences: client id -> the last fence handed out by a claim (postcard
/// `FenceRow`). Made by the first claim (no schema version: a file without it has no
/// claims); a row outlives its session, so fences only grow.
const FENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("fences");
/// The revision of each registry record: (kind, key) -> the value of the `meta` counter
/// [`RECORD_REVISION_KEY`] when it was last written. Made at open (no schema version: a
/// record of an older file without a row is at revision 0); a deleted record has none.
const RECORD_REVISIONS: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("record_revisions");
/// The `meta` key of the last record revision handed out.
const RECORD_REVISION_KEY: &str = "record_revision";

/// A `fences` row: the last claim of a client id.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub(crate) struct FenceRow {
    pub(crate) fence: u64,
    pub(crate) owner: String,
}
const SCHEMA_KEY: &str = "schema_version";
/// The layout of tables and records this code reads and writes (see the module docs).
pub const SCHEMA_VERSION: u64 = 3;
/// The version [`migrate_retained_v1`] upgrades from.
const SCHEMA_V1: u64 = 1;
/// The version [`migrate_queue_v2`] upgrades from.
const SCHEMA_V2: u64 = 2;

/// A `queue` row since schema 3: the delivery, its message by body id.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub(crate) struct QueueRow {
    pub(crate) body: u64,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<u32>,
}

/// A `queue` row of schemas 1 and 2: the message inline.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub(crate) struct QueueRowV2 {
    pub(crate) msg: StoredMessage,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<u32>,
}

/// Tuning of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most ops in one write transaction (one fsync). The ops of a single
    /// [`Store::submit`] are never split, so a larger submit makes a larger transaction.
    pub max_batch_ops: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch_ops: 4096,
        }
    }
}

/// Handle on the store; cheap to clone. When the last clone is dropped the writer commits
/// what is pending and stops, and the drop waits for that (at most one transaction).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("commits", &self.commit_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// `None` only while dropping, so the writer sees the channel close.
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
    /// The next message body id (ids of bodies on disk are below it).
    next_body: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

/// Opens the database file; the writer calls it again to recover after a failed transaction.
pub(crate) type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send>;

impl Store {
    /// Opens or creates the file (creating parent dirs), loads everything, starts the writer thread.
    ///
    /// A new file is created with mode 0600 (owner only, whatever the umask): it holds
    /// the token-signing keys and every session. An existing file keeps its mode.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<(Store, Loaded), StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(path, e))?;
        }
        create_private(path).map_err(|e| open_err(path, e))?;
        let file = path.to_path_buf();
        Store::open_with(path, opts, Box::new(move || Database::create(&file)))
    }

    pub(crate) fn open_with(
        path: &Path,
        opts: StoreOptions,
        opener: Opener,
    ) -> Result<(Store, Loaded), StoreError> {
        let db = opener().map_err(|e| open_err(path, e))?;
        init_schema(&db, path)?;
        let (loaded, refs, max_body) = load(&db).map_err(|e| open_err(path, e))?;
        let commits = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(db, opener, opts.max_batch_ops, commits.clone(), refs);
        let handle = std::thread::Builder::new()
            .name("fleetcore-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| open_err(path, e))?;
        let store = Store {
            inner: Arc::new(Inner {
                tx: Some(tx),
                writer: Some(handle),
                commits,
                next_body: AtomicU64::new(max_body + 1),
            }),
        };
        Ok((store, loaded))
    }

    /// Queue ops for the next group commit; the returned Commit resolves once they are durable (or failed).
    pub fn submit(&self, ops: Vec<Op>) -> Commit {
        if ops.is_empty() {
            return Commit::ready();
        }
        let (tx, rx) = oneshot::channel();
        match self.send(ops, Reply::Async(tx), false) {
            Ok(()) => Commit::waiting(rx),
            Err(e) => Commit::failed(e),
        }
    }

    /// Queue ops without waiting for the result (used for deletes after acknowledgement). Errors are logged and counted.
    pub fn submit_nowait(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let n = ops.len();
        if let Err(e) = self.send(ops, Reply::None, false) {
            metrics::counter!("fleetcore_store_errors_total").increment(1);
            tracing::error!(error = %e, ops = n, "store ops dropped");
        }
    }

    /// Blocks (sync) until everything submitted so far is durable. Used at shutdown.
    ///
    /// Returns the error of a transaction that failed since the previous flush, if any, since
    /// then not everything submitted was written.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Vec::new(), Reply::Blocking(tx), true)?;
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Async version of flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Vec::new(), Reply::Async(tx), true)?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// A new message body id for [`StoredQueued::body`]: every queued copy of one message
    /// carries the same id, and the body is written once.
    pub fn next_body_id(&self) -> u64 {
        self.inner.next_body.fetch_add(1, Ordering::Relaxed)
    }

    /// Write transactions committed since open (each one fsync); for tests and diagnostics.
    pub fn commit_count(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    fn send(&self, ops: Vec<Op>, reply: Reply, flush: bool) -> Result<(), StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request { ops, reply, flush })
            .map_err(|_| StoreError::Closed)
    }

    /// Submits `ops`; the commit resolves to the revisions of their record writes.
    fn submit_revisions(&self, ops: Vec<Op>) -> Commit<Vec<u64>> {
        if ops.is_empty() {
            return Commit::ready();
        }
        let (tx, rx) = oneshot::channel();
        match self.send(ops, Reply::Records(tx), false) {
            Ok(()) => Commit::waiting(rx),
            Err(e) => Commit::failed(e),
        }
    }
}

impl fleetcore_core::storage::RecordStore for Store {
    fn submit_records(
        &self,
        ops: Vec<fleetcore_core::storage::RecordOp>,
    ) -> fleetcore_core::storage::RecordCommit {
        self.submit_revisions(ops.into_iter().map(Op::from).collect())
    }
}

fn session_ops(ops: Vec<fleetcore_core::storage::SessionOp>) -> Vec<Op> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        op.into_ops(&mut out);
    }
    out
}

impl fleetcore_core::storage::SessionStore for Store {
    fn submit_sessions(&self, ops: Vec<fleetcore_core::storage::SessionOp>) -> Commit {
        self.submit(session_ops(ops))
    }

    fn submit_sessions_nowait(&self, ops: Vec<fleetcore_core::storage::SessionOp>) {
        self.submit_nowait(session_ops(ops))
    }

    fn claim(&self, client_id: &str, owner: &str) -> fleetcore_core::storage::ClaimFuture {
        let (tx, rx) = oneshot::channel();
        let op = Op::ClaimSession {
            client_id: client_id.to_owned(),
            owner: owner.to_owned(),
        };
        let sent = self.send(vec![op], Reply::Claim(tx), false);
        Box::pin(async move {
            sent?;
            rx.await.unwrap_or(Err(StoreError::Closed))
        })
    }

    fn next_body_id(&self) -> u64 {
        Store::next_body_id(self)
    }

    fn flush(&self) -> Commit {
        let (tx, rx) = oneshot::channel();
        match self.send(Vec::new(), Reply::Async(tx), true) {
            Ok(()) => Commit::waiting(rx),
            Err(e) => Commit::failed(e),
        }
    }
}

impl fleetcore_core::storage::RetainedStore for Store {
    /// Resolves to no revisions: this process is the only writer (see the trait).
    fn submit_retained(
        &self,
        ops: Vec<fleetcore_core::storage::RetainedOp>,
    ) -> fleetcore_core::storage::RetainedCommit {
        self.submit_revisions(ops.into_iter().map(Op::from).collect())
    }
}

impl Store {
    /// This store as the broker's [`fleetcore_core::storage::Storage`]: one redb file for
    /// sessions, retained messages and records alike.
    pub fn storage(&self) -> fleetcore_core::storage::Storage {
        fleetcore_core::storage::Storage {
            sessions: Arc::new(self.clone()),
            retained: Arc::new(self.clone()),
            records: Arc::new(self.clone()),
        }
    }
}

/// Creates `path` empty with mode 0600 unless it exists; redb then takes an empty file
/// as a new database.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Creates the tables of a new file, migrates a version 1 file, and refuses a file of
/// any other schema version.
fn init_schema(db: &Database, path: &Path) -> Result<(), StoreError> {
    let redb_err = |e: redb::Error| open_err(path, e);
    let txn = db.begin_write().map_err(|e| redb_err(e.into()))?;
    let found = {
        let meta = txn.open_table(META).map_err(|e| redb_err(e.into()))?;
        let found = meta.get(SCHEMA_KEY).map_err(|e| redb_err(e.into()))?;
        found.map(|v| v.value())
    };
    match found {
        Some(SCHEMA_VERSION) => {}
        Some(v @ (SCHEMA_V1 | SCHEMA_V2)) => {
            if v == SCHEMA_V1 {
                let n = migrate_retained_v1(&txn, fleetcore_core::time::now_ms())
                    .map_err(|e| open_err(path, format!("migrating schema 1 to 2: {e}")))?;
                tracing::info!(path = %path.display(), retained = n, "store migrating from schema version 1: retained records stamped");
            }
            let n = migrate_queue_v2(&txn)
                .map_err(|e| open_err(path, format!("migrating schema 2 to 3: {e}")))?;
            set_schema_version(&txn).map_err(redb_err)?;
            tracing::info!(
                path = %path.display(),
                from = v,
                queued = n,
                "store migrated to schema version 3 (queued messages as shared bodies)"
            );
        }
        Some(found) => {
            return Err(StoreError::SchemaVersion {
                path: path.to_path_buf(),
                found,
                expected: SCHEMA_VERSION,
            })
        }
        None => set_schema_version(&txn).map_err(redb_err)?,
    }
    (|| -> Result<(), redb::Error> {
        txn.open_table(RETAINED)?;
        txn.open_table(SESSIONS)?;
        txn.open_table(QUEUE)?;
        txn.open_table(BODIES)?;
        txn.open_table(REGISTRY)?;
        txn.open_table(RECORD_REVISIONS)?;
        txn.commit()?;
        Ok(())
    })()
    .map_err(redb_err)
}

fn set_schema_version(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
    Ok(())
}

/// Rewrites every version 1 `retained` record (a bare [`StoredMessage`]) as a
/// [`StoredRetained`] stored at `now` ms; returns how many. Inside the caller's
/// transaction, so the migration is all or nothing.
fn migrate_retained_v1(txn: &WriteTransaction, now: u64) -> Result<usize, String> {
    let mut table = txn.open_table(RETAINED).map_err(|e| e.to_string())?;
    let mut rewritten = Vec::new();
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let topic = key.value().to_owned();
        match postcard::from_bytes::<StoredMessage>(value.value()) {
            Ok(msg) => rewritten.push((
                topic,
                StoredRetained {
                    stored_at_ms: now,
                    msg,
                },
            )),
            Err(e) => tracing::warn!(
                topic,
                error = %e,
                "retained record does not decode as schema 1; left as it is"
            ),
        }
    }
    for (topic, record) in &rewritten {
        let bytes = postcard::to_allocvec(record).map_err(|e| e.to_string())?;
        table
            .insert(topic.as_str(), bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    Ok(rewritten.len())
}

/// Rewrites every schema 2 `queue` row (the message inline) as a [`QueueRow`] with a
/// body of its own; returns how many. Copies of one message queued for many sessions
/// were separate before and stay separate bodies (only new copies share one).
fn migrate_queue_v2(txn: &WriteTransaction) -> Result<usize, String> {
    let mut queue = txn.open_table(QUEUE).map_err(|e| e.to_string())?;
    let mut bodies = txn.open_table(BODIES).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for entry in queue.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let (client, seq) = key.value();
        match postcard::from_bytes::<QueueRowV2>(value.value()) {
            Ok(old) => rows.push((client.to_owned(), seq, old)),
            Err(e) => {
                tracing::warn!(client, seq, error = %e, "queued record does not decode as schema 2; left as it is")
            }
        }
    }
    for (i, (client, seq, old)) in rows.iter().enumerate() {
        let id = i as u64 + 1;
        let body = postcard::to_allocvec(&old.msg).map_err(|e| e.to_string())?;
        bodies
            .insert(id, body.as_slice())
            .map_err(|e| e.to_string())?;
        let row = QueueRow {
            body: id,
            qos: old.qos,
            retain: old.retain,
            subscription_ids: old.subscription_ids.clone(),
        };
        let bytes = postcard::to_allocvec(&row).map_err(|e| e.to_string())?;
        queue
            .insert((client.as_str(), *seq), bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    Ok(rows.len())
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: impl std::fmt::Debug,
    bytes: &[u8],
) -> Option<T> {
    match postcard::from_bytes(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            let err = StoreError::Corrupt {
                table,
                key: format!("{key:?}"),
                reason: e.to_string(),
            };
            tracing::warn!(%err, "skipping store record");
            None
        }
    }
}

/// Everything in the file, the number of queued rows that reference each body, and the
/// largest body id.
#[allow(clippy::type_complexity)]
fn load(db: &Database) -> Result<(Loaded, std::collections::HashMap<u64, u32>, u64), redb::Error> {
    let txn = db.begin_read()?;
    let mut loaded = Loaded::default();
    let mut bodies: std::collections::HashMap<u64, Arc<StoredMessage>> =
        std::collections::HashMap::new();
    let mut max_body = 0;
    for entry in txn.open_table(BODIES)?.iter()? {
        let (key, value) = entry?;
        let id = key.value();
        max_body = max_body.max(id);
        if let Some(msg) = decode::<StoredMessage>("bodies", id, value.value()) {
            bodies.insert(id, Arc::new(msg));
        }
    }
    let mut refs: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for entry in txn.open_table(RETAINED)?.iter()? {
        let (key, value) = entry?;
        if let Some(record) = decode("retained", key.value(), value.value()) {
            loaded.retained.push(record);
        }
    }
    let mut sessions = std::collections::BTreeMap::new();
    let mut unloaded = std::collections::BTreeSet::new();
    for entry in txn.open_table(SESSIONS)?.iter()? {
        let (key, value) = entry?;
        let client_id = key.value();
        let Some(session) = decode("sessions", client_id, value.value()) else {
            unloaded.insert(client_id.to_owned());
            continue;
        };
        sessions.insert(
            client_id.to_owned(),
            LoadedSession {
                client_id: client_id.to_owned(),
                session,
                queue: Vec::new(),
            },
        );
    }
    let mut orphans = 0u64;
    for entry in txn.open_table(QUEUE)?.iter()? {
        let (key, value) = entry?;
        let (client_id, seq) = key.value();
        let Some(session) = sessions.get_mut(client_id) else {
            // Still a reference: the row stays on disk until the client comes back.
            if let Some(row) = decode::<QueueRow>("queue", (client_id, seq), value.value()) {
                *refs.entry(row.body).or_insert(0) += 1;
            }
            orphans += 1;
            if !unloaded.contains(client_id) {
                unloaded.insert(client_id.to_owned());
            }
            continue;
        };
        if let Some(row) = decode::<QueueRow>("queue", (client_id, seq), value.value()) {
            *refs.entry(row.body).or_insert(0) += 1;
            match bodies.get(&row.body) {
                Some(msg) => session.queue.push((
                    seq,
                    StoredQueued {
                        body: row.body,
                        msg: msg.clone(),
                        qos: row.qos,
                        retain: row.retain,
                        subscription_ids: row.subscription_ids,
                    },
                )),
                None => tracing::warn!(
                    client_id,
                    seq,
                    body = row.body,
                    "skipping a queued message whose body is missing"
                ),
            }
        }
    }
    if orphans > 0 {
        tracing::warn!(
            orphans,
            "skipping queued messages whose session is missing or unreadable"
        );
    }
    loaded.sessions = sessions.into_values().collect();
    loaded.unloaded_sessions = unloaded.into_iter().collect();
    let revisions = txn.open_table(RECORD_REVISIONS)?;
    for entry in txn.open_table(REGISTRY)?.iter()? {
        let (key, value) = entry?;
        let (kind, k) = key.value();
        let revision = revisions.get((kind, k))?.map_or(0, |r| r.value());
        loaded.records.push((
            kind.to_owned(),
            k.to_owned(),
            value.value().to_vec(),
            revision,
        ));
    }
    // A body is written in the transaction of its first row and deleted in the one of
    // its last, so none should be unreferenced; say so if some are.
    let unreferenced = bodies.keys().filter(|id| !refs.contains_key(id)).count();
    if unreferenced > 0 {
        tracing::warn!(unreferenced, "message bodies without a queued delivery");
    }
    Ok((loaded, refs, max_body))
}

#[cfg(test)]
mod tests;
