//! The device registry: things, certificates, policies, CAs, and what is
//! attached to what (AWS IoT Core's model).
//!
//! All of it is held in memory for the CONNECT path and written through to the
//! store: a change returns only once it is on disk. Every change bumps a
//! generation counter; connections compare it on each authorization check and
//! rebind their policies when it moved, so a policy, attachment or attribute
//! change applies to live sessions at their next packet. Certificates leaving
//! `ACTIVE` are also kicked at once by the hub (see `Hub::kick_certificate`).
//!
//! It also keeps the signing keys of device tokens (records of kind `token-key`, with
//! their private keys) and issues and checks tokens (see [`crate::token`]). Key changes
//! do not move the generation: they change no authorization.
//!
//! Static thing groups (a hierarchy, memberships, IoT Core's limits) are in
//! [`groups`]: the same state, the same `apply` path, records of their own kinds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetcore_core::storage::{RecordCommit, RecordOp, RecordStore, StoreError};
use fleetcore_policy::{Policy, Vars};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::authz::Authz;
use crate::names::{is_valid_thing_name, THING_NAME_RULE};
use crate::token::TokenConfig;
pub use crate::token::{IssuedToken, TokenClaims, TokenError, TokenKeyInfo};
use crate::token::{Keyring, StoredKey, TokenKey};
use fleetcore_core::principal::ClientCert;
use fleetcore_core::time::now_ms;
pub use groups::{GroupInfo, ThingGroup};

const THING: &str = "thing";
const CERT: &str = "certificate";
const POLICY: &str = "policy";
const CA: &str = "ca";
const POLICY_ATTACHMENT: &str = "policy-attachment";
const THING_ATTACHMENT: &str = "thing-attachment";
const TOKEN_KEY: &str = "token-key";

pub mod groups;
pub mod provision;
pub use provision::{OnExisting, Provision, ProvisionPolicy, ProvisionThing, Provisioned};

/// A named device (or any principal) with a type and string attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thing {
    pub name: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Incremented on every update.
    pub version: u64,
    pub created_ms: u64,
}

/// IoT Core's certificate states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertState {
    Active,
    Inactive,
    Revoked,
    PendingActivation,
}

impl std::str::FromStr for CertState {
    type Err = RegistryError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "ACTIVE" => Ok(CertState::Active),
            "INACTIVE" => Ok(CertState::Inactive),
            "REVOKED" => Ok(CertState::Revoked),
            "PENDING_ACTIVATION" => Ok(CertState::PendingActivation),
            _ => Err(RegistryError::Invalid(format!(
                "unknown certificate state {s:?} (ACTIVE, INACTIVE, REVOKED, PENDING_ACTIVATION)"
            ))),
        }
    }
}

impl std::fmt::Display for CertState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertState::Active => "ACTIVE",
            CertState::Inactive => "INACTIVE",
            CertState::Revoked => "REVOKED",
            CertState::PendingActivation => "PENDING_ACTIVATION",
        })
    }
}

/// A registered device certificate. Its id is the SHA-256 of its DER, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub id: String,
    pub pem: String,
    pub subject: String,
    #[serde(default)]
    pub subject_cn: Option<String>,
    pub issuer: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_after_ms: u64,
    pub state: CertState,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When it was last moved to REVOKED (for the CRL).
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

/// A named, versioned policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub name: String,
    pub versions: BTreeMap<u32, PolicyVersion>,
    pub default_version: u32,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub document: String,
    pub created_ms: u64,
}

/// A CA certificate registered by the user (bring your own PKI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub id: String,
    pub pem: String,
    pub subject: String,
    pub created_ms: u64,
}

/// Facts about a certificate to register (read from its PEM by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCert {
    pub id: String,
    pub pem: String,
    pub subject: String,
    pub subject_cn: Option<String>,
    pub issuer: String,
    pub serial: String,
    pub not_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("registry change not stored: {0}")]
    Store(String),
    /// A token or its signing key could not be made (the system's random source or
    /// the key encoding failed); nothing was stored.
    #[error("token signing failed: {0}")]
    Signing(String),
}

/// Why a certificate or token does not identify anyone now (told to the client in the
/// CONNACK's reason string, and logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate {id} (CN {cn:?}) is not registered")]
    NotRegistered { id: String, cn: String },
    #[error("certificate {0} named by the token is not registered")]
    TokenCertNotRegistered(String),
    #[error("certificate {id} is {state}")]
    NotActive { id: String, state: CertState },
    #[error("thing {0:?} named by the token does not exist")]
    NoSuchThing(String),
    #[error("thing {thing:?} is no longer attached to certificate {cert}")]
    NotAttached { thing: String, cert: String },
    #[error("certificate {0}: its stored PEM does not read")]
    UnreadablePem(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            // Another node changed what this change was checked against (409).
            StoreError::Conflict { .. } => RegistryError::Conflict(e.to_string()),
            e => RegistryError::Store(e.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

#[derive(Default)]
struct State {
    things: BTreeMap<String, Thing>,
    certs: BTreeMap<String, CertRecord>,
    policies: BTreeMap<String, (PolicyRecord, Arc<Policy>)>,
    cas: BTreeMap<String, CaRecord>,
    /// certificate id -> attached policy names
    cert_policies: BTreeMap<String, BTreeSet<String>>,
    /// certificate id -> attached thing names
    cert_things: BTreeMap<String, BTreeSet<String>>,
    groups: groups::Groups,
}

pub struct Registry {
    state: RwLock<State>,
    /// Serializes changes, so validate-write-apply happens as one step.
    write: tokio::sync::Mutex<()>,
    /// Keys of pipelined changes (provisioning) submitted to the store and not yet
    /// applied: a pipelined change touching none of them validates and submits while
    /// earlier ones are still being written (so the store's group commit can batch
    /// them); every other change waits until the set is empty ([`Registry::exclusive`]).
    in_flight: parking_lot::Mutex<BTreeSet<String>>,
    /// Told whenever `in_flight` loses keys.
    settled: tokio::sync::Notify,
    generation: AtomicU64,
    store: Arc<dyn RecordStore>,
    /// Device token keys; read on every token CONNECT, changed under `write`.
    tokens: RwLock<Keyring>,
    token_config: TokenConfig,
    /// Who hears about changes (the engine's kicks, the TLS trust reload).
    listeners: RwLock<Vec<Listener>>,
    /// The revision of every record this registry has in memory, for its writes'
    /// compare-and-set and to order what other writers store (see [`Revisions`]).
    revisions: parking_lot::Mutex<Revisions>,
}

/// A record's identity in the store: (kind, key).
type RecordId = (String, String);

/// One put or delete of a submit: the registry record and whether it puts, `None` for a
/// record of another kind.
type Written = Option<(RecordId, bool)>;

/// What the registry knows of record revisions (`RecordStore`): each record's
/// revision as last applied to memory and whether it has a value. Every write expects
/// the revision of each record it writes (a compare-and-set: a record another node
/// changed since is refused with a conflict, not overwritten), and a change another
/// writer stored is applied only if it is newer than what memory holds.
///
/// A change from another writer is never applied while this registry is between
/// checking a change against memory and submitting it (the `write` lock is held), nor
/// to a record whose write is in flight: it waits in `deferred` and is applied when
/// that ends (in revision order, older ones dropped), so memory always follows the
/// store's order.
#[derive(Default)]
struct Revisions {
    known: std::collections::HashMap<RecordId, (u64, bool)>,
    /// Records with a write of this registry submitted and not yet applied.
    writing: std::collections::HashMap<RecordId, u32>,
    /// Changes of other writers waiting for the write lock or for a write of their
    /// record to end: (kind, key, value, revision).
    deferred: Vec<(String, String, Option<Vec<u8>>, u64)>,
}

/// The registry's write lock: while held, nothing another node stored is applied; on
/// release, what waited meanwhile is.
pub(crate) struct WriteGuard<'a> {
    registry: &'a Registry,
    _lock: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // Still holding the lock (fields drop after this).
        self.registry.apply_deferred();
    }
}

/// A change others must act on at once, told after it is on disk. Every other change
/// (policies, attachments, things) reaches live connections through
/// [`Registry::generation`] at their next packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A certificate left ACTIVE (INACTIVE or REVOKED): every connection that
    /// authenticated with it, directly or through a device token, must be cut off.
    CertificateLeftActive { cert_id: String, state: CertState },
    /// The set of registered CAs changed: TLS listeners must trust the new set.
    CasChanged,
    /// A thing joined (`added`) or left a static thing group: added or removed
    /// directly, or removed with the group or the thing being deleted.
    GroupMembershipChanged {
        group: String,
        thing: String,
        added: bool,
    },
}

type Listener = Arc<dyn Fn(&RegistryEvent) + Send + Sync>;

fn valid_thing_name(name: &str) -> Result<()> {
    if is_valid_thing_name(name) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "thing name {name:?} must be {THING_NAME_RULE}"
        )))
    }
}

fn valid_policy_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@-_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "policy name {name:?} must be 1-128 characters of a-z A-Z 0-9 + = , . @ - _"
        )))
    }
}

