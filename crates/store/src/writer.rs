//! The one writer thread: group commit of every request waiting, one fsync per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use redb::{Database, Durability, ReadableTable};
use serde::Serialize;
use tokio::sync::oneshot;

use std::collections::HashMap;

use crate::{
    FenceRow, Opener, QueueRow, BODIES, FENCES, META, QUEUE, RECORD_REVISIONS, RECORD_REVISION_KEY,
    REGISTRY, RETAINED, SESSIONS,
};
use fleetcore_core::storage::{
    Claimed, Fence, LoadedSession, Op, StoreError, StoredMessage, StoredQueued, StoredSession,
};

/// About this many bytes of records end a batch early, so one transaction stays bounded.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Ops of one submit, or a flush (no ops), with who to tell when they are durable.
pub(crate) struct Request {
    pub(crate) ops: Vec<Op>,
    pub(crate) reply: Reply,
    /// A flush also reports a failure of any earlier batch since the previous flush.
    pub(crate) flush: bool,
}

pub(crate) enum Reply {
    None,
    Async(oneshot::Sender<Result<(), StoreError>>),
    Blocking(mpsc::SyncSender<Result<(), StoreError>>),
    /// A claim: told the fence and the session it read.
    Claim(oneshot::Sender<Result<Claimed, StoreError>>),
    /// Record writes: told the revision each record put or delete left its record at.
    Records(oneshot::Sender<Result<Vec<u64>, StoreError>>),
}

impl Reply {
    fn send(self, result: Result<Outcome, StoreError>) {
        // A waiter that stopped waiting is no error: its ops were still applied.
        match self {
            Reply::None => {}
            Reply::Async(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
            Reply::Claim(tx) => {
                let _ = tx.send(result.and_then(|o| match o {
                    Outcome::Claimed(c) => Ok(c),
                    _ => Err(StoreError::Closed),
                }));
            }
            Reply::Records(tx) => {
                let _ = tx.send(result.map(|o| match o {
                    Outcome::Applied(revisions) => revisions,
                    _ => Vec::new(),
                }));
            }
        }
    }
}

/// How one request of a batch went, the batch's commit aside.
enum Outcome {
    /// Written; the revisions its record ops gave their records, in order.
    Applied(Vec<u64>),
    Claimed(Claimed),
    /// Not written: a fence no longer held or a record was not at its expected revision.
    Refused(StoreError),
}

pub(crate) struct Writer {
    /// `None` after a failed batch: redb refuses all I/O after an I/O error until the
    /// database is reopened, so the next batch reopens it and is tried afresh.
    db: Option<Database>,
    opener: Opener,
    max_ops: usize,
    commits: Arc<AtomicU64>,
    /// Error of the latest failed batch not yet reported to a flush.
    unflushed_failure: Option<StoreError>,
    /// Queue rows on disk that reference each message body.
    refs: HashMap<u64, u32>,
}

impl Writer {
    pub(crate) fn new(
        db: Database,
        opener: Opener,
        max_ops: usize,
        commits: Arc<AtomicU64>,
        refs: HashMap<u64, u32>,
    ) -> Writer {
        Writer {
            db: Some(db),
            opener,
            max_ops: max_ops.max(1),
            commits,
            unflushed_failure: None,
            refs,
        }
    }

