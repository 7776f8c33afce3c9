//! Fleet provisioning (IoT Core's `$aws/certificates/...` and
//! `$aws/provisioning-templates/...`): agents installed with a shared claim certificate
//! get their own certificate, thing and policy over MQTT.
//!
//! - **CreateKeysAndCertificate** (`$aws/certificates/create/json`): the broker makes
//!   a key pair and a certificate; the key is in the answer only, never stored.
//! - **CreateCertificateFromCsr** (`$aws/certificates/create-from-csr/json`): the
//!   broker signs the device's CSR; the key never leaves the device.
//! - **RegisterThing** (`$aws/provisioning-templates/{name}/provision/json`): with the
//!   ownership token of such a certificate, runs the template (optionally asking its
//!   pre-provisioning hook first) and activates the certificate.
//!
//! New certificates are registered PENDING_ACTIVATION, with a pending record, in one
//! commit before the answer; a token is good for one hour ([`Config::token_ttl`]),
//! after which a certificate never registered with a thing is deleted. RegisterThing
//! is one registry commit ([`Registry::provision`]), which also deletes the pending
//! record, so a token is used at most once. Every answer goes to the requesting
//! connection only ([`Publisher::send_to`]): all agents share the claim certificate and
//! its answer topics, and a CreateKeysAndCertificate answer holds a private key.
//!
//! Just-in-time provisioning ([`ProvisioningService::just_in_time`]) runs a JITP
//! template attached to a registered CA for an unknown certificate that CA signed, at
//! the certificate's first connection.
//!
//! - [`template`]: provisioning templates (IoT Core's JSON), validated at creation and
//!   evaluated with a request's parameters into a [`template::Plan`].

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fleetcore_core::service::{
    Handled, Publisher, RefuseCode, Requester, ServiceContext, ServiceRequest, TopicService,
};
use fleetcore_core::storage::{Commit, RecordOp, RecordStore, StoreError};
use fleetcore_core::time::now_ms;
use fleetcore_identity::ca::{self, Ca};
use fleetcore_identity::registry::{
    CertState, NewCert, OnExisting, Provision, ProvisionPolicy, ProvisionThing, Registry,
    RegistryError,
};
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, Semaphore};

use crate::send_json;
use store::{Pending, TemplateRecord, TemplateType};
use template::{Override, Plan, PolicyPlan, Template};

pub mod hook;
pub mod store;
pub mod template;
pub mod token;

#[cfg(test)]
mod tests;

/// How provisioning behaves (`[provisioning]` in the configuration).
#[derive(Debug, Clone)]
pub struct Config {
    /// Validity of certificates it issues, in days.
    pub certificate_days: u32,
    /// Requests worked on at once; more are answered 429 ThrottlingException.
    pub max_in_flight: usize,
    /// How long an ownership token (and an unregistered certificate) lives.
    pub token_ttl: Duration,
    /// How long a pre-provisioning hook may take before it counts as a denial.
    pub hook_timeout: Duration,
    /// CNs a CSR may not ask for (the admin API's client-certificate CN).
    pub reserved_cns: Vec<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            certificate_days: 365,
            max_in_flight: 4096,
            token_ttl: Duration::from_secs(3600),
            hook_timeout: Duration::from_secs(5),
            reserved_cns: vec!["fleetcore-admin".into()],
        }
    }
}

/// A refusal as IoT Core words it on a `/rejected` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Rejection {
        Rejection::new(400, "InvalidParameters", message)
    }

    fn token(message: impl Into<String>) -> Rejection {
        Rejection::new(400, "InvalidCertificateOwnershipToken", message)
    }

    fn internal(message: impl Into<String>) -> Rejection {
        Rejection::new(500, "InternalError", message)
    }

    pub fn body(&self) -> Value {
        json!({"statusCode": self.status, "errorCode": self.code, "errorMessage": self.message})
    }
}

fn from_registry(e: RegistryError) -> Rejection {
    match e {
        RegistryError::Conflict(m) => Rejection::new(409, "ResourceConflictsException", m),
        RegistryError::NotFound(m) | RegistryError::Invalid(m) => Rejection::invalid(m),
        e @ (RegistryError::Store(_) | RegistryError::Signing(_)) => {
            Rejection::internal(e.to_string())
        }
    }
}

/// Why a template change was refused (the admin API's 400/404/409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChangeError {
    Invalid(String),
    NotFound(String),
    Conflict(String),
    Store(String),
}

impl std::fmt::Display for TemplateChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateChangeError::Invalid(m)
            | TemplateChangeError::NotFound(m)
            | TemplateChangeError::Conflict(m) => f.write_str(m),
            TemplateChangeError::Store(m) => write!(f, "template change not stored: {m}"),
        }
    }
}

impl std::error::Error for TemplateChangeError {}