fn valid_attributes(attrs: &BTreeMap<String, String>) -> Result<()> {
    if attrs.len() > 50 {
        return Err(RegistryError::Invalid(format!(
            "{} attributes; a thing may have at most 50",
            attrs.len()
        )));
    }
    for (k, v) in attrs {
        if k.is_empty() || k.len() > 128 || v.len() > 800 {
            return Err(RegistryError::Invalid(format!(
                "attribute {k:?}: names are 1-128 bytes, values at most 800"
            )));
        }
    }
    Ok(())
}

fn compile(name: &str, document: &str) -> Result<Arc<Policy>> {
    Policy::parse(document)
        .map(Arc::new)
        .map_err(|e| RegistryError::Invalid(format!("policy {name:?}: {e}")))
}

fn put<T: Serialize>(kind: &'static str, key: &str, value: &T) -> RecordOp {
    RecordOp::Put {
        kind,
        key: key.to_owned(),
        value: serde_json::to_vec(value).unwrap_or_default(),
    }
}

fn del(kind: &'static str, key: &str) -> RecordOp {
    RecordOp::Delete {
        kind,
        key: key.to_owned(),
    }
}

/// Takes one stored record into `st` (or `keyring`); `false` for one that does not read
/// or is of a kind the registry does not keep.
fn load_record(st: &mut State, keyring: &mut Keyring, kind: &str, key: &str, value: &[u8]) -> bool {
    match kind {
        TOKEN_KEY => serde_json::from_slice::<StoredKey>(value)
            .ok()
            .filter(|k| k.kid == key)
            .and_then(|k| TokenKey::load(&k).ok())
            .map(|k| keyring.add(k))
            .is_some(),
        THING => serde_json::from_slice::<Thing>(value)
            .map(|t| st.things.insert(key.to_owned(), t))
            .is_ok(),
        CERT => serde_json::from_slice::<CertRecord>(value)
            .map(|c| st.certs.insert(key.to_owned(), c))
            .is_ok(),
        CA => serde_json::from_slice::<CaRecord>(value)
            .map(|c| st.cas.insert(key.to_owned(), c))
            .is_ok(),
        POLICY => match serde_json::from_slice::<PolicyRecord>(value) {
            Ok(p) => match p
                .versions
                .get(&p.default_version)
                .and_then(|v| Policy::parse(&v.document).ok())
            {
                Some(compiled) => {
                    st.policies.insert(key.to_owned(), (p, Arc::new(compiled)));
                    true
                }
                None => false,
            },
            Err(_) => false,
        },
        POLICY_ATTACHMENT | THING_ATTACHMENT => match key.split_once('/') {
            Some((cert, target)) => {
                let map = if kind == POLICY_ATTACHMENT {
                    &mut st.cert_policies
                } else {
                    &mut st.cert_things
                };
                map.entry(cert.to_owned())
                    .or_default()
                    .insert(target.to_owned());
                true
            }
            None => false,
        },
        groups::GROUP | groups::MEMBERSHIP => st.groups.load(kind, key, value),
        _ => false,
    }
}

/// The record kinds the registry keeps (others, such as shadows or jobs, belong to the
/// services).
const REGISTRY_KINDS: [&str; 9] = [
    THING,
    CERT,
    POLICY,
    CA,
    POLICY_ATTACHMENT,
    THING_ATTACHMENT,
    TOKEN_KEY,
    groups::GROUP,
    groups::MEMBERSHIP,
];

/// Takes a deleted record out of `st` (or `keyring`).
fn remove_record(st: &mut State, keyring: &mut Keyring, kind: &str, key: &str) {
    match kind {
        TOKEN_KEY => {
            keyring.remove(key);
        }
        THING => {
            st.things.remove(key);
        }
        CERT => {
            st.certs.remove(key);
        }
        CA => {
            st.cas.remove(key);
        }
        POLICY => {
            st.policies.remove(key);
        }
        POLICY_ATTACHMENT | THING_ATTACHMENT => {
            if let Some((cert, target)) = key.split_once('/') {
                let map = if kind == POLICY_ATTACHMENT {
                    &mut st.cert_policies
                } else {
                    &mut st.cert_things
                };
                if let Some(set) = map.get_mut(cert) {
                    set.remove(target);
                    if set.is_empty() {
                        map.remove(cert);
                    }
                }
            }
        }
        groups::GROUP => {
            st.groups.remove(key);
        }
        groups::MEMBERSHIP => {
            if let Some((group, thing)) = key.split_once('/') {
                st.groups.unlink(group, thing);
            }
        }
        _ => {}
    }
}

impl Registry {
    /// Rebuilds the registry from the store's records. A record that no
    /// longer reads is skipped with a warning. `tokens` sets token lifetimes and
    /// key rotation.
    pub fn new(
        store: Arc<dyn RecordStore>,
        records: &[(String, String, Vec<u8>, u64)],
        tokens: TokenConfig,
    ) -> Registry {
        let mut st = State::default();
        let mut keyring = Keyring::new(tokens.max_ttl_secs);
        let mut revisions = Revisions::default();
        for (kind, key, value, revision) in records {
            if !REGISTRY_KINDS.contains(&kind.as_str()) {
                continue;
            }
            revisions
                .known
                .insert((kind.clone(), key.clone()), (*revision, true));
            if !load_record(&mut st, &mut keyring, kind, key, value) {
                tracing::warn!(kind = %kind, key = %key, "skipping unreadable registry record");
            }
        }
        let things = &st.things;
        st.groups.settle(|t| things.contains_key(t));
        Registry {
            state: RwLock::new(st),
            write: tokio::sync::Mutex::new(()),
            in_flight: parking_lot::Mutex::new(BTreeSet::new()),
            settled: tokio::sync::Notify::new(),
            generation: AtomicU64::new(1),
            store,
            tokens: RwLock::new(keyring),
            token_config: tokens,
            listeners: RwLock::new(Vec::new()),
            revisions: parking_lot::Mutex::new(revisions),
        }
    }

    /// Calls `f` on every [`RegistryEvent`] from now on, after the change is on disk
    /// and in memory, on the task that made the change. `f` must not block.
    pub fn on_event(&self, f: impl Fn(&RegistryEvent) + Send + Sync + 'static) {
        self.listeners.write().push(Arc::new(f));
    }

    /// Applies a record another node stored (see `RecordStore::watch_records`): the
    /// same change to memory as the node that made it, the generation moved, and the
    /// events the change calls for told here too (a certificate that left ACTIVE is cut
    /// off on this node as well; a CA change reloads this node's TLS trust). A record of
    /// a kind the registry does not keep is ignored. `revision` orders the changes of one
    /// record: one no newer than what memory holds (applied twice, or overtaken by a
    /// later write) is dropped. While this registry is writing, the change waits until
    /// it is done (see [`Revisions`]).
    pub fn apply_stored(&self, kind: &str, key: &str, value: Option<&[u8]>, revision: u64) {
        if !REGISTRY_KINDS.contains(&kind) {
            return;
        }
        self.revisions.lock().deferred.push((
            kind.to_owned(),
            key.to_owned(),
            value.map(<[u8]>::to_vec),
            revision,
        ));
        if let Ok(lock) = self.write.try_lock() {
            drop(WriteGuard {
                registry: self,
                _lock: lock,
            });
        }
        // Otherwise the holder of the write lock applies it when it lets go.
    }