    /// Runs until every `Store` is dropped and every request sent before that is done.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut carry: Option<Request> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(mpsc::RecvError) => break,
                },
            };
            let mut ops = first.ops.len();
            let mut bytes = approx_len(&first);
            let mut batch = vec![first];
            while ops < self.max_ops && bytes < MAX_BATCH_BYTES {
                let Ok(next) = rx.try_recv() else { break };
                let (n, b) = (next.ops.len(), approx_len(&next));
                if ops + n > self.max_ops || bytes + b > MAX_BATCH_BYTES {
                    carry = Some(next);
                    break;
                }
                ops += n;
                bytes += b;
                batch.push(next);
            }
            self.commit_batch(batch, ops);
        }
    }

    fn commit_batch(&mut self, batch: Vec<Request>, ops: usize) {
        // A batch of flushes only has nothing to write: every earlier batch is already done.
        let result = if ops == 0 {
            Ok(Vec::new())
        } else {
            let started = Instant::now();
            let result = self.apply(&batch);
            metrics::histogram!("fleetcore_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::gauge!("fleetcore_store_batch_ops").set(ops as f64);
            match &result {
                Ok(_) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetcore_store_commits_total").increment(1);
                    metrics::counter!("fleetcore_store_ops_total").increment(ops as u64);
                }
                Err(e) => {
                    metrics::counter!("fleetcore_store_errors_total").increment(1);
                    tracing::error!(
                        error = %e,
                        ops,
                        requests = batch.len(),
                        "store batch lost; its waiters were told"
                    );
                    self.db = None;
                    self.unflushed_failure = Some(e.clone());
                }
            }
            result
        };
        let flush_result = if batch.iter().any(|r| r.flush) {
            self.unflushed_failure.take().map_or(Ok(()), Err)
        } else {
            Ok(())
        };
        let mut outcomes = match result {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect::<Vec<_>>(),
        }
        .into_iter();
        for request in batch {
            let outcome = outcomes.next().unwrap_or(Ok(Outcome::Applied(Vec::new())));
            let reply_result = if request.flush {
                flush_result.clone().map(|()| Outcome::Applied(Vec::new()))
            } else {
                match outcome {
                    Ok(Outcome::Claimed(c)) => {
                        metrics::counter!("fleetcore_session_claims_total").increment(1);
                        Ok(Outcome::Claimed(c))
                    }
                    Ok(Outcome::Refused(e)) => {
                        match &e {
                            StoreError::Fenced { .. } => {
                                metrics::counter!("fleetcore_store_fenced_writes_total")
                                    .increment(1)
                            }
                            _ => metrics::counter!("fleetcore_store_conflicts_total").increment(1),
                        }
                        tracing::warn!(error = %e, "store ops refused");
                        Err(e)
                    }
                    other => other,
                }
            };
            request.reply.send(reply_result);
        }
    }

    /// Applies every op of the batch in one write transaction and commits it durably;
    /// a request whose fence no longer holds is skipped whole. Returns how each request
    /// went.
    fn apply(&mut self, batch: &[Request]) -> Result<Vec<Outcome>, StoreError> {
        if self.db.is_none() {
            tracing::info!("reopening store after a failed commit");
            self.db = Some((self.opener)().map_err(io_err)?);
        }
        let Some(db) = self.db.as_ref() else {
            return Err(StoreError::Closed);
        };
        let mut txn = db.begin_write().map_err(io_err)?;
        txn.set_durability(Durability::Immediate).map_err(io_err)?;
        // Reference counts as this transaction leaves them; they replace `refs` only if
        // it commits.
        let mut counts = Counts {
            base: &self.refs,
            now: HashMap::new(),
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut retained = txn.open_table(RETAINED).map_err(io_err)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(io_err)?;
            let mut queue = txn.open_table(QUEUE).map_err(io_err)?;
            let mut bodies = txn.open_table(BODIES).map_err(io_err)?;
            let mut registry = txn.open_table(REGISTRY).map_err(io_err)?;
            let mut fences = txn.open_table(FENCES).map_err(io_err)?;
            // Record revisions are read and written only by batches with record ops.
            let touches_records = batch.iter().any(|r| {
                r.ops.iter().any(|op| {
                    matches!(
                        op,
                        Op::PutRecord { .. } | Op::DeleteRecord { .. } | Op::ExpectRecord { .. }
                    )
                })
            });
            let mut revisions = if touches_records {
                Some(Revisions::open(&txn)?)
            } else {
                None
            };
            for request in batch {
                if let Some(e) = fenced(&fences, &request.ops)? {
                    outcomes.push(Outcome::Refused(e));
                    continue;
                }
                if let Some(revisions) = &revisions {
                    if let Some(e) = conflict(&registry, &revisions.table, &request.ops)? {
                        outcomes.push(Outcome::Refused(e));
                        continue;
                    }
                }
                let mut outcome = Outcome::Applied(Vec::new());
                for op in &request.ops {
                    match op {
                        Op::CheckFence { .. } | Op::ExpectRecord { .. } => {}
                        Op::ClaimSession { client_id, owner } => {
                            let last = fences
                                .get(client_id.as_str())
                                .map_err(io_err)?
                                .and_then(|v| postcard::from_bytes::<FenceRow>(v.value()).ok())
                                .map_or(0, |r| r.fence);
                            let row = FenceRow {
                                fence: last + 1,
                                owner: owner.clone(),
                            };
                            fences
                                .insert(client_id.as_str(), encode(&row)?.as_slice())
                                .map_err(io_err)?;
                            outcome = Outcome::Claimed(Claimed {
                                fence: Fence(row.fence),
                                session: read_session(&sessions, &queue, &bodies, client_id)?,
                            });
                        }
                        Op::PutRetained { topic, retained: r } => {
                            retained
                                .insert(topic.as_str(), encode(r)?.as_slice())
                                .map_err(io_err)?;
                        }
                        Op::DeleteRetained { topic } => {
                            retained.remove(topic.as_str()).map_err(io_err)?;
                        }
                        Op::PutSession { client_id, session } => {
                            sessions
                                .insert(client_id.as_str(), encode(session)?.as_slice())
                                .map_err(io_err)?;
                        }
                        Op::DeleteSession { client_id } => {
                            let id = client_id.as_str();
                            let mut gone = Vec::new();
                            for entry in queue.range((id, 0u64)..=(id, u64::MAX)).map_err(io_err)? {
                                let (_, v) = entry.map_err(io_err)?;
                                if let Some(b) = body_of(v.value()) {
                                    gone.push(b);
                                }
                            }
                            queue
                                .retain_in((id, 0u64)..=(id, u64::MAX), |_, _| false)
                                .map_err(io_err)?;
                            for b in gone {
                                unref(&mut counts, &mut bodies, b)?;
                            }
                            sessions.remove(id).map_err(io_err)?;
                        }
                        Op::PutQueued {
                            client_id,
                            seq,
                            item,
                        } => {
                            let c = counts.of(item.body);
                            if *c == 0 {
                                bodies
                                    .insert(item.body, encode(&*item.msg)?.as_slice())
                                    .map_err(io_err)?;
                            }
                            *c += 1;
                            let row = QueueRow {
                                body: item.body,
                                qos: item.qos,
                                retain: item.retain,
                                subscription_ids: item.subscription_ids.clone(),
                            };
                            let old = queue
                                .insert((client_id.as_str(), *seq), encode(&row)?.as_slice())
                                .map_err(io_err)?
                                .and_then(|v| body_of(v.value()));
                            if let Some(b) = old {
                                unref(&mut counts, &mut bodies, b)?;
                            }
                        }
                        Op::DeleteQueued { client_id, seq } => {
                            let old = queue
                                .remove((client_id.as_str(), *seq))
                                .map_err(io_err)?
                                .and_then(|v| body_of(v.value()));
                            if let Some(b) = old {
                                unref(&mut counts, &mut bodies, b)?;
                            }
                        }
                        Op::PutRecord { kind, key, value } => {
                            registry
                                .insert((*kind, key.as_str()), value.as_slice())
                                .map_err(io_err)?;
                            if let (Some(revisions), Outcome::Applied(r)) =
                                (&mut revisions, &mut outcome)
                            {
                                r.push(revisions.next(kind, key, true)?);
                            }
                        }
                        Op::DeleteRecord { kind, key } => {
                            registry.remove((*kind, key.as_str())).map_err(io_err)?;
                            if let (Some(revisions), Outcome::Applied(r)) =
                                (&mut revisions, &mut outcome)
                            {
                                r.push(revisions.next(kind, key, false)?);
                            }
                        }
                    }
                }
                outcomes.push(outcome);
            }
            if let Some(revisions) = revisions {
                revisions.finish()?;
            }
        }
        let counts = counts.now;
        txn.commit().map_err(io_err)?;
        for (id, n) in counts {
            if n == 0 {
                self.refs.remove(&id);
            } else {
                self.refs.insert(id, n);
            }
        }
        Ok(outcomes)
    }
}