impl From<StoreError> for TemplateChangeError {
    fn from(e: StoreError) -> Self {
        TemplateChangeError::Store(e.to_string())
    }
}

/// A template as the admin API creates or replaces it.
#[derive(Debug, Clone, Default)]
pub struct TemplateSpec {
    pub body: Option<String>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub template_type: Option<TemplateType>,
    /// `Some(None)` removes the hook.
    pub hook: Option<Option<store::Hook>>,
}

/// IoT Core's template-name rule: 1-36 characters of `[0-9A-Za-z_-]`.
pub fn is_valid_template_name(name: &str) -> bool {
    (1..=36).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

struct Loaded {
    rec: TemplateRecord,
    parsed: Arc<Template>,
}

#[derive(Default)]
struct Handles {
    registry: OnceLock<Arc<Registry>>,
    store: OnceLock<Arc<dyn RecordStore>>,
    publisher: OnceLock<Arc<dyn Publisher>>,
}

struct Inner {
    config: Config,
    ca: Arc<Ca>,
    handles: Handles,
    templates: RwLock<BTreeMap<String, Loaded>>,
    /// CA id -> JITP template.
    ca_templates: RwLock<BTreeMap<String, String>>,
    pending: Mutex<BTreeMap<String, Pending>>,
    key: OnceLock<token::TokenKey>,
    /// The key as it was on disk at start, if there was one.
    stored_key: Mutex<Option<Vec<u8>>>,
    /// Serializes template and key changes.
    write: tokio::sync::Mutex<()>,
    in_flight: Arc<Semaphore>,
}

/// The fleet-provisioning service (see the module doc).
#[derive(Clone)]
pub struct ProvisioningService {
    inner: Arc<Inner>,
}

/// A provisioning request, from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    CreateKeys,
    FromCsr,
    Register(String),
}

enum Parsed {
    Request(Request, String),
    Answer,
    Cbor,
    Invalid(String),
}

fn parse_topic(topic: &str) -> Parsed {
    let levels: Vec<&str> = topic.split('/').collect();
    let (req, rest) = match levels.as_slice() {
        ["$aws", "certificates", "create", rest @ ..] => (Request::CreateKeys, rest),
        ["$aws", "certificates", "create-from-csr", rest @ ..] => (Request::FromCsr, rest),
        ["$aws", "provisioning-templates", name, "provision", rest @ ..] => {
            if !is_valid_template_name(name) {
                return Parsed::Invalid(format!(
                    "{name:?} is not a template name (1-36 characters of 0-9 A-Z a-z _ -)"
                ));
            }
            (Request::Register((*name).to_owned()), rest)
        }
        _ => {
            return Parsed::Invalid(format!(
                "{topic:?} is not a fleet provisioning topic ($aws/certificates/create/json, $aws/certificates/create-from-csr/json, $aws/provisioning-templates/NAME/provision/json)"
            ))
        }
    };
    let prefix = levels[..levels.len() - rest.len()].join("/");
    match rest {
        ["json"] => Parsed::Request(req, format!("{prefix}/json")),
        ["json" | "cbor", "accepted" | "rejected"] => Parsed::Answer,
        ["cbor"] => Parsed::Cbor,
        _ => Parsed::Invalid(format!(
            "{topic:?}: a provisioning request is published to {prefix}/json"
        )),
    }
}

/// Who asks: the claim certificate, or the client id without one.
fn claimant(from: &Requester) -> String {
    from.cert_id
        .as_deref()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("client:{}", from.client_id))
}

