//! The Device Shadow service, classic and named, as IoT Core serves it over MQTT
//! (`$aws/things/{thing}/shadow[/name/{shadow}]/{get,update,delete}`) and as the admin
//! API serves it over HTTP ([`ShadowService::get`], [`ShadowService::update`], ...).
//!
//! - [`document`]: the rules (validation, merge, delta, versions, answer bodies) as pure
//!   functions.
//! - [`store`]: one record per shadow on the record-store contract.
//! - this file: the topics, and the order and durability of requests.
//!
//! **Order.** Requests to one shadow run one at a time, in arrival order, from a queue of
//! their own; requests to different shadows run side by side (and share the store's
//! group commit). **Durability.** An update or delete is written and on disk before the
//! shadow in memory changes and before any answer is published: `/accepted` means
//! "on disk", and the publisher's PUBACK (QoS 1) is sent after the answers. A write that
//! fails is answered `500 Internal service failure` and changes nothing.
//! **Answers** are ordinary QoS 1 publishes from the broker, routed to every subscriber
//! the policy lets receive them (IoT Core's rule for shadows), so a persistent session
//! subscribed to `update/delta` gets the deltas published while it was away.

pub mod document;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fleetcore_core::service::{
    Handled, Publisher, RefuseCode, ServiceContext, ServiceRequest, TopicService,
};
use fleetcore_core::storage::{Commit, RecordCommit, RecordStore, StoreError};
use fleetcore_core::time::now_secs;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::publish_json;
use document::{Limits, Shadow, ShadowError};
pub use store::Key;

/// The three requests a shadow serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Get,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// What a topic under `$aws/things/+/shadow/#` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowTopic {
    Request(Key, Operation),
    /// `/accepted`, `/rejected`, `update/delta`, `update/documents`: the service's to
    /// publish to.
    Answer,
    /// Under the filter but neither (an unknown operation, a bad name): why.
    Invalid(String),
}

/// Reads a topic under `$aws/things/{thing}/shadow/`.
pub fn parse_topic(topic: &str, limits: &Limits) -> ShadowTopic {
    let Some(rest) = topic.strip_prefix("$aws/things/") else {
        return ShadowTopic::Invalid("not a shadow topic".into());
    };
    let Some((thing, rest)) = rest.split_once("/shadow") else {
        return ShadowTopic::Invalid("not a shadow topic".into());
    };
    let levels: Vec<&str> = rest.split('/').skip(1).collect();
    let (name, ops) = match levels.as_slice() {
        ["name", n, ops @ ..] => (Some(*n), ops),
        ops => (None, ops),
    };
    let op = match ops {
        ["get"] => Operation::Get,
        ["update"] => Operation::Update,
        ["delete"] => Operation::Delete,
        ["get" | "update" | "delete", "accepted" | "rejected"]
        | ["update", "delta" | "documents"] => return ShadowTopic::Answer,
        _ => {
            return ShadowTopic::Invalid(format!(
                "{topic:?} is not a shadow request topic (get, update or delete)"
            ))
        }
    };
    if !document::valid_name(thing, limits.max_thing_name) {
        return ShadowTopic::Invalid(format!(
            "thing name {thing:?} is not 1 to {} characters of a-z A-Z 0-9 : _ -",
            limits.max_thing_name
        ));
    }
    if let Some(n) = name {
        if !document::valid_name(n, limits.max_shadow_name) {
            return ShadowTopic::Invalid(format!(
                "shadow name {n:?} is not 1 to {} characters of a-z A-Z 0-9 : _ -",
                limits.max_shadow_name
            ));
        }
    }
    ShadowTopic::Request(
        Key {
            thing: thing.to_string(),
            name: name.map(str::to_string),
        },
        op,
    )
}

/// The topic prefix of a shadow's topics.
pub fn prefix(key: &Key) -> String {
    match &key.name {
        None => format!("$aws/things/{}/shadow", key.thing),
        Some(n) => format!("$aws/things/{}/shadow/name/{n}", key.thing),
    }
}