    /// Applies the changes of other writers that waited, except those of records with
    /// a write in flight. Called with the write lock held.
    fn apply_deferred(&self) {
        loop {
            let ready: Vec<_> = {
                let mut r = self.revisions.lock();
                if r.deferred.is_empty() {
                    return;
                }
                let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut r.deferred)
                    .into_iter()
                    .partition(|c| !r.writing.contains_key(&(c.0.clone(), c.1.clone())));
                r.deferred = waiting;
                let mut fresh = Vec::new();
                for (kind, key, value, revision) in ready {
                    let id = (kind, key);
                    if r.known
                        .get(&id)
                        .is_some_and(|(known, _)| *known >= revision)
                    {
                        continue;
                    }
                    r.known.insert(id.clone(), (revision, value.is_some()));
                    fresh.push((id.0, id.1, value));
                }
                fresh
            };
            if ready.is_empty() {
                return;
            }
            for (kind, key, value) in ready {
                self.apply_change(&kind, &key, value.as_deref());
            }
        }
    }

    /// The change to memory and the events of one stored record change.
    fn apply_change(&self, kind: &str, key: &str, value: Option<&[u8]>) {
        let mut events = Vec::new();
        {
            let mut st = self.state.write();
            let was_active = (kind == CERT)
                .then(|| st.certs.get(key).map(|c| c.state == CertState::Active))
                .flatten();
            let had_member = (kind == groups::MEMBERSHIP)
                .then(|| key.split_once('/'))
                .flatten()
                .map(|(g, t)| (g.to_owned(), t.to_owned(), st.groups.is_member(g, t)));
            match value {
                Some(value) => {
                    let mut keyring = self.tokens.write();
                    if !load_record(&mut st, &mut keyring, kind, key, value) {
                        tracing::warn!(
                            kind,
                            key,
                            "skipping an unreadable registry record from another node"
                        );
                        return;
                    }
                }
                None => remove_record(&mut st, &mut self.tokens.write(), kind, key),
            }
            if kind == groups::GROUP {
                let State { groups, things, .. } = &mut *st;
                groups.settle(|t| things.contains_key(t));
            }
            if was_active == Some(true) {
                match st.certs.get(key).map(|c| c.state) {
                    Some(CertState::Active) => {}
                    state => events.push(RegistryEvent::CertificateLeftActive {
                        cert_id: key.to_owned(),
                        state: state.unwrap_or(CertState::Revoked),
                    }),
                }
            }
            if kind == CA {
                events.push(RegistryEvent::CasChanged);
            }
            if let Some((group, thing, was)) = had_member {
                let now = st.groups.is_member(&group, &thing);
                if now != was {
                    events.push(RegistryEvent::GroupMembershipChanged {
                        group,
                        thing,
                        added: now,
                    });
                }
            }
        }
        if kind != TOKEN_KEY {
            self.bump();
        }
        for ev in events {
            self.tell(ev);
        }
    }

    fn tell(&self, ev: RegistryEvent) {
        let listeners: Vec<Listener> = self.listeners.read().clone();
        for l in listeners {
            l(&ev);
        }
    }

    /// Changes whenever anything in the registry changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The write lock for a change that must see every earlier change applied: taken
    /// once no pipelined change is in flight.
    async fn exclusive(&self) -> WriteGuard<'_> {
        loop {
            let guard = self.lock_writes().await;
            // Made before the check, so a notification between the two is not lost.
            let settled = self.settled.notified();
            if self.in_flight.lock().is_empty() {
                return guard;
            }
            drop(guard);
            settled.await;
        }
    }

    /// The write lock for a pipelined change touching `keys` (plus those `more` names
    /// given the state): taken once none of them is in flight. Returns the guard and
    /// every key of the change.
    async fn reserve(
        &self,
        keys: Vec<String>,
        more: impl Fn(&State) -> Vec<String>,
    ) -> (WriteGuard<'_>, Vec<String>) {
        loop {
            let guard = self.lock_writes().await;
            let settled = self.settled.notified();
            let mut all = keys.clone();
            all.extend(more(&self.state.read()));
            if !all.iter().any(|k| self.in_flight.lock().contains(k)) {
                return (guard, all);
            }
            drop(guard);
            settled.await;
        }
    }

    /// Submits `ops` while `guard` is held (so the store sees changes in the order they
    /// were validated), lets the next change in, waits for the commit, then applies
    /// `change` to memory and moves the generation. The keys stay reserved until then.
    async fn apply_pipelined(
        &self,
        guard: WriteGuard<'_>,
        keys: Vec<String>,
        ops: Vec<RecordOp>,
        change: impl FnOnce(&mut State),
    ) -> Result<()> {
        let (commit, written) = self.submit(ops);
        self.in_flight.lock().extend(keys.iter().cloned());
        drop(guard);
        let done = commit.await;
        self.written(&written, &done);
        if done.is_ok() {
            change(&mut self.state.write());
            self.bump();
        }
        {
            let mut in_flight = self.in_flight.lock();
            for k in &keys {
                in_flight.remove(k);
            }
        }
        self.end_writing(&written);
        if let Ok(lock) = self.write.try_lock() {
            drop(WriteGuard {
                registry: self,
                _lock: lock,
            });
        }
        self.settled.notify_waiters();
        done.map(|_| ()).map_err(RegistryError::from)
    }

    /// The write lock (see [`WriteGuard`]).
    async fn lock_writes(&self) -> WriteGuard<'_> {
        WriteGuard {
            registry: self,
            _lock: self.write.lock().await,
        }
    }

    /// Submits `ops` with the revision memory holds expected for each registry record
    /// they write, and marks those records as being written. Returns the commit and,
    /// for each put or delete in order, its record and whether it puts (`None` for a
    /// record of another kind, which a service hands in to be written in the same
    /// commit and which is written as it is).
    fn submit(&self, ops: Vec<RecordOp>) -> (RecordCommit, Vec<Written>) {
        let mut written: Vec<Written> = Vec::new();
        let mut out = Vec::with_capacity(ops.len() * 2);
        {
            let mut r = self.revisions.lock();
            for op in ops {
                let (kind, key, puts) = match &op {
                    RecordOp::Put { kind, key, .. } => (*kind, key, true),
                    RecordOp::Delete { kind, key } => (*kind, key, false),
                    RecordOp::Expect { .. } => {
                        out.push(op);
                        continue;
                    }
                };
                if !REGISTRY_KINDS.contains(&kind) {
                    written.push(None);
                    out.push(op);
                    continue;
                }
                let id = (kind.to_owned(), key.clone());
                if !written.iter().flatten().any(|(w, _)| *w == id) {
                    out.push(RecordOp::Expect {
                        kind,
                        key: key.clone(),
                        revision: r
                            .known
                            .get(&id)
                            .and_then(|(rev, exists)| exists.then_some(*rev)),
                    });
                    *r.writing.entry(id.clone()).or_insert(0) += 1;
                }
                written.push(Some((id, puts)));
                out.push(op);
            }
        }
        (self.store.submit_records(out), written)
    }

    /// Takes the revisions a commit gave its records into what memory holds.
    fn written(&self, written: &[Written], done: &std::result::Result<Vec<u64>, StoreError>) {
        let Ok(revisions) = done else { return };
        let mut r = self.revisions.lock();
        for (w, revision) in written.iter().zip(revisions) {
            if let Some((id, puts)) = w {
                r.known.insert(id.clone(), (*revision, *puts));
            }
        }
    }

    /// The records of `written` are no longer being written by this registry.
    fn end_writing(&self, written: &[Written]) {
        let mut r = self.revisions.lock();
        let mut seen: Vec<&RecordId> = Vec::new();
        for (id, _) in written.iter().flatten() {
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            if let Some(n) = r.writing.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    r.writing.remove(id);
                }
            }
        }
    }

    async fn commit(&self, ops: Vec<RecordOp>) -> Result<()> {
        let (commit, written) = self.submit(ops);
        let done = commit.await;
        self.written(&written, &done);
        self.end_writing(&written);
        done.map(|_| ()).map_err(RegistryError::from)
    }

    /// The one way a change is made: write `ops` (durable when this returns), then
    /// apply `change` to memory and move the generation. Called under `write`, so
    /// nothing another node stored is applied in between (it waits for the lock).
    async fn apply(&self, ops: Vec<RecordOp>, change: impl FnOnce(&mut State)) -> Result<()> {
        self.commit(ops).await?;
        change(&mut self.state.write());
        self.bump();
        Ok(())
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    // ----- things ------------------------------------------------------

    pub async fn create_thing(
        &self,
        name: &str,
        thing_type: Option<String>,
        attributes: BTreeMap<String, String>,
    ) -> Result<Thing> {
        valid_thing_name(name)?;
        valid_attributes(&attributes)?;
        let _w = self.exclusive().await;
        if self.state.read().things.contains_key(name) {
            return Err(RegistryError::Conflict(format!(
                "thing {name:?} already exists"
            )));
        }
        let thing = Thing {
            name: name.to_owned(),
            thing_type,
            attributes,
            version: 1,
            created_ms: now_ms(),
        };
        self.apply(vec![put(THING, name, &thing)], |st| {
            st.things.insert(name.to_owned(), thing.clone());
        })
        .await?;
        Ok(thing)
    }

    /// Replaces the type (when given) and merges (or, with `merge` false,
    /// replaces) the attributes; an attribute set to "" is removed on merge.
    pub async fn update_thing(
        &self,
        name: &str,
        thing_type: Option<String>,
        attributes: Option<BTreeMap<String, String>>,
        merge: bool,
    ) -> Result<Thing> {
        let _w = self.exclusive().await;
        let mut thing = self.thing(name).ok_or_else(|| not_found("thing", name))?;
        if let Some(t) = thing_type {
            thing.thing_type = (!t.is_empty()).then_some(t);
        }
        if let Some(attrs) = attributes {
            if merge {
                for (k, v) in attrs {
                    if v.is_empty() {
                        thing.attributes.remove(&k);
                    } else {
                        thing.attributes.insert(k, v);
                    }
                }
            } else {
                thing.attributes = attrs;
            }
        }
        valid_attributes(&thing.attributes)?;
        thing.version += 1;
        self.apply(vec![put(THING, name, &thing)], |st| {
            st.things.insert(name.to_owned(), thing.clone());
        })
        .await?;
        Ok(thing)
    }

    pub async fn delete_thing(&self, name: &str) -> Result<()> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            if !st.things.contains_key(name) {
                return Err(not_found("thing", name));
            }
            if st.cert_things.values().any(|s| s.contains(name)) {
                return Err(RegistryError::Conflict(format!(
                    "thing {name:?} still has certificates attached; detach them first"
                )));
            }
        }
        let in_groups = self.thing_groups(name);
        let mut ops = vec![del(THING, name)];
        ops.extend(
            in_groups
                .iter()
                .map(|g| groups::Groups::del_membership(g, name)),
        );
        self.apply(ops, |st| {
            st.things.remove(name);
            for g in &in_groups {
                st.groups.unlink(g, name);
            }
        })
        .await?;
        for group in in_groups {
            self.tell(RegistryEvent::GroupMembershipChanged {
                group,
                thing: name.to_owned(),
                added: false,
            });
        }
        Ok(())
    }

    pub fn thing(&self, name: &str) -> Option<Thing> {
        self.state.read().things.get(name).cloned()
    }

    pub fn things(&self) -> Vec<Thing> {
        self.state.read().things.values().cloned().collect()
    }

    /// Certificate ids attached to a thing.
    pub fn thing_principals(&self, name: &str) -> Vec<String> {
        let st = self.state.read();
        st.cert_things
            .iter()
            .filter(|(_, things)| things.contains(name))
            .map(|(c, _)| c.clone())
            .collect()
    }

    // ----- certificates ------------------------------------------------

    pub async fn register_certificate(&self, c: NewCert, state: CertState) -> Result<CertRecord> {
        self.register_certificate_with(c, state, Vec::new()).await
    }

    /// Changes a certificate's state. Leaving ACTIVE is told as
    /// [`RegistryEvent::CertificateLeftActive`], so the engine cuts off its live
    /// connections whoever made the change.
    pub async fn set_certificate_state(&self, id: &str, state: CertState) -> Result<CertRecord> {
        let _w = self.exclusive().await;
        let mut rec = self
            .certificate(id)
            .ok_or_else(|| not_found("certificate", id))?;
        if rec.state == CertState::Revoked && state != CertState::Revoked {
            return Err(RegistryError::Conflict(format!(
                "certificate {id} is REVOKED; a revoked certificate cannot be reactivated"
            )));
        }
        let now = now_ms();
        if state == CertState::Revoked && rec.state != CertState::Revoked {
            rec.revoked_ms = Some(now);
        }
        let was = rec.state;
        rec.state = state;
        rec.updated_ms = now;
        self.apply(vec![put(CERT, id, &rec)], |st| {
            st.certs.insert(id.to_owned(), rec.clone());
        })
        .await?;
        if was == CertState::Active && state != CertState::Active {
            self.tell(RegistryEvent::CertificateLeftActive {
                cert_id: id.to_owned(),
                state,
            });
        }
        Ok(rec)
    }

    pub async fn delete_certificate(&self, id: &str) -> Result<()> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            let rec = st
                .certs
                .get(id)
                .ok_or_else(|| not_found("certificate", id))?;
            if rec.state == CertState::Active {
                return Err(RegistryError::Conflict(format!(
                    "certificate {id} is ACTIVE; make it INACTIVE or REVOKED first"
                )));
            }
            if st.cert_policies.get(id).is_some_and(|s| !s.is_empty())
                || st.cert_things.get(id).is_some_and(|s| !s.is_empty())
            {
                return Err(RegistryError::Conflict(format!(
                    "certificate {id} still has policies or things attached"
                )));
            }
        }
        self.apply(vec![del(CERT, id)], |st| {
            st.certs.remove(id);
        })
        .await?;
        Ok(())
    }

    pub fn certificate(&self, id: &str) -> Option<CertRecord> {
        self.state.read().certs.get(id).cloned()
    }

    /// A certificate's state, without copying its record.
    pub fn certificate_state(&self, id: &str) -> Option<CertState> {
        self.state.read().certs.get(id).map(|c| c.state)
    }

    pub fn certificates(&self) -> Vec<CertRecord> {
        self.state.read().certs.values().cloned().collect()
    }

    /// (serial, revocation time ms) of every REVOKED certificate, for the CRL.
    pub fn revoked(&self) -> Vec<(String, u64)> {
        self.state
            .read()
            .certs
            .values()
            .filter(|c| c.state == CertState::Revoked)
            .map(|c| (c.serial.clone(), c.revoked_ms.unwrap_or(c.updated_ms)))
            .collect()
    }

    // ----- policies ----------------------------------------------------

    pub async fn create_policy(&self, name: &str, document: &str) -> Result<PolicyRecord> {
        valid_policy_name(name)?;
        let compiled = compile(name, document)?;
        let _w = self.exclusive().await;
        if self.state.read().policies.contains_key(name) {
            return Err(RegistryError::Conflict(format!(
                "policy {name:?} already exists"
            )));
        }
        let now = now_ms();
        let rec = PolicyRecord {
            name: name.to_owned(),
            versions: BTreeMap::from([(
                1,
                PolicyVersion {
                    document: document.to_owned(),
                    created_ms: now,
                },
            )]),
            default_version: 1,
            created_ms: now,
        };
        self.apply(vec![put(POLICY, name, &rec)], |st| {
            st.policies.insert(name.to_owned(), (rec.clone(), compiled));
        })
        .await?;
        Ok(rec)
    }

    /// Adds a version (IoT Core keeps at most 5: the oldest non-default one is dropped).
    pub async fn create_policy_version(
        &self,
        name: &str,
        document: &str,
        set_default: bool,
    ) -> Result<PolicyRecord> {
        let compiled = compile(name, document)?;
        let _w = self.exclusive().await;
        let (mut rec, old) = self
            .state
            .read()
            .policies
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("policy", name))?;
        let next = rec.versions.keys().max().copied().unwrap_or(0) + 1;
        rec.versions.insert(
            next,
            PolicyVersion {
                document: document.to_owned(),
                created_ms: now_ms(),
            },
        );
        if rec.versions.len() > 5 {
            if let Some(oldest) = rec
                .versions
                .keys()
                .copied()
                .find(|v| *v != rec.default_version)
            {
                rec.versions.remove(&oldest);
            }
        }
        let compiled = if set_default {
            rec.default_version = next;
            compiled
        } else {
            old
        };
        self.apply(vec![put(POLICY, name, &rec)], |st| {
            st.policies.insert(name.to_owned(), (rec.clone(), compiled));
        })
        .await?;
        Ok(rec)
    }

    pub async fn set_default_policy_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<PolicyRecord> {
        let _w = self.exclusive().await;
        let (mut rec, _) = self
            .state
            .read()
            .policies
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("policy", name))?;
        let doc = rec
            .versions
            .get(&version)
            .ok_or_else(|| not_found("policy version", &format!("{name} v{version}")))?
            .document
            .clone();
        let compiled = compile(name, &doc)?;
        rec.default_version = version;
        self.apply(vec![put(POLICY, name, &rec)], |st| {
            st.policies.insert(name.to_owned(), (rec.clone(), compiled));
        })
        .await?;
        Ok(rec)
    }

    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            if !st.policies.contains_key(name) {
                return Err(not_found("policy", name));
            }
            if st.cert_policies.values().any(|s| s.contains(name)) {
                return Err(RegistryError::Conflict(format!(
                    "policy {name:?} is attached to certificates; detach it first"
                )));
            }
        }
        self.apply(vec![del(POLICY, name)], |st| {
            st.policies.remove(name);
        })
        .await?;
        Ok(())
    }

    pub fn policy(&self, name: &str) -> Option<PolicyRecord> {
        self.state.read().policies.get(name).map(|(p, _)| p.clone())
    }

    pub fn policies(&self) -> Vec<PolicyRecord> {
        self.state
            .read()
            .policies
            .values()
            .map(|(p, _)| p.clone())
            .collect()
    }

    // ----- attachments -------------------------------------------------

    pub async fn attach_policy(&self, policy: &str, cert_id: &str) -> Result<()> {
        self.attach(POLICY_ATTACHMENT, policy, cert_id, true).await
    }

    pub async fn detach_policy(&self, policy: &str, cert_id: &str) -> Result<()> {
        self.attach(POLICY_ATTACHMENT, policy, cert_id, false).await
    }

    pub async fn attach_thing(&self, thing: &str, cert_id: &str) -> Result<()> {
        self.attach(THING_ATTACHMENT, thing, cert_id, true).await
    }

    pub async fn detach_thing(&self, thing: &str, cert_id: &str) -> Result<()> {
        self.attach(THING_ATTACHMENT, thing, cert_id, false).await
    }

    async fn attach(
        &self,
        kind: &'static str,
        target: &str,
        cert_id: &str,
        on: bool,
    ) -> Result<()> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            if !st.certs.contains_key(cert_id) {
                return Err(not_found("certificate", cert_id));
            }
            let exists = if kind == POLICY_ATTACHMENT {
                st.policies.contains_key(target)
            } else {
                st.things.contains_key(target)
            };
            if on && !exists {
                let what = if kind == POLICY_ATTACHMENT {
                    "policy"
                } else {
                    "thing"
                };
                return Err(not_found(what, target));
            }
        }
        let key = format!("{cert_id}/{target}");
        let op = if on {
            put(kind, &key, &true)
        } else {
            del(kind, &key)
        };
        self.apply(vec![op], |st| {
            let map = if kind == POLICY_ATTACHMENT {
                &mut st.cert_policies
            } else {
                &mut st.cert_things
            };
            let set = map.entry(cert_id.to_owned()).or_default();
            if on {
                set.insert(target.to_owned());
            } else {
                set.remove(target);
            }
        })
        .await
    }

    pub fn certificate_policies(&self, cert_id: &str) -> Vec<String> {
        let st = self.state.read();
        st.cert_policies
            .get(cert_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn certificate_things(&self, cert_id: &str) -> Vec<String> {
        let st = self.state.read();
        st.cert_things
            .get(cert_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    // ----- CAs ---------------------------------------------------------

    pub async fn register_ca(&self, rec: CaRecord) -> Result<CaRecord> {
        let _w = self.exclusive().await;
        if self.state.read().cas.contains_key(&rec.id) {
            return Err(RegistryError::Conflict(format!(
                "CA {} is already registered",
                rec.id
            )));
        }
        self.apply(vec![put(CA, &rec.id, &rec)], |st| {
            st.cas.insert(rec.id.clone(), rec.clone());
        })
        .await?;
        self.tell(RegistryEvent::CasChanged);
        Ok(rec)
    }

    pub fn cas(&self) -> Vec<CaRecord> {
        self.state.read().cas.values().cloned().collect()
    }

    // ----- identity ----------------------------------------------------

    /// Who a verified client certificate is, and what it may do: the
    /// certificate must be registered and ACTIVE; the thing named by its CN
    /// binds the thing variables when the client id equals the thing name and
    /// the thing is attached to the certificate (as in IoT Core).
    pub fn resolve(
        &self,
        cert: &ClientCert,
        client_id: &str,
    ) -> std::result::Result<Authz, IdentityError> {
        resolve_in(&self.state.read(), cert, client_id)
    }

    // ----- device tokens -----------------------------------------------

    /// Token lifetimes and key rotation, as configured.
    pub fn token_config(&self) -> &TokenConfig {
        &self.token_config
    }

    /// Checks a token's form, key, signature and times now; reads memory only.
    pub fn verify_token(&self, token: &str) -> std::result::Result<TokenClaims, TokenError> {
        let claims = self.tokens.read().verify(token, now_ms())?;
        // No token outlives the longest lifetime this broker issues, even one
        // signed with a leaked key.
        if claims.exp.saturating_sub(claims.iat) > self.token_config().max_ttl_secs {
            return Err(TokenError::Malformed(
                "lifetime longer than tokens.max_ttl_secs",
            ));
        }
        Ok(claims)
    }

    /// Who a verified token's holder is and what it may do: the certificate it names
    /// must be registered and ACTIVE, the thing it names must exist and be attached to
    /// that certificate. The answer is what [`resolve`](Self::resolve) gives for that
    /// certificate (its policies, and variables from its subject, as for a TLS client),
    /// with the certificate, whose fingerprint identifies the connection for
    /// revocation and for re-resolving when the generation moves.
    pub fn resolve_token(
        &self,
        claims: &TokenClaims,
        client_id: &str,
    ) -> std::result::Result<(Authz, ClientCert), IdentityError> {
        use rustls_pki_types::pem::PemObject;
        let st = self.state.read();
        let rec = st
            .certs
            .get(&claims.cert)
            .ok_or_else(|| IdentityError::TokenCertNotRegistered(claims.cert.clone()))?;
        if rec.state != CertState::Active {
            return Err(IdentityError::NotActive {
                id: rec.id.clone(),
                state: rec.state,
            });
        }
        if !st.things.contains_key(&claims.thing) {
            return Err(IdentityError::NoSuchThing(claims.thing.clone()));
        }
        if !st
            .cert_things
            .get(&rec.id)
            .is_some_and(|t| t.contains(&claims.thing))
        {
            return Err(IdentityError::NotAttached {
                thing: claims.thing.clone(),
                cert: rec.id.clone(),
            });
        }
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(rec.pem.as_bytes())
            .ok()
            .and_then(|der| ClientCert::from_der(&der))
            .filter(|c| c.fingerprint == rec.id)
            .ok_or_else(|| IdentityError::UnreadablePem(rec.id.clone()))?;
        let authz = resolve_in(&st, &cert, client_id)?;
        Ok((authz, cert))
    }

    /// Issues a token for `thing`, standing for certificate `cert` (which must be ACTIVE
    /// and attached to the thing) or, without one, for the thing's most recently created
    /// ACTIVE certificate; valid for `ttl` (1 s up to `[tokens] max_ttl_secs`). Makes
    /// a signing key first when there is none or the current one is older than
    /// `[tokens] key_rotation_secs`.
    pub async fn issue_token(
        &self,
        thing: &str,
        cert: Option<&str>,
        ttl: Duration,
    ) -> Result<IssuedToken> {
        self.issue_token_at(thing, cert, ttl, now_ms()).await
    }

    async fn issue_token_at(
        &self,
        thing: &str,
        cert: Option<&str>,
        ttl: Duration,
        now: u64,
    ) -> Result<IssuedToken> {
        let max = self.token_config.max_ttl_secs;
        let ttl_secs = ttl.as_secs();
        if ttl_secs == 0 {
            return Err(RegistryError::Invalid(
                "token lifetime must be at least 1 second".into(),
            ));
        }
        if ttl_secs > max || (ttl_secs == max && ttl.subsec_nanos() > 0) {
            return Err(RegistryError::Invalid(format!(
                "token lifetime of {ttl_secs} s is more than the maximum of {max} s ([tokens] max_ttl_secs)"
            )));
        }
        let _w = self.exclusive().await;
        let cert_id = self.token_certificate(thing, cert)?;
        let rotate = match self.tokens.read().signing_key() {
            None => true,
            Some(k) => {
                now.saturating_sub(k.created_ms())
                    >= self.token_config.key_rotation_secs.saturating_mul(1000)
            }
        };
        if rotate {
            let key = self.new_token_key(now).await?;
            tracing::info!(key_id = %key.kid, "made a new token signing key");
        }
        let iat = now / 1000;
        let issued = self
            .tokens
            .read()
            .issue(thing, &cert_id, iat, iat.saturating_add(ttl_secs))
            .map_err(|e| RegistryError::Signing(e.to_string()))?;
        Ok(issued)
    }

    /// The certificate a token for `thing` stands for (see `issue_token`).
    fn token_certificate(&self, thing: &str, cert: Option<&str>) -> Result<String> {
        let st = self.state.read();
        if !st.things.contains_key(thing) {
            return Err(not_found("thing", thing));
        }
        let attached = |id: &str| st.cert_things.get(id).is_some_and(|t| t.contains(thing));
        match cert {
            Some(id) => {
                let rec = st.certs.get(id).ok_or_else(|| not_found("certificate", id))?;
                if rec.state != CertState::Active {
                    return Err(RegistryError::Conflict(format!(
                        "certificate {id} is {}; a token can only stand for an ACTIVE certificate",
                        rec.state
                    )));
                }
                if !attached(id) {
                    return Err(RegistryError::Conflict(format!(
                        "certificate {id} is not attached to thing {thing:?}"
                    )));
                }
                Ok(id.to_owned())
            }
            None => st
                .certs
                .values()
                .filter(|c| c.state == CertState::Active && attached(&c.id))
                .max_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)))
                .map(|c| c.id.clone())
                .ok_or_else(|| {
                    RegistryError::Conflict(format!(
                        "thing {thing:?} has no ACTIVE certificate attached; a token stands for one \
                         (issue one with POST /certificates/create or attach one)"
                    ))
                }),
        }
    }

    /// Makes a new signing key now: the current one retires and verifies for
    /// `[tokens] max_ttl_secs` more.
    pub async fn rotate_token_key(&self) -> Result<TokenKeyInfo> {
        let _w = self.exclusive().await;
        self.new_token_key(now_ms()).await
    }

    /// Every token key, oldest first; the last one signs.
    pub fn token_keys(&self) -> Vec<TokenKeyInfo> {
        self.tokens.read().infos()
    }

    /// Stores a new signing key and drops retired keys past their grace period, then
    /// puts them in force. Called with `write` held.
    async fn new_token_key(&self, now: u64) -> Result<TokenKeyInfo> {
        let (created_ms, pruned) = {
            let ring = self.tokens.read();
            // Newer than every key, even if the clock stepped back.
            let newest = ring.signing_key().map(|k| k.created_ms().saturating_add(1));
            (now.max(newest.unwrap_or(0)), ring.expired_keys(now))
        };
        let stored = StoredKey::generate(created_ms).map_err(|e| RegistryError::Signing(e.0))?;
        let key = TokenKey::load(&stored).map_err(|e| RegistryError::Signing(e.0))?;
        let mut ops = vec![put(TOKEN_KEY, &stored.kid, &stored)];
        ops.extend(pruned.iter().map(|kid| del(TOKEN_KEY, kid)));
        self.commit(ops).await?;
        let mut ring = self.tokens.write();
        ring.add(key);
        for kid in &pruned {
            ring.remove(kid);
            tracing::info!(key_id = %kid, "pruned a retired token key");
        }
        ring.infos()
            .pop()
            .ok_or_else(|| RegistryError::Signing("the new token key is missing".into()))
    }
}