fn new_cert(info: &ca::CertInfo, pem: &str) -> NewCert {
    NewCert {
        id: info.id.clone(),
        pem: pem.to_owned(),
        subject: info.subject.clone(),
        subject_cn: info.subject_cn.clone(),
        issuer: info.issuer.clone(),
        serial: info.serial.clone(),
        not_after_ms: info
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

fn on_existing(o: Override) -> OnExisting {
    match o {
        Override::DoNothing => OnExisting::Keep,
        Override::Replace => OnExisting::Replace,
        Override::Merge => OnExisting::Merge,
        Override::Fail => OnExisting::Fail,
    }
}

/// The registry change a plan asks for, for certificate `cert_id`.
fn provision_of(plan: &Plan, cert_id: &str) -> Result<Provision, Rejection> {
    let activate = match &plan.certificate {
        Some(c) if c.certificate_id != cert_id => {
            return Err(Rejection::invalid(format!(
                "the template's certificate resource names certificate {:?}, not the one of the ownership token ({cert_id}); use {{\"Ref\":\"AWS::IoT::Certificate::Id\"}}",
                c.certificate_id
            )))
        }
        Some(c) => c.active,
        None => true,
    };
    Ok(Provision {
        cert_id: cert_id.to_owned(),
        register: None,
        activate,
        thing: plan.thing.as_ref().map(|t| ProvisionThing {
            name: t.name.clone(),
            thing_type: t.thing_type.clone(),
            attributes: t.attributes.clone(),
            groups: t.groups.clone(),
            on_existing_attributes: on_existing(t.attributes_override),
            on_existing_type: on_existing(t.thing_type_override),
            on_existing_groups: on_existing(t.groups_override),
        }),
        policies: plan
            .policies
            .iter()
            .map(|p| match p {
                PolicyPlan::Existing { name } => ProvisionPolicy::Existing(name.clone()),
                PolicyPlan::Document { name, document } => ProvisionPolicy::Document {
                    name: name.clone(),
                    document: document.clone(),
                },
            })
            .collect(),
        extra: Vec::new(),
    })
}

/// The ARN a hook is told the template by (fleetcore has no region or account).
pub fn template_arn(name: &str) -> String {
    format!("arn:aws:iot:local:000000000000:provisioningtemplate/{name}")
}

/// The policy document a claim certificate of `template` gets: it may connect, and
/// publish, subscribe and receive on that template's provisioning topics only.
pub fn claim_policy(template: &str) -> String {
    let topics = [
        "$aws/certificates/create/*".to_owned(),
        "$aws/certificates/create-from-csr/*".to_owned(),
        format!("$aws/provisioning-templates/{template}/provision/*"),
    ];
    let res = |kind: &str| -> Vec<String> {
        topics
            .iter()
            .map(|t| format!("arn:aws:iot:*:*:{kind}/{t}"))
            .collect()
    };
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": res("topic")},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": res("topicfilter")},
        ]
    })
    .to_string()
}

impl ProvisioningService {
    pub fn new(config: Config, ca: Arc<Ca>) -> ProvisioningService {
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        ProvisioningService {
            inner: Arc::new(Inner {
                config,
                ca,
                handles: Handles::default(),
                templates: RwLock::new(BTreeMap::new()),
                ca_templates: RwLock::new(BTreeMap::new()),
                pending: Mutex::new(BTreeMap::new()),
                key: OnceLock::new(),
                stored_key: Mutex::new(None),
                write: tokio::sync::Mutex::new(()),
                in_flight,
            }),
        }
    }