/// The first fence among `ops` that no longer holds, as the error to answer with.
fn fenced(fences: &redb::Table<&str, &[u8]>, ops: &[Op]) -> Result<Option<StoreError>, StoreError> {
    for op in ops {
        let Op::CheckFence { client_id, fence } = op else {
            continue;
        };
        let current = fences
            .get(client_id.as_str())
            .map_err(io_err)?
            .and_then(|v| postcard::from_bytes::<FenceRow>(v.value()).ok())
            .map_or(0, |r| r.fence);
        if current != fence.0 {
            return Ok(Some(StoreError::Fenced {
                client_id: client_id.clone(),
                held: fence.0,
                current,
            }));
        }
    }
    Ok(None)
}

/// The record revisions of one write transaction: the `record_revisions` table and the
/// `meta` counter, written back by [`Revisions::finish`].
struct Revisions<'t> {
    table: redb::Table<'t, (&'static str, &'static str), u64>,
    meta: redb::Table<'t, &'static str, u64>,
    first: u64,
    last: u64,
}

impl<'t> Revisions<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Revisions<'t>, StoreError> {
        let table = txn.open_table(RECORD_REVISIONS).map_err(io_err)?;
        let meta = txn.open_table(META).map_err(io_err)?;
        let last = meta
            .get(RECORD_REVISION_KEY)
            .map_err(io_err)?
            .map_or(0, |v| v.value());
        Ok(Revisions {
            table,
            meta,
            first: last,
            last,
        })
    }

    /// The next revision, given to record (kind, key): kept for a put, its row removed
    /// for a delete.
    fn next(&mut self, kind: &str, key: &str, put: bool) -> Result<u64, StoreError> {
        self.last += 1;
        if put {
            self.table.insert((kind, key), self.last).map_err(io_err)?;
        } else {
            self.table.remove((kind, key)).map_err(io_err)?;
        }
        Ok(self.last)
    }

    fn finish(mut self) -> Result<(), StoreError> {
        if self.last != self.first {
            self.meta
                .insert(RECORD_REVISION_KEY, self.last)
                .map_err(io_err)?;
        }
        Ok(())
    }
}