/// [`Registry::resolve`] with the state already read.
fn resolve_in(
    st: &State,
    cert: &ClientCert,
    client_id: &str,
) -> std::result::Result<Authz, IdentityError> {
    let Some(rec) = st.certs.get(&cert.fingerprint) else {
        return Err(IdentityError::NotRegistered {
            id: cert.fingerprint.clone(),
            cn: cert.subject_cn.clone().unwrap_or_default(),
        });
    };
    if rec.state != CertState::Active {
        return Err(IdentityError::NotActive {
            id: rec.id.clone(),
            state: rec.state,
        });
    }
    let attached_things = st.cert_things.get(&rec.id);
    let mut vars = Vars {
        client_id: Some(client_id.to_owned()),
        cert_subject: cert.attributes.clone(),
        cert_issuer: cert.issuer_attributes.clone(),
        cert_serial: Some(cert.serial.clone()),
        ..Vars::default()
    };
    // IoT Core binds the thing variables to the thing named by the client id when it
    // is attached to the certificate. The CN still sets `IsAttached` when it names an
    // attached thing (certificates this CA issued carry the thing name as CN; those
    // made by fleet provisioning do not).
    let attached = |name: &str| attached_things.is_some_and(|s| s.contains(name));
    let cn_attached = cert.subject_cn.as_deref().map(attached);
    if cn_attached.is_some() || attached(client_id) {
        vars.thing_attached = Some(cn_attached.unwrap_or(false) || attached(client_id));
    }
    {
        let thing_name = client_id;
        if attached(thing_name) {
            if let Some(thing) = st.things.get(thing_name) {
                vars.thing_name = Some(thing.name.clone());
                vars.thing_type = thing.thing_type.clone();
                vars.thing_attributes = thing
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
            }
        }
    }
    let policies: Vec<Arc<Policy>> = st
        .cert_policies
        .get(&rec.id)
        .into_iter()
        .flatten()
        .filter_map(|name| st.policies.get(name).map(|(_, p)| p.clone()))
        .collect();
    let refs: Vec<&Policy> = policies.iter().map(|p| p.as_ref()).collect();
    Ok(Authz::bind_vars(&refs, &vars))
}