    /// Hands the service the registry; must be called before any listener accepts
    /// (requests before it are answered 503).
    pub fn bind_registry(&self, registry: Arc<Registry>) {
        let _ = self.inner.handles.registry.set(registry);
        // Unclaimed certificates are swept once a minute (as often as tokens expire,
        // if that is sooner), and at once for those whose hour passed while the broker
        // was down.
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.config.token_ttl.min(Duration::from_secs(60));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { break };
                    inner.sweep(now_ms()).await;
                }
            });
        }
    }

    /// Deletes certificates whose ownership token expired before `now_ms` and that
    /// were never registered with a thing; returns how many were deleted.
    pub async fn sweep(&self, now_ms: u64) -> usize {
        self.inner.sweep(now_ms).await
    }

    /// Certificates waiting for RegisterThing.
    pub fn pending(&self) -> Vec<Pending> {
        self.inner.pending.lock().values().cloned().collect()
    }

    // ----- templates (the admin API) ------------------------------------

    pub fn templates(&self) -> Vec<TemplateRecord> {
        self.inner
            .templates
            .read()
            .values()
            .map(|l| l.rec.clone())
            .collect()
    }

    pub fn template(&self, name: &str) -> Option<TemplateRecord> {
        self.inner.templates.read().get(name).map(|l| l.rec.clone())
    }

    /// Creates template `name` (`spec.body` required); refused when it exists or
    /// does not validate.
    pub async fn create_template(
        &self,
        name: &str,
        spec: TemplateSpec,
    ) -> Result<TemplateRecord, TemplateChangeError> {
        if !is_valid_template_name(name) {
            return Err(TemplateChangeError::Invalid(format!(
                "template name {name:?} must be 1-36 characters of 0-9 A-Z a-z _ -"
            )));
        }
        let body = spec
            .body
            .clone()
            .ok_or_else(|| TemplateChangeError::Invalid("templateBody is required".into()))?;
        let parsed = Template::parse(&body)
            .map_err(|e| TemplateChangeError::Invalid(format!("templateBody: {e}")))?;
        check_hook(spec.hook.as_ref().and_then(|h| h.as_ref()))?;
        let _w = self.inner.write.lock().await;
        if self.inner.templates.read().contains_key(name) {
            return Err(TemplateChangeError::Conflict(format!(
                "template {name:?} already exists"
            )));
        }
        let now = now_ms();
        let rec = TemplateRecord {
            name: name.to_owned(),
            description: spec.description.unwrap_or_default(),
            body,
            enabled: spec.enabled.unwrap_or(true),
            template_type: spec.template_type.unwrap_or_default(),
            hook: spec.hook.flatten(),
            version: 1,
            created_ms: now,
            updated_ms: now,
        };
        self.inner.save_template(rec, Arc::new(parsed)).await
    }

    /// Changes what `spec` names of template `name` (a new body makes a new version).
    pub async fn update_template(
        &self,
        name: &str,
        spec: TemplateSpec,
    ) -> Result<TemplateRecord, TemplateChangeError> {
        let parsed_new = match &spec.body {
            Some(b) => Some(
                Template::parse(b)
                    .map_err(|e| TemplateChangeError::Invalid(format!("templateBody: {e}")))?,
            ),
            None => None,
        };
        check_hook(spec.hook.as_ref().and_then(|h| h.as_ref()))?;
        let _w = self.inner.write.lock().await;
        let (mut rec, parsed) = {
            let t = self.inner.templates.read();
            let l = t.get(name).ok_or_else(|| {
                TemplateChangeError::NotFound(format!("template {name:?} not found"))
            })?;
            (l.rec.clone(), l.parsed.clone())
        };
        if let Some(t) = spec.template_type {
            if t != rec.template_type && self.inner.ca_templates.read().values().any(|v| v == name)
            {
                return Err(TemplateChangeError::Conflict(format!(
                    "template {name:?} is attached to a CA; detach it before changing its type"
                )));
            }
            rec.template_type = t;
        }
        let parsed = match (spec.body, parsed_new) {
            (Some(body), Some(p)) => {
                rec.body = body;
                rec.version += 1;
                Arc::new(p)
            }
            _ => parsed,
        };
        if let Some(d) = spec.description {
            rec.description = d;
        }
        if let Some(e) = spec.enabled {
            rec.enabled = e;
        }
        if let Some(h) = spec.hook {
            rec.hook = h;
        }
        rec.updated_ms = now_ms();
        self.inner.save_template(rec, parsed).await
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), TemplateChangeError> {
        let _w = self.inner.write.lock().await;
        if !self.inner.templates.read().contains_key(name) {
            return Err(TemplateChangeError::NotFound(format!(
                "template {name:?} not found"
            )));
        }
        if let Some((ca, _)) = self
            .inner
            .ca_templates
            .read()
            .iter()
            .find(|(_, t)| t.as_str() == name)
        {
            return Err(TemplateChangeError::Conflict(format!(
                "template {name:?} is attached to CA {ca}; detach it first"
            )));
        }
        self.inner
            .submit(vec![store::del(store::TEMPLATE, name)])
            .await?;
        self.inner.templates.write().remove(name);
        tracing::info!(template = name, "provisioning template deleted");
        Ok(())
    }

    /// Attaches JITP template `template` to registered CA `ca_id` (`None` detaches).
    pub async fn set_ca_template(
        &self,
        ca_id: &str,
        template: Option<&str>,
    ) -> Result<(), TemplateChangeError> {
        let _w = self.inner.write.lock().await;
        if let Some(t) = template {
            match self.inner.templates.read().get(t) {
                None => {
                    return Err(TemplateChangeError::NotFound(format!(
                        "template {t:?} not found"
                    )))
                }
                Some(l) if l.rec.template_type != TemplateType::Jitp => {
                    return Err(TemplateChangeError::Invalid(format!(
                        "template {t:?} is {}; a CA runs JITP templates only",
                        l.rec.template_type
                    )))
                }
                Some(_) => {}
            }
            let known = self
                .inner
                .handles
                .registry
                .get()
                .is_some_and(|r| r.cas().iter().any(|c| c.id == ca_id));
            if !known {
                return Err(TemplateChangeError::NotFound(format!(
                    "CA {ca_id:?} is not registered"
                )));
            }
            self.inner
                .submit(vec![store::put(store::CA_TEMPLATE, ca_id, &t)])
                .await?;
            self.inner
                .ca_templates
                .write()
                .insert(ca_id.to_owned(), t.to_owned());
        } else {
            self.inner
                .submit(vec![store::del(store::CA_TEMPLATE, ca_id)])
                .await?;
            self.inner.ca_templates.write().remove(ca_id);
        }
        tracing::info!(
            ca = ca_id,
            template = template.unwrap_or("(none)"),
            "JITP template of CA set"
        );
        Ok(())
    }

    /// The JITP template of each CA that has one.
    pub fn ca_templates(&self) -> BTreeMap<String, String> {
        self.inner.ca_templates.read().clone()
    }
}

fn check_hook(h: Option<&store::Hook>) -> Result<(), TemplateChangeError> {
    if let Some(h) = h {
        if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
            return Err(TemplateChangeError::Invalid(format!(
                "preProvisioningHook.url {:?} must be an http:// or https:// URL",
                h.url
            )));
        }
    }
    Ok(())
}

