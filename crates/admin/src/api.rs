//! The admin HTTP API (`docs/admin-api.md` is the contract): things, certificates,
//! policies, CAs, device tokens, the CRL, metrics and health, behind one bearer token.
//!
//! Every route is listed once in [`routes`]; the router and the OpenAPI description
//! ([`crate::openapi`]) are both checked against that list. Errors are JSON
//! (`{"error": {"code", "message"}}`) with the status the contract gives each code.
//! Registry changes return once they are durable. The handlers only change the registry:
//! the engine reacts to its events (a certificate leaving ACTIVE cuts its live
//! connections off at once; a registered CA is trusted by the TLS listeners).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::{Json, Router};
use fleetcore_broker::engine::hub::Hub;
use fleetcore_core::time::{unix_ms, utc_text};
use fleetcore_identity::registry::{CaRecord, PolicyRecord};
use fleetcore_identity::registry::{CertRecord, CertState, NewCert, RegistryError, Thing};
use fleetcore_identity::registry::{IssuedToken, TokenKeyInfo};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::models::{
    CaList, CaView, CertDetail, CertFromCsr, CertList, CertView, CreateCert, DefaultVersion,
    ErrorBody, ErrorDetail, Health, IssuedCert, IssuedTokenView, NewCa, NewPolicy,
    NewPolicyVersion, NewThing, NewToken, PolicyList, RegisterCert, StateChange, ThingDetail,
    ThingList, ThingUpdate, TokenKeyList, TokenKeyView,
};
use crate::tls::AdminPeer;
use axum::extract::ConnectInfo;
use fleetcore_identity::ca::{self, Ca, CaError, CertInfo};

/// Validity of issued device certificates when the request does not say.
pub const DEFAULT_DAYS: u32 = 365;

/// What every handler works on.
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub ca: Arc<Ca>,
    /// The bearer token every request must carry (unless it comes with an admin
    /// client certificate).
    pub token: String,
    /// With `[admin] tls = true`: a request on a connection whose verified client
    /// certificate has this subject CN needs no token. `None`: the token only.
    pub client_cert_cn: Option<String>,
    /// Renders `GET /metrics`; `None` answers 503 (no recorder installed).
    pub metrics: Option<PrometheusHandle>,
    /// The Device Shadow service behind `/things/{thing}/shadow`; `None` when it is
    /// disabled (those routes answer 404).
    pub shadows: Option<Arc<fleetcore_services::shadow::ShadowService>>,
    /// The Jobs service behind `/jobs` and `/things/{thing}/jobs`; `None` when disabled.
    pub jobs: Option<Arc<fleetcore_services::jobs::JobsService>>,
    /// Fleet provisioning behind `/provisioning-templates`; `None` when disabled.
    pub provisioning: Option<fleetcore_services::provisioning::ProvisioningService>,
}

pub(crate) type Shared = Arc<AdminState>;

// ----- errors --------------------------------------------------------------