fn not_found(what: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!("{what} {name:?} not found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_policy::Action;
    use fleetcore_store::Store;

    fn cert(id: &str, cn: &str) -> ClientCert {
        ClientCert {
            subject_cn: Some(cn.into()),
            attributes: vec![("CN".into(), cn.into())],
            fingerprint: id.into(),
            ..ClientCert::default()
        }
    }

    fn new_cert(id: &str, cn: &str) -> NewCert {
        NewCert {
            id: id.into(),
            pem: String::new(),
            subject: format!("CN={cn}"),
            subject_cn: Some(cn.into()),
            issuer: "CN=test".into(),
            serial: "01".into(),
            not_after_ms: u64::MAX,
        }
    }

    /// Passes every op to a redb store and keeps a copy of each write with the
    /// revision it got: what another node's watch would hand on.
    struct Tee {
        inner: Store,
        ops: Arc<parking_lot::Mutex<Vec<(RecordOp, u64)>>>,
    }

    impl RecordStore for Tee {
        fn submit_records(&self, ops: Vec<RecordOp>) -> fleetcore_core::storage::RecordCommit {
            let commit = self.inner.submit_records(ops.clone());
            let kept = self.ops.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let result = commit.await;
                if let Ok(revisions) = &result {
                    let writes = ops
                        .into_iter()
                        .filter(|op| !matches!(op, RecordOp::Expect { .. }));
                    kept.lock().extend(writes.zip(revisions.iter().copied()));
                }
                let _ = tx.send(result);
            });
            fleetcore_core::storage::Commit::waiting(rx)
        }
    }

    fn feed(to: &Registry, ops: &[(RecordOp, u64)]) {
        for (op, revision) in ops {
            match op {
                RecordOp::Put { kind, key, value } => {
                    to.apply_stored(kind, key, Some(value), *revision)
                }
                RecordOp::Delete { kind, key } => to.apply_stored(kind, key, None, *revision),
                RecordOp::Expect { .. } => {}
            }
        }
    }

    /// Registry `b` applies, through `apply_stored`, every op registry `a` stored, as a
    /// second node does from its watch: it ends in the same state (things, certificates
    /// and their attachments, policies, CAs, groups and memberships, token keys), tells
    /// the events `a` told, and applying each key's last change again (as a watch may,
    /// for a change already loaded) changes nothing and tells no certificate or
    /// membership event twice.
    #[tokio::test]
    async fn applying_what_another_registry_stored_gives_the_same_state_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let (store_a, _) = Store::open(&dir.path().join("a.redb"), Default::default()).unwrap();
        let (store_b, _) = Store::open(&dir.path().join("b.redb"), Default::default()).unwrap();
        let tee = Arc::new(Tee {
            inner: store_a,
            ops: Default::default(),
        });
        let a = Registry::new(tee.clone(), &[], TokenConfig::default());
        let b = Registry::new(Arc::new(store_b), &[], TokenConfig::default());
        let told = |r: &Registry| {
            let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
            let sink = events.clone();
            r.on_event(move |ev| sink.lock().push(ev.clone()));
            events
        };
        let (a_events, b_events) = (told(&a), told(&b));

        a.rotate_token_key().await.unwrap();
        for t in ["t1", "t2"] {
            a.create_thing(t, None, BTreeMap::from([("account".into(), "x".into())]))
                .await
                .unwrap();
        }
        a.create_policy("agent", AGENT).await.unwrap();
        a.register_certificate(new_cert("c1", "t1"), CertState::Active)
            .await
            .unwrap();
        a.register_certificate(new_cert("c2", "t2"), CertState::Active)
            .await
            .unwrap();
        a.attach_policy("agent", "c1").await.unwrap();
        a.attach_thing("t1", "c1").await.unwrap();
        a.register_ca(CaRecord {
            id: "ca1".into(),
            pem: "pem".into(),
            subject: "CN=ca1".into(),
            created_ms: 1,
        })
        .await
        .unwrap();
        a.create_group("fleet", None, None, BTreeMap::new())
            .await
            .unwrap();
        a.create_group("site", Some("fleet"), None, BTreeMap::new())
            .await
            .unwrap();
        a.add_thing_to_group("site", "t1").await.unwrap();
        a.set_certificate_state("c1", CertState::Revoked)
            .await
            .unwrap();
        a.set_certificate_state("c2", CertState::Inactive)
            .await
            .unwrap();
        a.delete_certificate("c2").await.unwrap();
        a.delete_thing("t2").await.unwrap();

        let ops = tee.ops.lock().clone();
        let g = b.generation();
        feed(&b, &ops);
        assert!(b.generation() > g);
        assert_eq!(b.things(), a.things());
        assert_eq!(b.certificates(), a.certificates());
        assert_eq!(b.certificate_policies("c1"), vec!["agent".to_string()]);
        assert_eq!(b.certificate_things("c1"), vec!["t1".to_string()]);
        assert_eq!(
            b.policies()
                .iter()
                .map(|p| serde_json::to_value(p).unwrap())
                .collect::<Vec<_>>(),
            a.policies()
                .iter()
                .map(|p| serde_json::to_value(p).unwrap())
                .collect::<Vec<_>>()
        );
        assert_eq!(b.cas(), a.cas());
        assert_eq!(b.groups(), a.groups());
        assert_eq!(b.thing_groups("t1"), vec!["site".to_string()]);
        assert_eq!(b.token_keys(), a.token_keys());
        assert_eq!(b.revoked(), a.revoked());

        let wanted = |events: &[RegistryEvent]| {
            events
                .iter()
                .filter(|e| !matches!(e, RegistryEvent::CasChanged))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            wanted(&b_events.lock()),
            wanted(&a_events.lock()),
            "b tells what a told"
        );
        assert!(b_events.lock().contains(&RegistryEvent::CasChanged));
        assert!(b_events
            .lock()
            .contains(&RegistryEvent::CertificateLeftActive {
                cert_id: "c1".into(),
                state: CertState::Revoked,
            }));

        // What a watch may hand on again (a change already loaded): each key's last op.
        let mut last = BTreeMap::new();
        for (op, revision) in &ops {
            let key = match op {
                RecordOp::Put { kind, key, .. }
                | RecordOp::Delete { kind, key }
                | RecordOp::Expect { kind, key, .. } => (kind.to_string(), key.clone()),
            };
            last.insert(key, (op.clone(), *revision));
        }
        let again: Vec<(RecordOp, u64)> = last.into_values().collect();
        let before = wanted(&b_events.lock()).len();
        feed(&b, &again);
        assert_eq!(b.things(), a.things());
        assert_eq!(b.certificates(), a.certificates());
        let after = wanted(&b_events.lock());
        assert_eq!(after.len(), before, "applied twice, told twice: {after:?}");
    }

    const AGENT: &str = r#"{"Version":"2012-10-17","Statement":[
      {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
      {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"}]}"#;

    #[tokio::test]
    async fn identity_follows_registration_state_attachments_and_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let reg = Registry::new(
            Arc::new(store.clone()),
            &loaded.records,
            TokenConfig::default(),
        );
        let c = cert("aa11", "computer-a");
        assert!(reg
            .resolve(&c, "computer-a")
            .unwrap_err()
            .to_string()
            .contains("not registered"));

        reg.register_certificate(new_cert("aa11", "computer-a"), CertState::Active)
            .await
            .unwrap();
        reg.create_thing(
            "computer-a",
            None,
            BTreeMap::from([("account".into(), "customer-b".into())]),
        )
        .await
        .unwrap();
        reg.create_policy("agent", AGENT).await.unwrap();
        reg.attach_policy("agent", "aa11").await.unwrap();
        // Thing not attached yet: the thing variables stay unbound, nothing matches.
        let a = reg.resolve(&c, "computer-a").unwrap();
        assert!(!a.allows(Action::Connect, "computer-a"));

        let g = reg.generation();
        reg.attach_thing("computer-a", "aa11").await.unwrap();
        assert!(reg.generation() > g, "a change moves the generation");
        let a = reg.resolve(&c, "computer-a").unwrap();
        assert!(a.allows(Action::Connect, "computer-a"));
        assert!(a.allows(Action::Subscribe, "customer-b/computer-a/#"));
        assert!(!a.allows(Action::Subscribe, "customer-b/computer-b/#"));
        // Thing variables are bound only when the client id is the thing name.
        let other = reg.resolve(&c, "someone-else").unwrap();
        assert!(!other.allows(Action::Subscribe, "customer-b/computer-a/#"));

        // An attribute change applies to the next resolution.
        reg.update_thing(
            "computer-a",
            None,
            Some(BTreeMap::from([("account".into(), "customer-c".into())])),
            true,
        )
        .await
        .unwrap();
        let a = reg.resolve(&c, "computer-a").unwrap();
        assert!(a.allows(Action::Subscribe, "customer-c/computer-a/#"));
        assert!(!a.allows(Action::Subscribe, "customer-b/computer-a/#"));

        reg.set_certificate_state("aa11", CertState::Revoked)
            .await
            .unwrap();
        assert!(reg
            .resolve(&c, "computer-a")
            .unwrap_err()
            .to_string()
            .contains("REVOKED"));
        assert_eq!(reg.revoked().len(), 1);
        assert!(reg
            .set_certificate_state("aa11", CertState::Active)
            .await
            .is_err());

        // Everything survives a restart.
        drop(reg);
        drop(store);
        let (store, loaded) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let reg = Registry::new(Arc::new(store), &loaded.records, TokenConfig::default());
        assert_eq!(reg.certificate("aa11").unwrap().state, CertState::Revoked);
        assert_eq!(reg.certificate_policies("aa11"), vec!["agent".to_string()]);
        assert_eq!(
            reg.certificate_things("aa11"),
            vec!["computer-a".to_string()]
        );
        assert_eq!(
            reg.thing("computer-a").unwrap().attributes["account"],
            "customer-c"
        );
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let reg = Registry::new(Arc::new(store), &loaded.records, TokenConfig::default());
        let e = reg
            .create_thing("bad name", None, BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Invalid(_)), "{e}");
        let e = reg
            .create_policy(
                "p",
                r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow"}}"#,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Statement"), "{e}");
        reg.create_thing("t", None, BTreeMap::new()).await.unwrap();
        let e = reg
            .create_thing("t", None, BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Conflict(_)));
        let e = reg.attach_thing("t", "nope").await.unwrap_err();
        assert!(matches!(e, RegistryError::NotFound(_)));
    }

    // ----- device tokens -------------------------------------------------

    fn open(dir: &std::path::Path, tokens: TokenConfig) -> (Registry, Store) {
        let (store, loaded) = Store::open(&dir.join("s.redb"), Default::default()).unwrap();
        (
            Registry::new(Arc::new(store.clone()), &loaded.records, tokens),
            store,
        )
    }

    /// A real self-signed certificate (CN = `cn`, O = customer-b), as registered and
    /// as a TLS client would present it.
    fn real_cert(cn: &str) -> (NewCert, ClientCert) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "customer-b");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let client = ClientCert::from_der(cert.der()).unwrap();
        let new = NewCert {
            id: client.fingerprint.clone(),
            pem: cert.pem(),
            subject: client.subject.clone(),
            subject_cn: client.subject_cn.clone(),
            issuer: client.issuer.clone(),
            serial: client.serial.clone(),
            not_after_ms: u64::MAX,
        };
        (new, client)
    }

    const VARIABLES: &str = r#"{"Version":"2012-10-17","Statement":[
      {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
      {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"},
      {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/org/${iot:Certificate.Subject.Organization}/${iot:Certificate.Subject.CommonName}"},
      {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/serial/${iot:Certificate.SerialNumber}"},
      {"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:*:*:topic/id/${iot:ClientId}"},
      {"Effect":"Deny","Action":"iot:Receive","Resource":"arn:aws:iot:*:*:topic/id/blocked"}]}"#;

    /// A thing `computer-a` (account customer-b) with a real ACTIVE certificate, the
    /// VARIABLES policy attached.
    async fn device(reg: &Registry) -> ClientCert {
        let (new, client) = real_cert("computer-a");
        reg.register_certificate(new, CertState::Active)
            .await
            .unwrap();
        reg.create_thing(
            "computer-a",
            None,
            BTreeMap::from([("account".into(), "customer-b".into())]),
        )
        .await
        .unwrap();
        reg.create_policy("vars", VARIABLES).await.unwrap();
        reg.attach_policy("vars", &client.fingerprint)
            .await
            .unwrap();
        reg.attach_thing("computer-a", &client.fingerprint)
            .await
            .unwrap();
        client
    }

    fn decisions(a: &Authz, serial: &str) -> Vec<bool> {
        let serial_topic = format!("serial/{serial}");
        let cases: [(Action, &str); 12] = [
            (Action::Connect, "computer-a"),
            (Action::Connect, "computer-b"),
            (Action::Subscribe, "customer-b/computer-a/#"),
            (Action::Subscribe, "customer-b/computer-b/#"),
            (Action::Publish, "org/customer-b/computer-a"),
            (Action::Publish, "org/customer-c/computer-a"),
            (Action::Publish, &serial_topic),
            (Action::Publish, "serial/00"),
            (Action::Receive, "id/computer-a"),
            (Action::Receive, "id/someone-else"),
            (Action::Receive, "id/blocked"),
            (Action::Publish, "anything"),
        ];
        cases
            .iter()
            .map(|(act, name)| a.allows(*act, name))
            .collect()
    }

    #[tokio::test]
    async fn a_token_grants_exactly_what_its_certificate_grants() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path(), TokenConfig::default());
        let client = device(&reg).await;
        let issued = reg
            .issue_token("computer-a", None, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(issued.claims.cert, client.fingerprint);
        assert_eq!(issued.claims.thing, "computer-a");
        assert_eq!(issued.claims.exp - issued.claims.iat, 600);
        let claims = reg.verify_token(&issued.token).unwrap();
        assert_eq!(claims, issued.claims);

        for client_id in ["computer-a", "someone-else", "blocked"] {
            let by_cert = reg.resolve(&client, client_id).unwrap();
            let (by_token, cert) = reg.resolve_token(&claims, client_id).unwrap();
            assert_eq!(cert, client, "the token's certificate reads as the TLS one");
            let d = decisions(&by_token, &client.serial);
            assert_eq!(
                d,
                decisions(&by_cert, &client.serial),
                "client id {client_id}"
            );
            if client_id == "computer-a" {
                // The expected decisions, so a sameness of "all false" cannot pass.
                assert_eq!(
                    d,
                    [
                        true, false, true, false, true, false, true, false, true, false, false,
                        false
                    ]
                );
            }
        }
        // A policy change applies to both alike.
        reg.create_policy_version("vars", AGENT, true)
            .await
            .unwrap();
        let (by_token, _) = reg.resolve_token(&claims, "computer-a").unwrap();
        let by_cert = reg.resolve(&client, "computer-a").unwrap();
        assert_eq!(
            decisions(&by_token, &client.serial),
            decisions(&by_cert, &client.serial)
        );
        assert!(!by_token.allows(Action::Publish, "org/customer-b/computer-a"));
    }

    #[tokio::test]
    async fn a_token_stops_working_with_its_certificate_or_thing() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path(), TokenConfig::default());
        let client = device(&reg).await;
        let id = client.fingerprint.clone();
        let issued = reg
            .issue_token("computer-a", Some(&id), Duration::from_secs(600))
            .await
            .unwrap();
        let claims = reg.verify_token(&issued.token).unwrap();
        assert!(reg.resolve_token(&claims, "computer-a").is_ok());

        let mut unknown = claims.clone();
        unknown.cert = "00".repeat(32);
        let e = reg.resolve_token(&unknown, "computer-a").unwrap_err();
        assert!(e.to_string().contains("not registered"), "{e}");

        reg.set_certificate_state(&id, CertState::Inactive)
            .await
            .unwrap();
        let e = reg.resolve_token(&claims, "computer-a").unwrap_err();
        assert_eq!(e.to_string(), format!("certificate {id} is INACTIVE"));
        reg.set_certificate_state(&id, CertState::Active)
            .await
            .unwrap();
        assert!(reg.resolve_token(&claims, "computer-a").is_ok());

        reg.detach_thing("computer-a", &id).await.unwrap();
        let e = reg.resolve_token(&claims, "computer-a").unwrap_err();
        assert!(e.to_string().contains("no longer attached"), "{e}");
        reg.delete_thing("computer-a").await.unwrap();
        let e = reg.resolve_token(&claims, "computer-a").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        reg.create_thing("computer-a", None, BTreeMap::new())
            .await
            .unwrap();
        reg.attach_thing("computer-a", &id).await.unwrap();
        assert!(reg.resolve_token(&claims, "computer-a").is_ok());

        reg.set_certificate_state(&id, CertState::Revoked)
            .await
            .unwrap();
        let e = reg.resolve_token(&claims, "computer-a").unwrap_err();
        assert_eq!(e.to_string(), format!("certificate {id} is REVOKED"));
        // The token itself still verifies: the certificate is what was withdrawn.
        assert!(reg.verify_token(&issued.token).is_ok());
    }

    #[tokio::test]
    async fn issuing_checks_the_thing_the_certificate_and_the_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TokenConfig {
            max_ttl_secs: 7200,
            ..TokenConfig::default()
        };
        let (reg, _store) = open(dir.path(), cfg);
        let hour = Duration::from_secs(3600);
        let e = reg.issue_token("nobody", None, hour).await.unwrap_err();
        assert_eq!(
            e,
            RegistryError::NotFound("thing \"nobody\" not found".into())
        );

        reg.create_thing("t", None, BTreeMap::new()).await.unwrap();
        let e = reg.issue_token("t", None, hour).await.unwrap_err();
        assert!(matches!(e, RegistryError::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("no ACTIVE certificate attached"),
            "{e}"
        );
        assert!(reg.token_keys().is_empty(), "no key is made for a refusal");

        for id in ["c1", "c2", "c3"] {
            reg.register_certificate(new_cert(id, "t"), CertState::Active)
                .await
                .unwrap();
        }
        reg.attach_thing("t", "c1").await.unwrap();
        reg.attach_thing("t", "c2").await.unwrap();
        // Several attached and ACTIVE: the most recently created one.
        let t = reg.issue_token("t", None, hour).await.unwrap();
        assert_eq!(t.claims.cert, "c2");
        reg.set_certificate_state("c2", CertState::Revoked)
            .await
            .unwrap();
        let t = reg.issue_token("t", None, hour).await.unwrap();
        assert_eq!(t.claims.cert, "c1");
        reg.set_certificate_state("c1", CertState::Inactive)
            .await
            .unwrap();
        let e = reg.issue_token("t", None, hour).await.unwrap_err();
        assert!(e.to_string().contains("no ACTIVE certificate"), "{e}");

        // A named certificate: known, ACTIVE and attached to the thing.
        let e = reg.issue_token("t", Some("c9"), hour).await.unwrap_err();
        assert_eq!(
            e,
            RegistryError::NotFound("certificate \"c9\" not found".into())
        );
        let e = reg.issue_token("t", Some("c1"), hour).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate c1 is INACTIVE; a token can only stand for an ACTIVE certificate"
        );
        let e = reg.issue_token("t", Some("c3"), hour).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate c3 is not attached to thing \"t\""
        );
        reg.attach_thing("t", "c3").await.unwrap();
        let t = reg.issue_token("t", Some("c3"), hour).await.unwrap();
        assert_eq!(t.claims.cert, "c3");

        // Lifetimes: at least a second, at most [tokens] max_ttl_secs.
        let e = reg
            .issue_token("t", None, Duration::from_millis(999))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            RegistryError::Invalid("token lifetime must be at least 1 second".into())
        );
        let e = reg
            .issue_token("t", None, Duration::from_secs(7201))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token lifetime of 7201 s is more than the maximum of 7200 s ([tokens] max_ttl_secs)"
        );
        let t = reg
            .issue_token("t", None, Duration::from_secs(7200))
            .await
            .unwrap();
        assert_eq!(t.claims.exp - t.claims.iat, 7200);
    }

    #[tokio::test]
    async fn token_keys_rotate_retire_prune_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TokenConfig {
            max_ttl_secs: 100,
            default_ttl_secs: 10,
            key_rotation_secs: 1000,
        };
        let (reg, store) = open(dir.path(), cfg.clone());
        reg.create_thing("t", None, BTreeMap::new()).await.unwrap();
        reg.register_certificate(new_cert("c1", "t"), CertState::Active)
            .await
            .unwrap();
        reg.attach_thing("t", "c1").await.unwrap();
        assert!(reg.token_keys().is_empty());
        let ttl = Duration::from_secs(100);
        let t0 = now_ms() - 2_000_000;

        // The first issue makes the key; it signs until it is key_rotation_secs old.
        let a = reg.issue_token_at("t", None, ttl, t0).await.unwrap();
        let k1 = a.claims.kid.clone();
        let b = reg
            .issue_token_at("t", None, ttl, t0 + 999_000)
            .await
            .unwrap();
        assert_eq!(b.claims.kid, k1);
        let keys = reg.token_keys();
        assert_eq!(keys.len(), 1);
        assert_eq!((keys[0].created_ms, keys[0].signing), (t0, true));

        // Then the next issue makes a new one; the old one verifies max_ttl_secs more.
        let c = reg
            .issue_token_at("t", None, ttl, t0 + 1_000_000)
            .await
            .unwrap();
        let k2 = c.claims.kid.clone();
        assert_ne!(k2, k1);
        let keys = reg.token_keys();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            (keys[0].kid.as_str(), keys[0].signing),
            (k1.as_str(), false)
        );
        assert_eq!(keys[0].verify_until_ms, Some(t0 + 1_100_000));
        assert_eq!((keys[1].kid.as_str(), keys[1].signing), (k2.as_str(), true));
        assert!(reg.tokens.read().verify(&b.token, t0 + 1_050_000).is_ok());
        assert!(reg.tokens.read().verify(&c.token, t0 + 1_050_000).is_ok());

        // A manual rotation (now, past k1's grace period) prunes k1 from memory and store.
        let k3 = reg.rotate_token_key().await.unwrap();
        assert!(k3.signing && k3.created_ms >= t0 + 2_000_000);
        let keys = reg.token_keys();
        let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, [k2.as_str(), k3.kid.as_str()]);
        assert_eq!(
            reg.tokens.read().verify(&b.token, t0 + 1_050_000),
            Err(TokenError::UnknownKey(k1.clone()))
        );
        let fresh = reg
            .issue_token("t", None, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(fresh.claims.kid, k3.kid, "a fresh key is not rotated again");

        // Reopened: the same keys (private parts included: old tokens still verify).
        drop(reg);
        drop(store);
        let (reg, _store) = open(dir.path(), cfg);
        assert_eq!(reg.token_keys(), keys);
        assert_eq!(reg.verify_token(&fresh.token).unwrap(), fresh.claims);
        assert!(reg.tokens.read().verify(&c.token, t0 + 1_050_000).is_ok());
        let (_, loaded) = {
            drop(reg);
            drop(_store);
            Store::open(&dir.path().join("s.redb"), Default::default()).unwrap()
        };
        let stored: Vec<&str> = loaded
            .records
            .iter()
            .filter(|(kind, _, _, _)| kind == TOKEN_KEY)
            .map(|(_, key, _, _)| key.as_str())
            .collect();
        assert_eq!(stored.len(), 2, "k1 was deleted from the store: {stored:?}");
        assert!(!stored.contains(&k1.as_str()));
    }

    #[tokio::test]
    async fn unreadable_token_key_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let mut good = StoredKey::generate(1).unwrap();
        good.kid = "good".into();
        let mut bad = StoredKey::generate(2).unwrap();
        bad.kid = "bad".into();
        bad.pkcs8 = "AAAA".into();
        use fleetcore_core::storage::RecordStore as _;
        store
            .submit_records(vec![
                put(TOKEN_KEY, "good", &good),
                put(TOKEN_KEY, "bad", &bad),
                put(TOKEN_KEY, "other-name", &good),
            ])
            .await
            .unwrap();
        drop(store);
        let (reg, _store) = open(dir.path(), TokenConfig::default());
        let kids: Vec<String> = reg.token_keys().into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, ["good"]);
    }

    #[tokio::test]
    async fn leaving_active_and_registering_a_ca_are_told_after_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path(), TokenConfig::default());
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let s = seen.clone();
        reg.on_event(move |ev| s.lock().push(ev.clone()));
        reg.register_certificate(new_cert("aa11", "a"), CertState::Active)
            .await
            .unwrap();
        reg.register_certificate(new_cert("bb22", "b"), CertState::Inactive)
            .await
            .unwrap();
        assert!(seen.lock().is_empty(), "registering told something");
        reg.set_certificate_state("bb22", CertState::Revoked)
            .await
            .unwrap();
        assert!(
            seen.lock().is_empty(),
            "a certificate that was not ACTIVE left nothing"
        );
        reg.set_certificate_state("aa11", CertState::Inactive)
            .await
            .unwrap();
        assert_eq!(
            seen.lock().pop(),
            Some(RegistryEvent::CertificateLeftActive {
                cert_id: "aa11".into(),
                state: CertState::Inactive
            })
        );
        // Told after it is in memory: a listener reading the registry sees the change.
        assert_eq!(reg.certificate_state("aa11"), Some(CertState::Inactive));
        reg.register_ca(CaRecord {
            id: "ca1".into(),
            pem: String::new(),
            subject: "CN=ca".into(),
            created_ms: 1,
        })
        .await
        .unwrap();
        assert_eq!(seen.lock().pop(), Some(RegistryEvent::CasChanged));
        assert!(seen.lock().is_empty());
    }
}