impl Inner {
    async fn submit(&self, ops: Vec<RecordOp>) -> Result<(), StoreError> {
        match self.handles.store.get() {
            Some(s) => s.submit_records(ops).await.map(|_| ()),
            None => Err(StoreError::Closed),
        }
    }

    async fn save_template(
        &self,
        rec: TemplateRecord,
        parsed: Arc<Template>,
    ) -> Result<TemplateRecord, TemplateChangeError> {
        self.submit(vec![store::put(store::TEMPLATE, &rec.name, &rec)])
            .await?;
        tracing::info!(template = %rec.name, version = rec.version, enabled = rec.enabled, kind = %rec.template_type, "provisioning template saved");
        self.templates.write().insert(
            rec.name.clone(),
            Loaded {
                rec: rec.clone(),
                parsed,
            },
        );
        Ok(rec)
    }

    /// The token key, made and stored at first use.
    async fn key(&self) -> Result<&token::TokenKey, Rejection> {
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let _w = self.write.lock().await;
        if let Some(k) = self.key.get() {
            return Ok(k);
        }
        let stored = self.stored_key.lock().take();
        let secret = match stored {
            Some(s) => s,
            None => {
                let mut s = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                    .map_err(|_| Rejection::internal("no random bytes for the token key"))?;
                self.submit(vec![store::put_key(&s)])
                    .await
                    .map_err(|e| Rejection::internal(format!("token key not stored: {e}")))?;
                s
            }
        };
        let _ = self.key.set(token::TokenKey::new(&secret));
        Ok(self.key.get().expect("just set"))
    }

    fn registry(&self) -> Result<&Arc<Registry>, Rejection> {
        self.handles
            .registry
            .get()
            .ok_or_else(|| Rejection::new(503, "ServiceUnavailable", "provisioning is starting"))
    }

    async fn sweep(&self, now: u64) -> usize {
        let Ok(reg) = self.registry() else { return 0 };
        let due: Vec<Pending> = self
            .pending
            .lock()
            .values()
            .filter(|p| p.expires_ms <= now)
            .cloned()
            .collect();
        let mut deleted = 0;
        for p in due {
            match reg
                .delete_unclaimed_certificate(
                    &p.cert_id,
                    vec![store::del(store::PENDING, &p.cert_id)],
                )
                .await
            {
                Ok(gone) => {
                    self.pending.lock().remove(&p.cert_id);
                    if gone {
                        deleted += 1;
                        tracing::info!(certificate = %p.cert_id, claimant = %p.claimant, client_id = %p.client_id, "ownership token expired: deleted the certificate it was never registered with a thing");
                    }
                }
                Err(e) => {
                    tracing::warn!(certificate = %p.cert_id, error = %e, "cannot delete an unclaimed certificate; trying again in a minute")
                }
            }
        }
        deleted
    }

    /// Registers a newly issued certificate PENDING_ACTIVATION with its pending record
    /// and returns its ownership token.
    async fn register_new(
        &self,
        info: &ca::CertInfo,
        pem: &str,
        from: &Requester,
    ) -> Result<String, Rejection> {
        let reg = self.registry()?;
        let key = self.key().await?;
        let now = now_ms();
        let expires_ms = now + self.config.token_ttl.as_millis() as u64;
        let who = claimant(from);
        let token = key.issue(&info.id, expires_ms / 1000, &who);
        let pending = Pending {
            cert_id: info.id.clone(),
            claimant: who,
            client_id: from.client_id.to_string(),
            expires_ms,
        };
        reg.register_certificate_with(
            new_cert(info, pem),
            CertState::PendingActivation,
            vec![store::put(store::PENDING, &info.id, &pending)],
        )
        .await
        .map_err(from_registry)?;
        self.pending.lock().insert(info.id.clone(), pending);
        Ok(token)
    }

    async fn create_keys(&self, from: &Requester) -> Result<Value, Rejection> {
        let (issued, key_pem) = self
            .ca
            .create_provisioning_keys(self.config.certificate_days)
            .map_err(|e| Rejection::internal(e.to_string()))?;
        let info = ca::inspect_pem(&issued.pem).map_err(|e| Rejection::internal(e.to_string()))?;
        let token = self.register_new(&info, &issued.pem, from).await?;
        tracing::info!(certificate = %info.id, claim_certificate = from.cert_id.as_deref().unwrap_or("-"), client_id = %from.client_id, "CreateKeysAndCertificate: certificate issued PENDING_ACTIVATION");
        Ok(json!({
            "certificateId": info.id,
            "certificatePem": issued.pem,
            "privateKey": key_pem,
            "certificateOwnershipToken": token,
        }))
    }