/// An error answer: its status follows from its code, as in the contract's table.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "InvalidRequest", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token from admin.token>) \
             and no admin client certificate",
        )
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        });
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let message = e.to_string();
        match e {
            RegistryError::NotFound(_) => ApiError::not_found(message),
            RegistryError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "Conflict", message),
            RegistryError::Invalid(_) => ApiError::invalid(message),
            RegistryError::Store(_) => ApiError::unavailable(message),
            RegistryError::Signing(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "SigningFailed", message)
            }
        }
    }
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> ApiError {
        ApiError::invalid(e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ----- extractors ------------------------------------------------------------

/// A JSON body; anything unreadable is a 400 `InvalidRequest` naming the problem. The
/// Content-Type is not insisted on, so `curl -d` works as is.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Path parameters, with the same JSON error on a bad one.
pub struct PathArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| PathArgs(t))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

// ----- the router ------------------------------------------------------------

/// Every route the API serves: (path, handlers by method). The single list that
/// [`router`] mounts and the OpenAPI description is tested against.
pub fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    let mut routes = crate::shadow::routes();
    routes.extend(crate::groups::routes());
    routes.extend(crate::jobs::routes());
    routes.extend(crate::provisioning::routes());
    routes.extend([
        ("/things", post(create_thing).get(list_things)),
        (
            "/things/{name}",
            get(get_thing).patch(update_thing).delete(delete_thing),
        ),
        (
            "/things/{name}/principals/{certificate_id}",
            put(attach_principal).delete(detach_principal),
        ),
        ("/certificates", get(list_certificates)),
        ("/certificates/from-csr", post(certificate_from_csr)),
        ("/certificates/create", post(create_certificate)),
        ("/certificates/register", post(register_certificate)),
        (
            "/certificates/{id}",
            get(get_certificate).delete(delete_certificate),
        ),
        ("/certificates/{id}/state", put(set_certificate_state)),
        ("/policies", post(create_policy).get(list_policies)),
        ("/policies/{name}", get(get_policy).delete(delete_policy)),
        ("/policies/{name}/versions", post(create_policy_version)),
        ("/policies/{name}/default-version", put(set_default_version)),
        (
            "/policies/{name}/targets/{certificate_id}",
            put(attach_policy).delete(detach_policy),
        ),
        ("/cas", post(register_ca).get(list_cas)),
        ("/tokens", post(issue_token)),
        ("/tokens/keys", get(list_token_keys)),
        ("/tokens/keys/rotate", post(rotate_token_key)),
        ("/crl", get(crl)),
        ("/retainedMessage", get(crate::retained::list)),
        (
            "/retainedMessage/{*topic}",
            get(crate::retained::get_one).delete(crate::retained::delete),
        ),
        ("/metrics", get(metrics)),
        ("/healthz", get(healthz)),
        ("/openapi.json", get(openapi)),
    ]);
    routes
}

/// The routes served without the bearer token (GET only): a load balancer's health
/// check and a Prometheus scraper must not hold a credential that can revoke every
/// device. They reveal counts (connections, sessions, messages, ...), never names,
/// certificates, policies or payloads. The OpenAPI description marks them
/// `security: []`.
pub const UNAUTHENTICATED: [&str; 2] = ["/healthz", "/metrics"];

/// The whole API; every route but GET [`UNAUTHENTICATED`], the fallbacks included,
/// needs the bearer token (or, over TLS, an admin client certificate).
pub fn router(state: AdminState) -> Router {
    let state = Arc::new(state);
    let mut r = Router::new();
    for (path, methods) in routes() {
        r = r.route(path, methods);
    }
    r.fallback(|req: Request| async move {
        ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
    })
    .method_not_allowed_fallback(|req: Request| async move {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{} is not served on {} (see GET /openapi.json)",
                req.method(),
                req.uri().path()
            ),
        )
    })
    .layer(middleware::from_fn_with_state(state.clone(), require_token))
    .with_state(state)
}