/// The Device Shadow service.
pub struct ShadowService {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    slots: Mutex<HashMap<Key, Slot>>,
    /// Requests waiting for their answer, by client id (the 429 limit).
    in_flight: Mutex<HashMap<Arc<str>, usize>>,
    store: OnceLock<Arc<dyn RecordStore>>,
    publisher: OnceLock<Arc<dyn Publisher>>,
    documents: AtomicI64,
    bytes: AtomicI64,
}

#[derive(Default)]
struct Slot {
    shadow: Option<Shadow>,
    /// The revision of the shadow's record as stored (`None`: there is none): a write
    /// expects it, so one made on another node meanwhile is not overwritten.
    revision: Option<u64>,
    /// The highest revision taken in, deletes included (orders what other nodes store).
    applied: u64,
    /// A write of this node is in flight: what another node stores meanwhile waits in
    /// `deferred` (the newest only) until it is done.
    writing: bool,
    deferred: Option<(u64, Option<Shadow>)>,
    queue: VecDeque<Job>,
    /// A task is draining `queue`.
    busy: bool,
}

struct Job {
    op: Operation,
    payload: Bytes,
    origin: Origin,
    /// Writes of this request refused because another node changed the shadow first.
    conflicts: u8,
}

/// How often a request is worked out again on a shadow another node changed under it
/// before it is answered 500. Each conflict means another node's update of this shadow
/// landed, so a request can lose several times while the other node drains its queue.
const MAX_CONFLICTS: u8 = 100;