    async fn sign_csr(&self, payload: &[u8], from: &Requester) -> Result<Value, Rejection> {
        let body: Value = serde_json::from_slice(payload)
            .map_err(|e| Rejection::invalid(format!("the request is not JSON: {e}")))?;
        let csr = body
            .get("certificateSigningRequest")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Rejection::invalid("certificateSigningRequest (a PEM CSR string) is required")
            })?;
        let issued = self
            .ca
            .sign_csr_as_requested(csr, self.config.certificate_days)
            .map_err(|e| Rejection::new(400, "InvalidCsr", e.to_string()))?;
        if self
            .config
            .reserved_cns
            .iter()
            .any(|r| r == &issued.subject_cn)
        {
            return Err(Rejection::new(
                400,
                "InvalidCsr",
                format!(
                    "CN {:?} is reserved for admin client certificates",
                    issued.subject_cn
                ),
            ));
        }
        let info = ca::inspect_pem(&issued.pem).map_err(|e| Rejection::internal(e.to_string()))?;
        let token = self.register_new(&info, &issued.pem, from).await?;
        tracing::info!(certificate = %info.id, cn = %issued.subject_cn, claim_certificate = from.cert_id.as_deref().unwrap_or("-"), client_id = %from.client_id, "CreateCertificateFromCsr: certificate issued PENDING_ACTIVATION");
        Ok(json!({
            "certificateOwnershipToken": token,
            "certificateId": info.id,
            "certificatePem": issued.pem,
        }))
    }

    async fn register(
        &self,
        template: &str,
        payload: &[u8],
        from: &Requester,
    ) -> Result<Value, Rejection> {
        let body: Value = serde_json::from_slice(payload)
            .map_err(|e| Rejection::invalid(format!("the request is not JSON: {e}")))?;
        let token = match body.get("certificateOwnershipToken") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(Rejection::token(
                    "certificateOwnershipToken must be a string",
                ))
            }
        };
        let mut params: BTreeMap<String, String> = BTreeMap::new();
        match body.get("parameters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let Value::String(s) = v else {
                        return Err(Rejection::invalid(format!(
                            "parameters.{k} must be a string"
                        )));
                    };
                    params.insert(k.clone(), s.clone());
                }
            }
            Some(_) => {
                return Err(Rejection::invalid(
                    "parameters must be an object of strings",
                ))
            }
        }
        let (rec, parsed) = {
            let t = self.templates.read();
            match t.get(template) {
                Some(l) if l.rec.enabled && l.rec.template_type == TemplateType::FleetProvisioning => {
                    (l.rec.clone(), l.parsed.clone())
                }
                Some(l) if !l.rec.enabled => {
                    return Err(Rejection::new(
                        403,
                        "TemplateDisabled",
                        format!("provisioning template {template:?} is disabled"),
                    ))
                }
                Some(_) => {
                    return Err(Rejection::invalid(format!(
                        "template {template:?} is a JITP template; RegisterThing takes fleet provisioning templates"
                    )))
                }
                None => {
                    return Err(Rejection::new(
                        404,
                        "ResourceNotFound",
                        format!("provisioning template {template:?} does not exist"),
                    ))
                }
            }
        };
        let who = claimant(from);
        let key = self.key().await?;
        let cert_id = key
            .check(token, &who, now_ms() / 1000)
            .map_err(|p| Rejection::token(p.to_string()))?;
        let pending = self.pending.lock().get(&cert_id).cloned();
        match &pending {
            Some(p) if p.claimant == who && p.expires_ms <= now_ms() => {
                return Err(Rejection::token(token::TokenProblem::Expired.to_string()))
            }
            Some(p) if p.claimant == who => {}
            _ => {
                return Err(Rejection::token(
                    "Certificate ownership token was already used (or its certificate is gone).",
                ))
            }
        }
        let reg = self.registry()?;
        let cert = reg
            .certificate(&cert_id)
            .ok_or_else(|| Rejection::token("the token's certificate is no longer registered"))?;
        params.insert("AWS::IoT::Certificate::Id".into(), cert_id.clone());
        if let Some(h) = &rec.hook {
            let req = hook::HookRequest {
                claim_certificate_id: from.cert_id.as_deref().unwrap_or("").to_owned(),
                certificate_id: cert_id.clone(),
                certificate_pem: cert.pem.clone(),
                template_arn: template_arn(template),
                client_id: from.client_id.to_string(),
                parameters: params.clone(),
            };
            match hook::ask(&h.url, &req, self.config.hook_timeout).await {
                hook::HookAnswer::Allow(overrides) => params.extend(overrides),
                hook::HookAnswer::Deny(why) => {
                    tracing::info!(template, certificate = %cert_id, claim_certificate = %req.claim_certificate_id, client_id = %from.client_id, reason = %why, "RegisterThing denied by the pre-provisioning hook");
                    return Err(Rejection::new(403, "ACCESS_DENIED", why));
                }
            }
            // The certificate id is the token's, whatever the hook says.
            params.insert("AWS::IoT::Certificate::Id".into(), cert_id.clone());
        }
        let plan = parsed
            .evaluate(&params)
            .map_err(|e| Rejection::invalid(e.to_string()))?;
        let mut change = provision_of(&plan, &cert_id)?;
        change.extra.push(store::del(store::PENDING, &cert_id));
        let done = reg.provision(change).await.map_err(from_registry)?;
        self.pending.lock().remove(&cert_id);
        tracing::info!(template, certificate = %cert_id, thing = done.thing.as_deref().unwrap_or("-"), thing_created = done.thing_created, state = %done.state, claim_certificate = from.cert_id.as_deref().unwrap_or("-"), client_id = %from.client_id, "RegisterThing: provisioned");
        let config: Map<String, Value> = plan
            .device_configuration
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let mut answer = json!({ "deviceConfiguration": config });
        if let Some(t) = done.thing {
            answer["thingName"] = Value::String(t);
        }
        Ok(answer)
    }

    async fn serve(&self, req: Request, prefix: &str, payload: &[u8], from: &Requester) {
        let result = match &req {
            Request::CreateKeys => self.create_keys(from).await,
            Request::FromCsr => self.sign_csr(payload, from).await,
            Request::Register(t) => self.register(t, payload, from).await,
        };
        let (suffix, body, outcome) = match result {
            Ok(v) => ("accepted", v, "accepted"),
            Err(r) => {
                tracing::info!(request = prefix, status = r.status, code = r.code, reason = %r.message, client_id = %from.client_id, claim_certificate = from.cert_id.as_deref().unwrap_or("-"), "provisioning request rejected");
                ("rejected", r.body(), "rejected")
            }
        };
        let op = match req {
            Request::CreateKeys => "CreateKeysAndCertificate",
            Request::FromCsr => "CreateCertificateFromCsr",
            Request::Register(_) => "RegisterThing",
        };
        metrics::counter!("fleetcore_provisioning_requests_total", "operation" => op, "outcome" => outcome)
            .increment(1);
        self.answer(&from.client_id, &format!("{prefix}/{suffix}"), &body);
    }

    fn answer(&self, client_id: &str, topic: &str, body: &Value) {
        if let Some(p) = self.handles.publisher.get() {
            if !send_json(p.as_ref(), client_id, topic, body) {
                tracing::warn!(
                    client_id,
                    topic,
                    "provisioning answer not delivered: the client is gone"
                );
            }
        }
    }
}