/// Serves the API over TLS on `listener` until `shutdown` resolves: `tls` as made by
/// [`crate::tls::server_config`]; a request is let in with the bearer token or on a
/// connection with a verified client certificate whose CN is
/// [`AdminState::client_cert_cn`].
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = crate::tls::TlsListener::new(listener, tls)?;
    let app = router(state).into_make_service_with_connect_info::<AdminPeer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn require_token(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::GET && UNAUTHENTICATED.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = match presented {
        // Constant time over the token's bytes: a wrong guess tells nothing about
        // how much of it was right.
        Some(t) => bool::from(t.as_bytes().ct_eq(st.token.as_bytes())),
        None => false,
    };
    // Over TLS, a verified client certificate with the admin CN will do instead.
    let peer_cn = req
        .extensions()
        .get::<ConnectInfo<AdminPeer>>()
        .and_then(|p| p.0.client_cn.as_deref());
    let by_cert = match (peer_cn, &st.client_cert_cn) {
        (Some(cn), Some(admin_cn)) => bool::from(cn.as_bytes().ct_eq(admin_cn.as_bytes())),
        _ => false,
    };
    if ok || by_cert {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

// ----- views -----------------------------------------------------------------

/// A certificate as the API shows it (without its PEM).
fn cert_view(c: &CertRecord) -> CertView {
    CertView {
        id: c.id.clone(),
        subject: c.subject.clone(),
        subject_cn: c.subject_cn.clone(),
        issuer: c.issuer.clone(),
        serial: c.serial.clone(),
        state: c.state,
        not_after_ms: c.not_after_ms,
        created_ms: c.created_ms,
        updated_ms: c.updated_ms,
        revoked_ms: c.revoked_ms,
    }
}

pub(crate) fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ----- things ----------------------------------------------------------------

async fn create_thing(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<NewThing>,
) -> ApiResult<Response> {
    let t = st
        .hub
        .registry
        .create_thing(
            &b.name,
            b.thing_type.filter(|t| !t.is_empty()),
            b.attributes,
        )
        .await?;
    Ok(created(t))
}

async fn list_things(State(st): State<Shared>) -> Json<ThingList> {
    Json(ThingList {
        things: st.hub.registry.things(),
    })
}

fn thing_detail(st: &AdminState, t: Thing) -> ThingDetail {
    ThingDetail {
        principals: st.hub.registry.thing_principals(&t.name),
        thing: t,
    }
}

async fn get_thing(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<ThingDetail>> {
    let t = st
        .hub
        .registry
        .thing(&name)
        .ok_or_else(|| ApiError::not_found(format!("thing {name:?} not found")))?;
    Ok(Json(thing_detail(&st, t)))
}

async fn update_thing(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<ThingUpdate>,
) -> ApiResult<Json<Thing>> {
    let t = st
        .hub
        .registry
        .update_thing(&name, b.thing_type, b.attributes, b.merge)
        .await?;
    Ok(Json(t))
}

async fn delete_thing(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Response> {
    st.hub.registry.delete_thing(&name).await?;
    Ok(no_content())
}

async fn attach_principal(
    State(st): State<Shared>,
    PathArgs((name, cert)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub.registry.attach_thing(&name, &cert).await?;
    Ok(no_content())
}

async fn detach_principal(
    State(st): State<Shared>,
    PathArgs((name, cert)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub.registry.detach_thing(&name, &cert).await?;
    Ok(no_content())
}

// ----- certificates ----------------------------------------------------------

fn parse_state(s: Option<&str>) -> ApiResult<CertState> {
    match s {
        None => Ok(CertState::Active),
        Some(s) => Ok(s.parse::<CertState>()?),
    }
}

/// Fails with 404 before anything is issued when a named policy does not exist.
fn check_policies(st: &AdminState, policies: &[String]) -> ApiResult<()> {
    for p in policies {
        if st.hub.registry.policy(p).is_none() {
            return Err(ApiError::not_found(format!("policy {p:?} not found")));
        }
    }
    Ok(())
}

fn new_cert(info: &CertInfo, pem: &str) -> NewCert {
    let mut pem = pem.trim().to_owned();
    pem.push('\n');
    NewCert {
        id: info.id.clone(),
        pem,
        subject: info.subject.clone(),
        subject_cn: info.subject_cn.clone(),
        issuer: info.issuer.clone(),
        serial: info.serial.clone(),
        not_after_ms: unix_ms(info.not_after),
    }
}

/// Registers a certificate, then (with `thing`) creates the thing if missing and
/// attaches it, then attaches `policies`.
pub(crate) async fn register_and_attach(
    st: &AdminState,
    info: &CertInfo,
    pem: &str,
    state: CertState,
    thing: Option<&str>,
    policies: &[String],
) -> ApiResult<CertRecord> {
    let reg = &st.hub.registry;
    let rec = reg.register_certificate(new_cert(info, pem), state).await?;
    if let Some(thing) = thing {
        if reg.thing(thing).is_none() {
            match reg.create_thing(thing, None, BTreeMap::new()).await {
                Ok(_) | Err(RegistryError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        reg.attach_thing(thing, &rec.id).await?;
    }
    for p in policies {
        reg.attach_policy(p, &rec.id).await?;
    }
    tracing::info!(certificate = %rec.id, subject = %rec.subject, state = %rec.state, thing = thing.unwrap_or(""), "certificate registered");
    Ok(rec)
}

/// The first CN of a CSR's subject.
fn csr_common_name(csr_pem: &str) -> ApiResult<Option<String>> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::BadCsr(format!("no PEM certificate request: {e}")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    let cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(cn)
}

/// A device certificate may never carry the CN that opens the admin API over
/// TLS (`[admin] client_cert_cn`, by default "fleetcore-admin"), or one could be
/// issued that is an admin credential.
pub(crate) fn refuse_admin_cn(st: &AdminState, cn: &str) -> ApiResult<()> {
    let reserved = st.client_cert_cn.as_deref().unwrap_or("fleetcore-admin");
    if cn == reserved || cn == "fleetcore-admin" {
        return Err(ApiError::invalid(format!(
            "{cn:?} is reserved for admin client certificates; choose another thing name"
        )));
    }
    Ok(())
}

async fn certificate_from_csr(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CertFromCsr>,
) -> ApiResult<Response> {
    let state = parse_state(b.state.as_deref())?;
    check_policies(&st, &b.policies)?;
    let cn = match &b.thing {
        Some(t) => t.clone(),
        None => csr_common_name(&b.csr_pem)?.ok_or_else(|| {
            ApiError::invalid("the CSR has no CN: give \"thing\" to name the certificate")
        })?,
    };
    refuse_admin_cn(&st, &cn)?;
    let issued = st
        .ca
        .sign_csr(&b.csr_pem, &cn, b.days.unwrap_or(DEFAULT_DAYS))?;
    let info = ca::inspect_pem(&issued.pem)?;
    let rec = register_and_attach(
        &st,
        &info,
        &issued.pem,
        state,
        b.thing.as_deref(),
        &b.policies,
    )
    .await?;
    Ok(created(IssuedCert {
        certificate_id: rec.id,
        certificate_pem: issued.pem,
        private_key_pem: None,
        ca_pem: st.ca.ca_pem().to_string(),
    }))
}

async fn create_certificate(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateCert>,
) -> ApiResult<Response> {
    let state = parse_state(b.state.as_deref())?;
    check_policies(&st, &b.policies)?;
    refuse_admin_cn(&st, &b.thing)?;
    let (issued, key_pem) = st
        .ca
        .create_keys_and_certificate(&b.thing, b.days.unwrap_or(DEFAULT_DAYS))?;
    let info = ca::inspect_pem(&issued.pem)?;
    let rec =
        register_and_attach(&st, &info, &issued.pem, state, Some(&b.thing), &b.policies).await?;
    Ok(created(IssuedCert {
        certificate_id: rec.id,
        certificate_pem: issued.pem,
        private_key_pem: Some(key_pem.to_string()),
        ca_pem: st.ca.ca_pem().to_string(),
    }))
}

/// True when `pem` is signed by the fleetcore CA or by a registered CA.
fn chains_to_known_ca(st: &AdminState, pem: &str) -> ApiResult<bool> {
    if ca::is_signed_by(pem, st.ca.ca_pem())? {
        return Ok(true);
    }
    for known in st.hub.registry.cas() {
        // A CA whose algorithm cannot be checked simply does not vouch for it.
        if ca::is_signed_by(pem, &known.pem).unwrap_or(false) {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn register_certificate(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<RegisterCert>,
) -> ApiResult<Response> {
    let state = parse_state(b.state.as_deref())?;
    let info = ca::inspect_pem(&b.certificate_pem)?;
    if let Some(cn) = &info.subject_cn {
        refuse_admin_cn(&st, cn)?;
    }
    if info.is_ca {
        return Err(ApiError::invalid(format!(
            "certificate {} is a CA certificate; register CAs with POST /cas",
            info.subject
        )));
    }
    if !chains_to_known_ca(&st, &b.certificate_pem)? {
        return Err(ApiError::invalid(format!(
            "certificate {} (issuer {}) is not signed by the fleetcore CA or a registered CA; register its CA with POST /cas first",
            info.subject, info.issuer
        )));
    }
    check_policies(&st, &b.policies)?;
    let rec = register_and_attach(
        &st,
        &info,
        &b.certificate_pem,
        state,
        b.thing.as_deref(),
        &b.policies,
    )
    .await?;
    Ok(created(cert_view(&rec)))
}

async fn list_certificates(State(st): State<Shared>) -> Json<CertList> {
    let certificates = st
        .hub
        .registry
        .certificates()
        .iter()
        .map(cert_view)
        .collect();
    Json(CertList { certificates })
}

fn certificate_record(st: &AdminState, id: &str) -> ApiResult<CertRecord> {
    st.hub
        .registry
        .certificate(id)
        .ok_or_else(|| ApiError::not_found(format!("certificate {id:?} not found")))
}

async fn get_certificate(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> ApiResult<Json<CertDetail>> {
    let rec = certificate_record(&st, &id)?;
    Ok(Json(CertDetail {
        cert: cert_view(&rec),
        pem: rec.pem,
        policies: st.hub.registry.certificate_policies(&id),
        things: st.hub.registry.certificate_things(&id),
    }))
}

async fn set_certificate_state(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
    JsonBody(b): JsonBody<StateChange>,
) -> ApiResult<Json<CertView>> {
    let state: CertState = b.state.parse()?;
    let rec = st.hub.registry.set_certificate_state(&id, state).await?;
    tracing::info!(certificate = %id, state = %state, "certificate state changed");
    Ok(Json(cert_view(&rec)))
}

async fn delete_certificate(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> ApiResult<Response> {
    st.hub.registry.delete_certificate(&id).await?;
    Ok(no_content())
}

// ----- policies --------------------------------------------------------------

/// A policy document given as JSON or as the JSON text (IoT Core's form).
fn document_text(doc: &Value) -> String {
    match doc {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn create_policy(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<NewPolicy>,
) -> ApiResult<Response> {
    let p = st
        .hub
        .registry
        .create_policy(&b.name, &document_text(&b.document))
        .await?;
    Ok(created(p))
}

async fn list_policies(State(st): State<Shared>) -> Json<PolicyList> {
    Json(PolicyList {
        policies: st.hub.registry.policies(),
    })
}

fn policy_record(st: &AdminState, name: &str) -> ApiResult<PolicyRecord> {
    st.hub
        .registry
        .policy(name)
        .ok_or_else(|| ApiError::not_found(format!("policy {name:?} not found")))
}

async fn get_policy(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<PolicyRecord>> {
    Ok(Json(policy_record(&st, &name)?))
}

async fn create_policy_version(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<NewPolicyVersion>,
) -> ApiResult<Response> {
    let p = st
        .hub
        .registry
        .create_policy_version(&name, &document_text(&b.document), b.set_as_default)
        .await?;
    Ok(created(p))
}

async fn set_default_version(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<DefaultVersion>,
) -> ApiResult<Json<PolicyRecord>> {
    let p = st
        .hub
        .registry
        .set_default_policy_version(&name, b.version)
        .await?;
    Ok(Json(p))
}

async fn delete_policy(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Response> {
    st.hub.registry.delete_policy(&name).await?;
    Ok(no_content())
}

async fn attach_policy(
    State(st): State<Shared>,
    PathArgs((name, cert)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub.registry.attach_policy(&name, &cert).await?;
    Ok(no_content())
}

async fn detach_policy(
    State(st): State<Shared>,
    PathArgs((name, cert)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub.registry.detach_policy(&name, &cert).await?;
    Ok(no_content())
}

// ----- CAs -------------------------------------------------------------------

fn ca_view(rec: &CaRecord, source: Option<&str>) -> CaView {
    CaView {
        id: rec.id.clone(),
        subject: rec.subject.clone(),
        created_ms: rec.created_ms,
        source: source.map(str::to_owned),
    }
}

async fn register_ca(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<NewCa>,
) -> ApiResult<Response> {
    let info = ca::inspect_pem(&b.certificate_pem)?;
    if !info.is_ca {
        return Err(ApiError::invalid(format!(
            "certificate {} is not a CA certificate (basicConstraints CA:TRUE is required)",
            info.subject
        )));
    }
    let mut pem = b.certificate_pem.trim().to_owned();
    pem.push('\n');
    let rec = st
        .hub
        .registry
        .register_ca(CaRecord {
            id: info.id,
            pem,
            subject: info.subject,
            created_ms: unix_ms(SystemTime::now()),
        })
        .await?;
    // The engine hears of it (RegistryEvent::CasChanged) and the registry listeners
    // trust it from the next TLS handshake on.
    tracing::info!(ca = %rec.id, subject = %rec.subject, "CA registered; TLS listeners now trust it");
    Ok(created(ca_view(&rec, None)))
}

async fn list_cas(State(st): State<Shared>) -> Json<CaList> {
    let own = st.ca.ca_info();
    let mut cas = vec![CaView {
        id: own.id.clone(),
        subject: own.subject.clone(),
        created_ms: unix_ms(own.not_before),
        source: Some("fleetcore".into()),
    }];
    cas.extend(
        st.hub
            .registry
            .cas()
            .iter()
            .map(|c| ca_view(c, Some("registered"))),
    );
    Json(CaList { cas })
}

// ----- device tokens -----------------------------------------------------------

/// A token lifetime as requests give it: a whole number of seconds, alone or followed by
/// `s`, `m`, `h` or `d` (`"90s"`, `"30m"`, `"1h"`, `"2d"`).
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "ttl {text:?}: expected a whole number followed by s, m, h or d \
             (e.g. \"90s\", \"30m\", \"1h\", \"2d\"), or a number of seconds"
        )
    };
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(bad)
}

fn ttl_value(v: &Value) -> ApiResult<u64> {
    match v {
        Value::String(s) => parse_ttl(s).map_err(ApiError::invalid),
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            ApiError::invalid(format!("ttl {n}: expected a whole number of seconds"))
        }),
        other => Err(ApiError::invalid(format!(
            "ttl {other}: expected a string such as \"1h\" or a number of seconds"
        ))),
    }
}

fn issued_token_view(t: &IssuedToken) -> IssuedTokenView {
    let c = &t.claims;
    IssuedTokenView {
        token: t.token.clone(),
        thing: c.thing.clone(),
        certificate_id: c.cert.clone(),
        key_id: c.kid.clone(),
        issued_at: utc_text(c.iat),
        expires_at: utc_text(c.exp),
        issued_at_ms: c.iat.saturating_mul(1000),
        expires_at_ms: c.exp.saturating_mul(1000),
    }
}

fn token_key_view(k: &TokenKeyInfo) -> TokenKeyView {
    TokenKeyView {
        key_id: k.kid.clone(),
        created: utc_text(k.created_ms / 1000),
        created_ms: k.created_ms,
        signing: k.signing,
        public_key: k.public_key.clone(),
        verify_until: k.verify_until_ms.map(|until| utc_text(until / 1000)),
        verify_until_ms: k.verify_until_ms,
    }
}

async fn issue_token(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<NewToken>,
) -> ApiResult<Response> {
    let reg = &st.hub.registry;
    let ttl_secs = match (&b.ttl, b.ttl_secs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give either \"ttl\" or \"ttl_secs\", not both",
            ))
        }
        (Some(v), None) => ttl_value(v)?,
        (None, Some(secs)) => secs,
        (None, None) => reg.token_config().default_ttl_secs,
    };
    let issued = reg
        .issue_token(
            &b.thing,
            b.certificate_id.as_deref(),
            Duration::from_secs(ttl_secs),
        )
        .await?;
    tracing::info!(
        thing = %issued.claims.thing,
        certificate = %issued.claims.cert,
        key_id = %issued.claims.kid,
        expires_at = %utc_text(issued.claims.exp),
        "device token issued"
    );
    Ok(created(issued_token_view(&issued)))
}

async fn list_token_keys(State(st): State<Shared>) -> Json<TokenKeyList> {
    let keys = st
        .hub
        .registry
        .token_keys()
        .iter()
        .map(token_key_view)
        .collect();
    Json(TokenKeyList { keys })
}

async fn rotate_token_key(State(st): State<Shared>) -> ApiResult<Response> {
    let key = st.hub.registry.rotate_token_key().await?;
    tracing::info!(key_id = %key.kid, "token signing key rotated");
    Ok(created(token_key_view(&key)))
}

// ----- CRL, metrics, health, description ---------------------------------------

#[derive(Deserialize)]
struct CrlQuery {
    #[serde(default)]
    format: Option<String>,
}

async fn crl(
    State(st): State<Shared>,
    q: Result<Query<CrlQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let pem = match q.format.as_deref() {
        None | Some("der") => false,
        Some("pem") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "format {other:?}: expected \"der\" (the default) or \"pem\""
            )))
        }
    };
    // Only serials this CA issued belong on its CRL.
    let own_subject = &st.ca.ca_info().subject;
    let revoked: Vec<(String, SystemTime)> = st
        .hub
        .registry
        .certificates()
        .into_iter()
        .filter(|c| c.state == CertState::Revoked && &c.issuer == own_subject)
        .map(|c| {
            let at = c.revoked_ms.unwrap_or(c.updated_ms);
            (c.serial, UNIX_EPOCH + Duration::from_millis(at))
        })
        .collect();
    // The CRL number must grow with every CRL, across restarts too; the registry's
    // generation starts again at 1 on each start, the clock does not.
    let number = unix_ms(SystemTime::now());
    let crl = st.ca.crl(&revoked, number)?;
    Ok(if pem {
        ([(header::CONTENT_TYPE, "application/x-pem-file")], crl.pem).into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/pkix-crl")], crl.der).into_response()
    })
}

async fn metrics(State(st): State<Shared>) -> ApiResult<Response> {
    let handle = st
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("no metrics recorder is installed"))?;
    handle.run_upkeep();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

async fn healthz(State(st): State<Shared>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        connections: st.hub.connections.load(Ordering::Acquire),
        sessions: st.hub.session_count(),
    })
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::spec())
}

// ----- metrics recorder ------------------------------------------------------

/// Installs the Prometheus recorder for the whole process (call once, before the broker
/// starts) and registers the gauges at zero, so a scrape before the first client sees
/// them.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    use fleetcore_broker::metrics as m;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    metrics::gauge!(m::CONNECTIONS_OPEN).set(0.0);
    metrics::gauge!(m::SESSIONS).set(0.0);
    metrics::gauge!(m::RETAINED).set(0.0);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use serde_json::json;
    use tower::ServiceExt;

    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

    async fn state(dir: &std::path::Path) -> AdminState {
        let (store, loaded) =
            fleetcore_store::Store::open(&dir.join("s.redb"), Default::default()).unwrap();
        let hub = Hub::new(
            fleetcore_broker::Config::default(),
            store.storage(),
            loaded,
            Default::default(),
        );
        let files = ca::CaFiles::in_dir(&dir.join("pki"));
        let (ca, _) = Ca::load_or_init(&files, &["localhost".into()]).unwrap();
        AdminState {
            shadows: None,
            jobs: None,
            provisioning: None,
            hub,
            ca: Arc::new(ca),
            token: "secret".into(),
            client_cert_cn: None,
            metrics: Some(
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .build_recorder()
                    .handle(),
            ),
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A concrete path for a templated one.
    fn concrete(path: &str) -> String {
        path.replace("{name}", "x")
            .replace("{id}", "y")
            .replace("{certificate_id}", "z")
            .replace("{*topic}", "a/b")
            .replace("{topic}", "a/b")
    }

    /// The description lists exactly the router's paths, and on each path exactly the
    /// methods the router serves there.
    #[tokio::test]
    async fn openapi_lists_exactly_the_routes_served() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(state(dir.path()).await);
        let spec = crate::openapi::spec();
        let described = spec["paths"].as_object().unwrap();
        let mounted: Vec<String> = routes()
            .iter()
            .map(|(p, _)| crate::openapi::described_path(p))
            .collect();
        let mut a: Vec<&str> = described.keys().map(String::as_str).collect();
        let mut b: Vec<&str> = mounted.iter().map(String::as_str).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "OpenAPI paths differ from the router's");
        for path in &mounted {
            let ops = described[path.as_str()].as_object().unwrap();
            for method in METHODS {
                let listed = ops.contains_key(&method.to_ascii_lowercase());
                let (status, body) = call(&app, method, &concrete(path), Some("secret")).await;
                let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
                    || body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("no route"));
                assert_eq!(
                    listed, !unrouted,
                    "{method} {path}: described {listed}, answered {status} {body}"
                );
            }
        }
        // Every operation says what it answers, and the security scheme is declared.
        assert_eq!(spec["openapi"], "3.1.0");
        assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
        // The routes open without a token say so (security: []) and answer no 401.
        for (path, ops) in described {
            let open = UNAUTHENTICATED.contains(&path.as_str());
            for (m, op) in ops.as_object().unwrap() {
                if m != "parameters" {
                    assert_eq!(
                        op["responses"]["401"].is_object(),
                        !open,
                        "{m} {path}: {op}"
                    );
                    assert_eq!(op["security"] == json!([]), open, "{m} {path}: {op}");
                }
            }
        }
    }

    #[test]
    fn token_lifetimes_parse_with_their_unit() {
        for (text, secs) in [
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("2d", 172_800),
            ("3600", 3600),
            (" 5m ", 300),
            ("0s", 0),
        ] {
            assert_eq!(parse_ttl(text), Ok(secs), "{text}");
        }
        for text in [
            "",
            "h",
            "1x",
            "1H",
            "1.5h",
            "-1h",
            "1h30m",
            "99999999999999999999d",
        ] {
            let e = parse_ttl(text).unwrap_err();
            assert!(e.contains("\"1h\""), "{text}: {e}");
        }
        assert_eq!(ttl_value(&json!(60)).unwrap(), 60);
        assert!(ttl_value(&json!(-1)).is_err());
        assert!(ttl_value(&json!(true)).is_err());
    }

    #[tokio::test]
    async fn every_route_needs_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(state(dir.path()).await);
        for (path, _) in routes() {
            if UNAUTHENTICATED.contains(&path) {
                continue;
            }
            for token in [None, Some("wrong"), Some("secre"), Some("secrett")] {
                let (status, body) = call(&app, "GET", &concrete(path), token).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
                assert_eq!(body["error"]["code"], "Unauthorized");
            }
        }
        let (status, _) = call(&app, "GET", "/nope", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body) = call(&app, "GET", "/healthz", Some("secret")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
    }

    /// A health check and a metrics scraper get in without the token (or with a wrong
    /// one); only GET, and only those two paths (a prefix or a suffix does not count).
    #[tokio::test]
    async fn healthz_and_metrics_need_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let app = router(state(dir.path()).await);
        for token in [None, Some("wrong"), Some("secret")] {
            let (status, body) = call(&app, "GET", "/healthz", token).await;
            assert_eq!(status, StatusCode::OK, "{token:?}");
            assert_eq!(body["status"], "ok");
            let resp = app
                .clone()
                .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        for (method, path) in [
            ("POST", "/healthz"),
            ("DELETE", "/metrics"),
            ("GET", "/healthz/"),
            ("GET", "/metrics/x"),
            ("GET", "/healthzz"),
            ("GET", "/things"),
        ] {
            let (status, _) = call(&app, method, path, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        }
    }
}
