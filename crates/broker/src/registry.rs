//! The device registry: things, certificates, policies, CAs, and what is
//! attached to what (AWS IoT Core's model).
//!
//! All of it is held in memory for the CONNECT path and written through to the
//! store: a change returns only once it is on disk. Every change bumps a
//! generation counter; connections compare it on each authorization check and
//! rebind their policies when it moved, so a policy, attachment or attribute
//! change applies to live sessions at their next packet. Certificates leaving
//! `ACTIVE` are also kicked at once by the hub (see `Hub::kick_certificate`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetcore_policy::{Policy, Vars};
use fleetcore_store::{Op, Store, StoreError};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::authz::Authz;
use crate::message::now_ms;
use crate::tls::ClientCert;

const THING: &str = "thing";
const CERT: &str = "certificate";
const POLICY: &str = "policy";
const CA: &str = "ca";
const POLICY_ATTACHMENT: &str = "policy-attachment";
const THING_ATTACHMENT: &str = "thing-attachment";

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
#[derive(Debug, Clone)]
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
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Store(e.to_string())
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
}

pub struct Registry {
    state: RwLock<State>,
    /// Serializes changes, so validate-write-apply happens as one step.
    write: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    store: Store,
}

fn valid_thing_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "thing name {name:?} must be 1-128 characters of a-z A-Z 0-9 : _ -"
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

fn put<T: Serialize>(kind: &'static str, key: &str, value: &T) -> Op {
    Op::PutRecord {
        kind,
        key: key.to_owned(),
        value: serde_json::to_vec(value).unwrap_or_default(),
    }
}

fn del(kind: &'static str, key: &str) -> Op {
    Op::DeleteRecord {
        kind,
        key: key.to_owned(),
    }
}