impl TopicService for ProvisioningService {
    fn name(&self) -> &'static str {
        "provisioning"
    }

    fn filters(&self) -> Vec<String> {
        vec![
            "$aws/certificates/#".into(),
            "$aws/provisioning-templates/#".into(),
        ]
    }

    fn handle(&self, req: ServiceRequest<'_>, _out: &Arc<dyn Publisher>) -> Handled {
        let topic: &str = &req.message.topic;
        let (request, prefix) = match parse_topic(topic) {
            Parsed::Request(r, p) => (r, p),
            Parsed::Answer => {
                return Handled::Refused {
                    code: RefuseCode::NotAuthorized,
                    why: format!("{topic:?} is an answer topic of fleet provisioning; clients may only subscribe to it"),
                }
            }
            Parsed::Cbor => {
                return Handled::Refused {
                    code: RefuseCode::TopicNameInvalid,
                    why: format!("{topic:?}: fleetcore serves the json payload format only; publish to the same topic ending in /json"),
                }
            }
            Parsed::Invalid(why) => {
                return Handled::Refused {
                    code: RefuseCode::TopicNameInvalid,
                    why,
                }
            }
        };
        let Ok(permit) = self.inner.in_flight.clone().try_acquire_owned() else {
            let r = Rejection::new(
                429,
                "ThrottlingException",
                format!(
                    "more than {} provisioning requests at once; try again",
                    self.inner.config.max_in_flight
                ),
            );
            self.inner.answer(
                &req.from.client_id,
                &format!("{prefix}/rejected"),
                &r.body(),
            );
            return Handled::Consumed { commit: None };
        };
        let (done, rx) = oneshot::channel();
        let inner = self.inner.clone();
        let payload = req.message.payload.clone();
        let from = req.from.clone();
        tokio::spawn(async move {
            inner.serve(request, &prefix, &payload, &from).await;
            let _ = done.send(Ok(()));
            drop(permit);
        });
        Handled::Consumed {
            commit: Some(Commit::waiting(rx)),
        }
    }

    fn start(&self, ctx: ServiceContext<'_>) {
        let loaded = store::load(ctx.records);
        let _ = self.inner.handles.store.set(ctx.store);
        let _ = self.inner.handles.publisher.set(ctx.publisher);
        *self.inner.stored_key.lock() = loaded.key;
        {
            let mut t = self.inner.templates.write();
            for rec in loaded.templates {
                match Template::parse(&rec.body) {
                    Ok(p) => {
                        t.insert(
                            rec.name.clone(),
                            Loaded {
                                rec,
                                parsed: Arc::new(p),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(template = %rec.name, error = %e, "stored provisioning template no longer validates; skipped")
                    }
                }
            }
        }
        *self.inner.ca_templates.write() = loaded.ca_templates;
        let mut p = self.inner.pending.lock();
        for rec in loaded.pending {
            p.insert(rec.cert_id.clone(), rec);
        }
    }
}

/// IoT Core's JITP parameter for each subject attribute (by the short names the
/// certificate parser gives).
fn subject_parameter(short: &str) -> Option<&'static str> {
    Some(match short {
        "CN" => "AWS::IoT::Certificate::CommonName",
        "O" => "AWS::IoT::Certificate::Organization",
        "OU" => "AWS::IoT::Certificate::OrganizationalUnit",
        "C" => "AWS::IoT::Certificate::Country",
        "ST" => "AWS::IoT::Certificate::StateName",
        "serialNumber" => "AWS::IoT::Certificate::SerialNumber",
        "dnQualifier" | "2.5.4.46" => "AWS::IoT::Certificate::DistinguishedNameQualifier",
        _ => return None,
    })
}