/// The first [`Op::ExpectRecord`] among `ops` whose record is not at the revision it
/// expects, as the error to answer with. A record with no revision row (written before
/// revisions were kept) is at revision 0.
fn conflict(
    registry: &redb::Table<(&str, &str), &[u8]>,
    revisions: &redb::Table<(&str, &str), u64>,
    ops: &[Op],
) -> Result<Option<StoreError>, StoreError> {
    for op in ops {
        let Op::ExpectRecord {
            kind,
            key,
            revision,
        } = op
        else {
            continue;
        };
        let found = match registry.get((*kind, key.as_str())).map_err(io_err)? {
            None => None,
            Some(_) => Some(
                revisions
                    .get((*kind, key.as_str()))
                    .map_err(io_err)?
                    .map_or(0, |v| v.value()),
            ),
        };
        if found != *revision {
            return Ok(Some(StoreError::Conflict {
                kind: (*kind).to_owned(),
                key: key.clone(),
                expected: *revision,
                found,
            }));
        }
    }
    Ok(None)
}

/// A session and its queue as this transaction sees them (`None`: no readable session).
fn read_session(
    sessions: &redb::Table<&str, &[u8]>,
    queue: &redb::Table<(&str, u64), &[u8]>,
    bodies: &redb::Table<u64, &[u8]>,
    client_id: &str,
) -> Result<Option<LoadedSession>, StoreError> {
    let Some(record) = sessions.get(client_id).map_err(io_err)? else {
        return Ok(None);
    };
    let Ok(session) = postcard::from_bytes::<StoredSession>(record.value()) else {
        return Ok(None);
    };
    let mut items = Vec::new();
    for entry in queue
        .range((client_id, 0u64)..=(client_id, u64::MAX))
        .map_err(io_err)?
    {
        let (key, value) = entry.map_err(io_err)?;
        let Ok(row) = postcard::from_bytes::<QueueRow>(value.value()) else {
            continue;
        };
        let Some(body) = bodies.get(row.body).map_err(io_err)? else {
            continue;
        };
        let Ok(msg) = postcard::from_bytes::<StoredMessage>(body.value()) else {
            continue;
        };
        items.push((
            key.value().1,
            StoredQueued {
                body: row.body,
                msg: Arc::new(msg),
                qos: row.qos,
                retain: row.retain,
                subscription_ids: row.subscription_ids,
            },
        ));
    }
    Ok(Some(LoadedSession {
        client_id: client_id.to_owned(),
        session,
        queue: items,
    }))
}

/// The body id of a `queue` row.
fn body_of(row: &[u8]) -> Option<u64> {
    postcard::from_bytes::<QueueRow>(row).ok().map(|r| r.body)
}

/// Reference counts of message bodies as a transaction changes them.
struct Counts<'a> {
    /// As committed.
    base: &'a HashMap<u64, u32>,
    /// As this transaction leaves them, for the bodies it touched.
    now: HashMap<u64, u32>,
}

impl Counts<'_> {
    fn of(&mut self, id: u64) -> &mut u32 {
        let base = self.base;
        self.now
            .entry(id)
            .or_insert_with(|| base.get(&id).copied().unwrap_or(0))
    }
}

/// One reference fewer to body `id`; the body is deleted with its last.
fn unref(
    counts: &mut Counts<'_>,
    bodies: &mut redb::Table<u64, &[u8]>,
    id: u64,
) -> Result<(), StoreError> {
    let c = counts.of(id);
    *c = c.saturating_sub(1);
    if *c == 0 {
        bodies.remove(id).map_err(io_err)?;
    }
    Ok(())
}

fn approx_len(request: &Request) -> usize {
    request.ops.iter().map(Op::approx_len).sum()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Names the underlying OS error plainly ("No space left on device (os error 28)").
/// A full disk (or quota) is its own error, so the operator and the client are told
/// what to do about it.
fn io_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull(io.to_string()),
        redb::Error::Io(io) => StoreError::Io(io.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

/// ENOSPC or EDQUOT.
fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}