enum Origin {
    /// An MQTT request: answers go to `/accepted` / `/rejected`; `done` releases the
    /// PUBACK (with the store's error if the write failed).
    Mqtt {
        client_id: Arc<str>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// An HTTP request: the answer body (or error) goes back to the caller; changes
    /// are still published on the MQTT topics.
    Http(oneshot::Sender<Result<Value, ShadowError>>),
}

impl ShadowService {
    pub fn new(limits: Limits) -> ShadowService {
        ShadowService {
            inner: Arc::new(Inner {
                limits,
                slots: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashMap::new()),
                store: OnceLock::new(),
                publisher: OnceLock::new(),
                documents: AtomicI64::new(0),
                bytes: AtomicI64::new(0),
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// GetThingShadow: the full document with its delta.
    pub async fn get(&self, key: Key) -> Result<Value, ShadowError> {
        self.http(key, Operation::Get, Bytes::new()).await
    }

    /// UpdateThingShadow: `body` is a request document; the answer is the
    /// `update/accepted` body, also published over MQTT with the delta and documents.
    pub async fn update(&self, key: Key, body: Bytes) -> Result<Value, ShadowError> {
        self.http(key, Operation::Update, body).await
    }

    /// DeleteThingShadow: `{"version","timestamp"}`, also published on `delete/accepted`.
    pub async fn delete(&self, key: Key) -> Result<Value, ShadowError> {
        self.http(key, Operation::Delete, Bytes::new()).await
    }

    /// ListNamedShadowsForThing: the names of `thing`'s named shadows in name order,
    /// `page_size` at a time after `next_token` (the last name of the previous page).
    /// An unknown thing has none.
    pub fn list_named(
        &self,
        thing: &str,
        next_token: Option<&str>,
        page_size: usize,
    ) -> Result<Value, ShadowError> {
        let after = match next_token {
            None => None,
            Some(t) => Some(
                fleetcore_core::encoding::b64url_decode_vec(t.as_bytes())
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ShadowError::new(400, "Invalid nextToken"))?,
            ),
        };
        let mut names: Vec<String> = self
            .inner
            .slots
            .lock()
            .iter()
            .filter(|(k, s)| k.thing == thing && s.shadow.as_ref().is_some_and(Shadow::exists))
            .filter_map(|(k, _)| k.name.clone())
            .filter(|n| after.as_ref().is_none_or(|a| n > a))
            .collect();
        names.sort();
        let more = names.len() > page_size;
        names.truncate(page_size);
        let mut body = json!({"results": names, "timestamp": now_secs()});
        if more {
            if let Some(last) = names.last() {
                body["nextToken"] = json!(fleetcore_core::encoding::b64url_encode(last.as_bytes()));
            }
        }
        Ok(body)
    }

    /// Existing shadows and the bytes of their state (the metrics' figures).
    pub fn totals(&self) -> (i64, i64) {
        (
            self.inner.documents.load(Ordering::Relaxed),
            self.inner.bytes.load(Ordering::Relaxed),
        )
    }

    async fn http(&self, key: Key, op: Operation, payload: Bytes) -> Result<Value, ShadowError> {
        let limits = &self.inner.limits;
        if !document::valid_name(&key.thing, limits.max_thing_name)
            || key
                .name
                .as_deref()
                .is_some_and(|n| !document::valid_name(n, limits.max_shadow_name))
        {
            return Err(ShadowError::new(
                400,
                format!(
                    "Invalid thing or shadow name (1 to {} and 1 to {} characters of a-z A-Z 0-9 : _ -)",
                    limits.max_thing_name, limits.max_shadow_name
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.inner.enqueue(
            key,
            Job {
                op,
                payload,
                origin: Origin::Http(tx),
                conflicts: 0,
            },
        );
        rx.await.unwrap_or_else(|_| Err(ShadowError::internal()))
    }
}

impl Inner {
    fn enqueue(self: &Arc<Self>, key: Key, job: Job) {
        let mut slots = self.slots.lock();
        let slot = slots.entry(key.clone()).or_default();
        slot.queue.push_back(job);
        if !slot.busy {
            slot.busy = true;
            tokio::spawn(self.clone().drain(key));
        }
    }

    /// Runs the queued requests of one shadow, one at a time, until none is left.
    async fn drain(self: Arc<Self>, key: Key) {
        loop {
            let step = {
                let mut slots = self.slots.lock();
                let Some(slot) = slots.get_mut(&key) else {
                    return;
                };
                match slot.queue.pop_front() {
                    Some(job) => {
                        let step = self.decide(&key, slot.shadow.as_ref(), slot.revision, job);
                        slot.writing = matches!(step.outcome, Outcome::Write { .. });
                        step
                    }
                    None => {
                        slot.busy = false;
                        if slot.shadow.is_none() {
                            slots.remove(&key);
                        }
                        return;
                    }
                }
            };
            self.finish(&key, step).await;
        }
    }

    /// Works out a request against the shadow as it is (under the slots lock: pure
    /// and quick); the write, if any, is submitted here so the store sees one
    /// shadow's writes in order.
    fn decide(&self, key: &Key, current: Option<&Shadow>, revision: Option<u64>, job: Job) -> Step {
        let now = now_secs();
        let Job {
            op,
            payload,
            origin,
            conflicts,
        } = job;
        let outcome = match op {
            Operation::Get => match document::request_token(&payload) {
                Err(e) => Outcome::Rejected(e, None),
                Ok(token) => match current.filter(|s| s.exists()) {
                    Some(s) => Outcome::Answer(s.get_answer(token.as_deref(), now)),
                    None => Outcome::Rejected(
                        ShadowError::not_found(&key.thing, key.name.as_deref()),
                        token,
                    ),
                },
            },
            Operation::Update => match document::parse_update(&payload, &self.limits) {
                Err((e, token)) => Outcome::Rejected(e, token),
                Ok(req) => match document::apply_update(current, &req, &self.limits, now) {
                    Err(e) => Outcome::Rejected(e, req.client_token),
                    Ok(u) => {
                        let commit = self.write(key, &u.shadow, revision);
                        let mut out = vec![("update/accepted", u.accepted.clone())];
                        if let Some(d) = u.delta {
                            out.push(("update/delta", d));
                        }
                        out.push(("update/documents", u.documents));
                        Outcome::Write {
                            shadow: Box::new(u.shadow),
                            commit,
                            publish: out,
                            answer: u.accepted,
                            token: req.client_token,
                        }
                    }
                },
            },
            Operation::Delete => match document::request_token(&payload) {
                Err(e) => Outcome::Rejected(e, None),
                Ok(token) => match document::apply_delete(current, token.as_deref(), now, || {
                    ShadowError::not_found(&key.thing, key.name.as_deref())
                }) {
                    Err(e) => Outcome::Rejected(e, token),
                    Ok((tomb, answer)) => Outcome::Write {
                        commit: self.write(key, &tomb, revision),
                        shadow: Box::new(tomb),
                        publish: vec![("delete/accepted", answer.clone())],
                        answer,
                        token,
                    },
                },
            },
        };
        Step {
            op,
            origin,
            outcome,
            now,
            previous: current.map(|s| (s.exists(), s.state_bytes())),
            payload,
            conflicts,
            revision,
        }
    }

    fn write(&self, key: &Key, shadow: &Shadow, revision: Option<u64>) -> RecordCommit {
        let Some(store) = self.store.get() else {
            return Commit::failed(StoreError::Closed);
        };
        match store::put(key, shadow, revision) {
            Ok(ops) => store.submit_records(ops),
            Err(e) => Commit::failed(StoreError::Encode(e)),
        }
    }

    /// Ends a write of this node to `key`'s shadow: what another node stored meanwhile
    /// is taken in now (if newer).
    fn end_write(&self, key: &Key, written: Option<(Shadow, Option<u64>)>) {
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        if let Some((shadow, revision)) = written {
            slot.shadow = Some(shadow);
            if let Some(r) = revision {
                slot.revision = Some(r);
                slot.applied = slot.applied.max(r);
            }
        }
        slot.writing = false;
        if let Some((revision, shadow)) = slot.deferred.take() {
            self.take_stored(slot, revision, shadow);
        }
    }

    /// Waits (at most 2 s) until another node's change to `key`'s shadow, which made a
    /// write expecting `expected` fail, has reached this node.
    async fn catch_up(&self, key: &Key, expected: Option<u64>) {
        for _ in 0..400 {
            let moved = self
                .slots
                .lock()
                .get(key)
                .is_none_or(|s| s.revision != expected);
            if moved {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Takes in a shadow another node stored at `revision` (`None`: its record was
    /// deleted), unless this slot has that revision or a later one already.
    fn take_stored(&self, slot: &mut Slot, revision: u64, incoming: Option<Shadow>) {
        if revision <= slot.applied {
            return;
        }
        let size = |s: &Option<Shadow>| match s {
            Some(s) if s.exists() => (1, s.state_bytes() as i64),
            _ => (0, 0),
        };
        let (was_doc, was_bytes) = size(&slot.shadow);
        let (is_doc, is_bytes) = size(&incoming);
        slot.revision = incoming.is_some().then_some(revision);
        slot.applied = revision;
        slot.shadow = incoming;
        self.gauge(is_doc - was_doc, is_bytes - was_bytes);
    }

    async fn finish(&self, key: &Key, step: Step) {
        let Step {
            op,
            origin,
            outcome,
            now,
            previous,
            payload,
            conflicts,
            revision,
        } = step;
        // A write refused because another node changed the shadow first is worked out
        // again, once that change is here, on the shadow as that node left it.
        let outcome = match outcome {
            Outcome::Write {
                shadow,
                commit,
                publish,
                answer,
                token,
            } => {
                let stored = commit.await;
                match stored {
                    Err(StoreError::Conflict { .. }) if conflicts < MAX_CONFLICTS => {
                        metrics::counter!("fleetcore_shadow_conflicts_total").increment(1);
                        self.end_write(key, None);
                        self.catch_up(key, revision).await;
                        if let Some(slot) = self.slots.lock().get_mut(key) {
                            slot.queue.push_front(Job {
                                op,
                                payload,
                                origin,
                                conflicts: conflicts + 1,
                            });
                        }
                        return;
                    }
                    Ok(revisions) => {
                        self.account(previous, &shadow);
                        self.end_write(key, Some((*shadow, revisions.last().copied())));
                        Finished::Written {
                            stored: Ok(()),
                            publish,
                            answer,
                            token,
                        }
                    }
                    Err(e) => {
                        self.end_write(key, None);
                        Finished::Written {
                            stored: Err(e),
                            publish,
                            answer,
                            token,
                        }
                    }
                }
            }
            Outcome::Answer(body) => Finished::Answer(body),
            Outcome::Rejected(e, token) => Finished::Rejected(e, token),
        };
        // The request leaves the in-flight count before its answer goes out, so a client
        // that sends its next request on the answer never meets its own slot still taken.
        if let Origin::Mqtt { client_id, .. } = &origin {
            self.release(client_id);
        }
        let base = prefix(key);
        let publisher = self.publisher.get();
        let publish = |suffix: &str, body: &Value| {
            if let Some(p) = publisher {
                publish_json(p.as_ref(), &format!("{base}/{suffix}"), body);
            }
        };
        let (result, stored): (Result<Value, ShadowError>, Result<(), StoreError>) = match outcome {
            Finished::Answer(body) => {
                if matches!(origin, Origin::Mqtt { .. }) {
                    publish(&format!("{}/accepted", op.as_str()), &body);
                }
                (Ok(body), Ok(()))
            }
            Finished::Rejected(e, token) => {
                if matches!(origin, Origin::Mqtt { .. }) {
                    publish(
                        &format!("{}/rejected", op.as_str()),
                        &e.to_json(token.as_deref(), now),
                    );
                }
                (Err(e), Ok(()))
            }
            Finished::Written {
                stored,
                publish: bodies,
                answer,
                token,
            } => match stored {
                Ok(()) => {
                    for (suffix, body) in &bodies {
                        publish(suffix, body);
                    }
                    (Ok(answer), Ok(()))
                }
                Err(e) => {
                    tracing::error!(thing = %key.thing, shadow = ?key.name, error = %e, "shadow write failed; the request is answered 500 and nothing changed");
                    let failure = ShadowError::internal();
                    if matches!(origin, Origin::Mqtt { .. }) {
                        publish(
                            &format!("{}/rejected", op.as_str()),
                            &failure.to_json(token.as_deref(), now),
                        );
                    }
                    (Err(failure), Err(e))
                }
            },
        };
        metrics::counter!(
            "fleetcore_shadow_requests_total",
            "operation" => op.as_str(),
            "outcome" => if result.is_ok() { "accepted" } else { "rejected" },
        )
        .increment(1);
        match origin {
            Origin::Mqtt { done, .. } => {
                let _ = done.send(stored);
            }
            Origin::Http(tx) => {
                let _ = tx.send(result);
            }
        }
    }

    /// Keeps the document count and state bytes for the metrics.
    fn account(&self, previous: Option<(bool, usize)>, next: &Shadow) {
        let (was, old_bytes) = previous.unwrap_or((false, 0));
        let docs = i64::from(next.exists()) - i64::from(was);
        let bytes = next.state_bytes() as i64 - if was { old_bytes as i64 } else { 0 };
        self.gauge(docs, bytes);
    }

    /// Moves the document count and state bytes by `docs` and `bytes`.
    fn gauge(&self, docs: i64, bytes: i64) {
        let d = self.documents.fetch_add(docs, Ordering::Relaxed) + docs;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        metrics::gauge!("fleetcore_shadow_documents").set(d as f64);
        metrics::gauge!("fleetcore_shadow_state_bytes").set(b as f64);
    }

    fn release(&self, client_id: &Arc<str>) {
        let mut inflight = self.in_flight.lock();
        if let Some(n) = inflight.get_mut(client_id) {
            *n -= 1;
            if *n == 0 {
                inflight.remove(client_id);
            }
        }
    }
}

struct Step {
    op: Operation,
    origin: Origin,
    outcome: Outcome,
    now: u64,
    /// Whether the shadow existed before, and its state bytes.
    previous: Option<(bool, usize)>,
    /// The request as it came, to work it out again after a conflict.
    payload: Bytes,
    conflicts: u8,
    /// The record revision the write expects.
    revision: Option<u64>,
}

enum Outcome {
    Answer(Value),
    Rejected(ShadowError, Option<String>),
    Write {
        shadow: Box<Shadow>,
        commit: RecordCommit,
        publish: Vec<(&'static str, Value)>,
        answer: Value,
        token: Option<String>,
    },
}

/// An [`Outcome`] once its write, if any, is done.
enum Finished {
    Answer(Value),
    Rejected(ShadowError, Option<String>),
    Written {
        stored: Result<(), StoreError>,
        publish: Vec<(&'static str, Value)>,
        answer: Value,
        token: Option<String>,
    },
}

impl TopicService for ShadowService {
    fn name(&self) -> &'static str {
        "shadow"
    }

    fn filters(&self) -> Vec<String> {
        vec!["$aws/things/+/shadow/#".into()]
    }

    fn handle(&self, req: ServiceRequest<'_>, _out: &Arc<dyn Publisher>) -> Handled {
        let topic: &str = &req.message.topic;
        let (key, op) = match parse_topic(topic, &self.inner.limits) {
            ShadowTopic::Request(key, op) => (key, op),
            ShadowTopic::Answer => {
                return Handled::Refused {
                    code: RefuseCode::NotAuthorized,
                    why: format!("{topic:?} is an answer topic of the shadow service; clients may only subscribe to it"),
                }
            }
            ShadowTopic::Invalid(why) => {
                return Handled::Refused {
                    code: RefuseCode::TopicNameInvalid,
                    why,
                }
            }
        };
        let client_id = req.from.client_id.clone();
        {
            let mut inflight = self.inner.in_flight.lock();
            let n = inflight.entry(client_id.clone()).or_insert(0);
            if *n >= self.inner.limits.max_in_flight {
                drop(inflight);
                let token = document::request_token(&req.message.payload).ok().flatten();
                if let Some(p) = self.inner.publisher.get() {
                    publish_json(
                        p.as_ref(),
                        &format!("{}/{}/rejected", prefix(&key), op.as_str()),
                        &ShadowError::too_many_requests().to_json(token.as_deref(), now_secs()),
                    );
                }
                metrics::counter!(
                    "fleetcore_shadow_requests_total",
                    "operation" => op.as_str(),
                    "outcome" => "rejected",
                )
                .increment(1);
                return Handled::Consumed { commit: None };
            }
            *n += 1;
        }
        let (done, rx) = oneshot::channel();
        self.inner.enqueue(
            key,
            Job {
                op,
                payload: req.message.payload.clone(),
                origin: Origin::Mqtt { client_id, done },
                conflicts: 0,
            },
        );
        Handled::Consumed {
            commit: Some(Commit::waiting(rx)),
        }
    }

    fn apply_stored(&self, kind: &str, key: &str, value: Option<&[u8]>, revision: u64) {
        if kind != store::KIND {
            return;
        }
        let incoming = match value.map(serde_json::from_slice::<Shadow>) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                tracing::error!(key, error = %e, "shadow record from another node does not decode; skipped");
                return;
            }
            None => None,
        };
        let mut slots = self.inner.slots.lock();
        let slot = slots.entry(store::Key::parse(key)).or_default();
        if slot.writing {
            // Taken in when this node's write ends (the newest only).
            if slot.deferred.as_ref().is_none_or(|(r, _)| *r < revision) {
                slot.deferred = Some((revision, incoming));
            }
            return;
        }
        self.inner.take_stored(slot, revision, incoming);
    }

    fn start(&self, ctx: ServiceContext<'_>) {
        let (shadows, stale) = store::load(ctx.records, now_secs());
        let _ = self.inner.publisher.set(ctx.publisher);
        if !stale.is_empty() {
            drop(ctx.store.submit_records(stale));
        }
        let _ = self.inner.store.set(ctx.store);
        let mut docs = 0i64;
        let mut bytes = 0i64;
        let mut slots = self.inner.slots.lock();
        for (key, (shadow, revision)) in shadows {
            if shadow.exists() {
                docs += 1;
                bytes += shadow.state_bytes() as i64;
            }
            slots.insert(
                key,
                Slot {
                    shadow: Some(shadow),
                    revision: Some(revision),
                    applied: revision,
                    ..Slot::default()
                },
            );
        }
        self.inner.documents.store(docs, Ordering::Relaxed);
        self.inner.bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("fleetcore_shadow_documents").set(docs as f64);
        metrics::gauge!("fleetcore_shadow_state_bytes").set(bytes as f64);
        tracing::info!(documents = docs, state_bytes = bytes, "shadows loaded");
    }
}

#[cfg(test)]
mod tests;