impl Inner {
    /// Just-in-time provisioning of `der` (see [`fleetcore_identity::jit`]).
    async fn just_in_time(&self, der: &[u8], client_id: &str) -> Result<bool, String> {
        let reg = self.registry().map_err(|r| r.message)?;
        let info = ca::inspect_der(der.to_vec()).map_err(|e| e.to_string())?;
        let pem = ca::certificate_pem(der);
        let templates = self.ca_templates.read().clone();
        let Some((ca_id, template)) = reg.cas().into_iter().find_map(|c| {
            let t = templates.get(&c.id)?;
            ca::is_signed_by(&pem, &c.pem)
                .unwrap_or(false)
                .then(|| (c.id.clone(), t.clone()))
        }) else {
            return Ok(false);
        };
        let parsed = {
            let t = self.templates.read();
            match t.get(&template) {
                Some(l) if l.rec.enabled => l.parsed.clone(),
                _ => {
                    return Err(format!(
                        "the JITP template {template:?} of CA {ca_id} is disabled or gone"
                    ))
                }
            }
        };
        let mut params = BTreeMap::new();
        params.insert("AWS::IoT::Certificate::Id".to_owned(), info.id.clone());
        if let Some(cert) = fleetcore_core::principal::ClientCert::from_der(der) {
            for (short, value) in &cert.attributes {
                if let Some(p) = subject_parameter(short) {
                    params.entry(p.to_owned()).or_insert_with(|| value.clone());
                }
            }
        }
        let plan = parsed.evaluate(&params).map_err(|e| e.to_string())?;
        let mut change = provision_of(&plan, &info.id).map_err(|r| r.message)?;
        change.register = Some(new_cert(&info, &pem));
        match reg.provision(change).await {
            Ok(done) => {
                tracing::info!(certificate = %info.id, ca = %ca_id, template = %template, thing = done.thing.as_deref().unwrap_or("-"), state = %done.state, client_id, "just-in-time provisioning: certificate registered and provisioned");
                metrics::counter!("fleetcore_provisioning_requests_total", "operation" => "JITP", "outcome" => "accepted").increment(1);
                if let Some(p) = self.handles.publisher.get() {
                    let now = now_ms();
                    crate::publish_json(
                        p.as_ref(),
                        &format!("$aws/events/certificates/registered/{ca_id}"),
                        &json!({
                            "certificateId": info.id,
                            "caCertificateId": ca_id,
                            "timestamp": now,
                            "certificateStatus": done.state.to_string(),
                            "awsAccountId": "000000000000",
                            "certificateRegistrationTimestamp": now,
                        }),
                    );
                }
                Ok(done.state == CertState::Active)
            }
            // Two first connections at once: the other one provisioned it.
            Err(_) if reg.certificate_state(&info.id) == Some(CertState::Active) => Ok(true),
            Err(e) => {
                metrics::counter!("fleetcore_provisioning_requests_total", "operation" => "JITP", "outcome" => "rejected").increment(1);
                tracing::info!(certificate = %info.id, ca = %ca_id, template = %template, client_id, error = %e, "just-in-time provisioning failed");
                Err(e.to_string())
            }
        }
    }
}

impl fleetcore_identity::jit::JustInTime for ProvisioningService {
    fn provision<'a>(
        &'a self,
        der: &'a [u8],
        client_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>
    {
        Box::pin(self.inner.just_in_time(der, client_id))
    }
}