impl Registry {
    /// Rebuilds the registry from the store's records. A record that no
    /// longer reads is skipped with a warning.
    pub fn new(store: Store, records: &[(String, String, Vec<u8>)]) -> Registry {
        let mut st = State::default();
        for (kind, key, value) in records {
            let ok = match kind.as_str() {
                THING => serde_json::from_slice::<Thing>(value)
                    .map(|t| st.things.insert(key.clone(), t))
                    .is_ok(),
                CERT => serde_json::from_slice::<CertRecord>(value)
                    .map(|c| st.certs.insert(key.clone(), c))
                    .is_ok(),
                CA => serde_json::from_slice::<CaRecord>(value)
                    .map(|c| st.cas.insert(key.clone(), c))
                    .is_ok(),
                POLICY => match serde_json::from_slice::<PolicyRecord>(value) {
                    Ok(p) => match p
                        .versions
                        .get(&p.default_version)
                        .and_then(|v| Policy::parse(&v.document).ok())
                    {
                        Some(compiled) => {
                            st.policies.insert(key.clone(), (p, Arc::new(compiled)));
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
                _ => false,
            };
            if !ok {
                tracing::warn!(kind = %kind, key = %key, "skipping unreadable registry record");
            }
        }
        Registry {
            state: RwLock::new(st),
            write: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(1),
            store,
        }
    }

    /// Changes whenever anything in the registry changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    async fn commit(&self, ops: Vec<Op>) -> Result<()> {
        self.store.submit(ops).await?;
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
        let _w = self.write.lock().await;
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
        self.commit(vec![put(THING, name, &thing)]).await?;
        self.state
            .write()
            .things
            .insert(name.to_owned(), thing.clone());
        self.bump();
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
        let _w = self.write.lock().await;
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
        self.commit(vec![put(THING, name, &thing)]).await?;
        self.state
            .write()
            .things
            .insert(name.to_owned(), thing.clone());
        self.bump();
        Ok(thing)
    }

    pub async fn delete_thing(&self, name: &str) -> Result<()> {
        let _w = self.write.lock().await;
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
        self.commit(vec![del(THING, name)]).await?;
        self.state.write().things.remove(name);
        self.bump();
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
        let _w = self.write.lock().await;
        if self.state.read().certs.contains_key(&c.id) {
            return Err(RegistryError::Conflict(format!(
                "certificate {} is already registered",
                c.id
            )));
        }
        let now = now_ms();
        let rec = CertRecord {
            id: c.id.clone(),
            pem: c.pem,
            subject: c.subject,
            subject_cn: c.subject_cn,
            issuer: c.issuer,
            serial: c.serial,
            not_after_ms: c.not_after_ms,
            state,
            created_ms: now,
            updated_ms: now,
            revoked_ms: (state == CertState::Revoked).then_some(now),
        };
        self.commit(vec![put(CERT, &rec.id, &rec)]).await?;
        self.state.write().certs.insert(rec.id.clone(), rec.clone());
        self.bump();
        Ok(rec)
    }

    /// Changes a certificate's state. The caller kicks live connections when
    /// it leaves ACTIVE (`Hub::set_certificate_state` does both).
    pub async fn set_certificate_state(&self, id: &str, state: CertState) -> Result<CertRecord> {
        let _w = self.write.lock().await;
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
        rec.state = state;
        rec.updated_ms = now;
        self.commit(vec![put(CERT, id, &rec)]).await?;
        self.state.write().certs.insert(id.to_owned(), rec.clone());
        self.bump();
        Ok(rec)
    }

    pub async fn delete_certificate(&self, id: &str) -> Result<()> {
        let _w = self.write.lock().await;
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
        self.commit(vec![del(CERT, id)]).await?;
        self.state.write().certs.remove(id);
        self.bump();
        Ok(())
    }

    pub fn certificate(&self, id: &str) -> Option<CertRecord> {
        self.state.read().certs.get(id).cloned()
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
        let _w = self.write.lock().await;
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
        self.commit(vec![put(POLICY, name, &rec)]).await?;
        self.state
            .write()
            .policies
            .insert(name.to_owned(), (rec.clone(), compiled));
        self.bump();
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
        let _w = self.write.lock().await;
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
        self.commit(vec![put(POLICY, name, &rec)]).await?;
        self.state
            .write()
            .policies
            .insert(name.to_owned(), (rec.clone(), compiled));
        self.bump();
        Ok(rec)
    }

    pub async fn set_default_policy_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<PolicyRecord> {
        let _w = self.write.lock().await;
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
        self.commit(vec![put(POLICY, name, &rec)]).await?;
        self.state
            .write()
            .policies
            .insert(name.to_owned(), (rec.clone(), compiled));
        self.bump();
        Ok(rec)
    }

    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        let _w = self.write.lock().await;
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
        self.commit(vec![del(POLICY, name)]).await?;
        self.state.write().policies.remove(name);
        self.bump();
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
        let _w = self.write.lock().await;
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
        self.commit(vec![op]).await?;
        {
            let mut st = self.state.write();
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
        }
        self.bump();
        Ok(())
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
        let _w = self.write.lock().await;
        if self.state.read().cas.contains_key(&rec.id) {
            return Err(RegistryError::Conflict(format!(
                "CA {} is already registered",
                rec.id
            )));
        }
        self.commit(vec![put(CA, &rec.id, &rec)]).await?;
        self.state.write().cas.insert(rec.id.clone(), rec.clone());
        self.bump();
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
    ) -> std::result::Result<Authz, String> {
        let st = self.state.read();
        let Some(rec) = st.certs.get(&cert.fingerprint) else {
            return Err(format!(
                "certificate {} (CN {:?}) is not registered",
                cert.fingerprint,
                cert.subject_cn.as_deref().unwrap_or("")
            ));
        };
        if rec.state != CertState::Active {
            return Err(format!("certificate {} is {}", rec.id, rec.state));
        }
        let attached_things = st.cert_things.get(&rec.id);
        let mut vars = Vars {
            client_id: Some(client_id.to_owned()),
            cert_subject: cert.attributes.clone(),
            cert_issuer: cert.issuer_attributes.clone(),
            cert_serial: Some(cert.serial.clone()),
            ..Vars::default()
        };
        if let Some(thing_name) = cert.subject_cn.as_deref() {
            let attached = attached_things.is_some_and(|s| s.contains(thing_name));
            vars.thing_attached = Some(attached);
            if attached && client_id == thing_name {
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
}

fn not_found(what: &str, name: &str) -> RegistryError {
    RegistryError::NotFound(format!("{what} {name:?} not found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_policy::Action;

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

    const AGENT: &str = r#"{"Version":"2012-10-17","Statement":[
      {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
      {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"}]}"#;

    #[tokio::test]
    async fn identity_follows_registration_state_attachments_and_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let reg = Registry::new(store.clone(), &loaded.records);
        let c = cert("aa11", "computer-a");
        assert!(reg
            .resolve(&c, "computer-a")
            .unwrap_err()
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
        let reg = Registry::new(store, &loaded.records);
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
        let reg = Registry::new(store, &loaded.records);
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
}
