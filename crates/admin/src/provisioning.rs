//! Fleet provisioning's control plane, after IoT Core's (CreateProvisioningTemplate,
//! DescribeProvisioningTemplate, ListProvisioningTemplates, UpdateProvisioningTemplate,
//! DeleteProvisioningTemplate), claim certificates for a template, and the JITP
//! template of a registered CA.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::Json;
use fleetcore_identity::ca;
use fleetcore_identity::registry::{CertState, RegistryError};
use fleetcore_services::provisioning::store::{TemplateRecord, TemplateType};
use fleetcore_services::provisioning::{
    claim_policy, template_arn, ProvisioningService, TemplateChangeError, TemplateSpec,
};

use serde_json::{json, Value};

use crate::api::{
    created, no_content, register_and_attach, ApiError, JsonBody, PathArgs, Shared, DEFAULT_DAYS,
};
use crate::models::{CaTemplate, CreateTemplate, NewClaimCert, UpdateTemplate};

pub fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    vec![
        (
            "/provisioning-templates",
            post(create_template).get(list_templates),
        ),
        (
            "/provisioning-templates/{name}",
            get(describe_template)
                .patch(update_template)
                .delete(delete_template),
        ),
        (
            "/provisioning-templates/{name}/claim-certificates",
            post(create_claim_certificate),
        ),
        (
            "/cas/{id}/provisioning-template",
            put(set_ca_template)
                .delete(clear_ca_template)
                .get(get_ca_template),
        ),
    ]
}

fn service(st: &Shared) -> Result<&ProvisioningService, ApiError> {
    st.provisioning.as_ref().ok_or_else(|| {
        ApiError::not_found("fleet provisioning is disabled ([provisioning] enabled = false)")
    })
}

fn err(e: TemplateChangeError) -> ApiError {
    match e {
        TemplateChangeError::Invalid(m) => ApiError::invalid(m),
        TemplateChangeError::NotFound(m) => ApiError::not_found(m),
        TemplateChangeError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "ResourceAlreadyExists", m)
        }
        e @ TemplateChangeError::Store(_) => ApiError::unavailable(e.to_string()),
    }
}

fn view(t: &TemplateRecord, with_body: bool) -> Value {
    let mut v = json!({
        "templateName": t.name,
        "templateArn": template_arn(&t.name),
        "description": t.description,
        "enabled": t.enabled,
        "type": t.template_type.to_string(),
        "defaultVersionId": t.version,
        "creationDate": t.created_ms as f64 / 1000.0,
        "lastModifiedDate": t.updated_ms as f64 / 1000.0,
    });
    if let Some(h) = &t.hook {
        v["preProvisioningHook"] = json!({"url": h.url});
    }
    if with_body {
        v["templateBody"] = Value::String(t.body.clone());
    }
    v
}

/// `templateBody` as IoT Core takes it (a string holding JSON), or as a JSON object.
fn body_text(v: Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(o @ Value::Object(_)) => Ok(Some(o.to_string())),
        Some(_) => Err(ApiError::invalid(
            "templateBody must be the template JSON, as a string or an object",
        )),
    }
}

fn template_type(s: Option<&str>) -> Result<Option<TemplateType>, ApiError> {
    match s {
        None => Ok(None),
        Some("FLEET_PROVISIONING") => Ok(Some(TemplateType::FleetProvisioning)),
        Some("JITP") => Ok(Some(TemplateType::Jitp)),
        Some(other) => Err(ApiError::invalid(format!(
            "type {other:?} must be FLEET_PROVISIONING or JITP"
        ))),
    }
}

async fn create_template(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateTemplate>,
) -> Result<Response, ApiError> {
    let svc = service(&st)?;
    let _ = b.provisioning_role_arn;
    let spec = TemplateSpec {
        body: body_text(Some(b.template_body))?,
        description: b.description,
        enabled: b.enabled,
        template_type: template_type(b.template_type.as_deref())?,
        hook: b.pre_provisioning_hook.map(Some),
    };
    let t = svc
        .create_template(&b.template_name, spec)
        .await
        .map_err(err)?;
    Ok(created(json!({
        "templateName": t.name,
        "templateArn": template_arn(&t.name),
        "defaultVersionId": t.version,
    })))
}

async fn list_templates(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let svc = service(&st)?;
    let list: Vec<Value> = svc.templates().iter().map(|t| view(t, false)).collect();
    Ok(Json(json!({ "templates": list })))
}

async fn describe_template(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> Result<Json<Value>, ApiError> {
    let svc = service(&st)?;
    let t = svc
        .template(&name)
        .ok_or_else(|| ApiError::not_found(format!("template {name:?} not found")))?;
    Ok(Json(view(&t, true)))
}

async fn update_template(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<UpdateTemplate>,
) -> Result<Json<Value>, ApiError> {
    let svc = service(&st)?;
    let _ = b.provisioning_role_arn;
    if b.remove_pre_provisioning_hook && b.pre_provisioning_hook.is_some() {
        return Err(ApiError::invalid(
            "preProvisioningHook and removePreProvisioningHook together",
        ));
    }
    let spec = TemplateSpec {
        body: body_text(b.template_body)?,
        description: b.description,
        enabled: b.enabled,
        template_type: template_type(b.template_type.as_deref())?,
        hook: if b.remove_pre_provisioning_hook {
            Some(None)
        } else {
            b.pre_provisioning_hook.map(Some)
        },
    };
    let t = svc.update_template(&name, spec).await.map_err(err)?;
    Ok(Json(view(&t, true)))
}

async fn delete_template(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> Result<Response, ApiError> {
    service(&st)?.delete_template(&name).await.map_err(err)?;
    Ok(no_content())
}

/// A claim certificate for template `name`: a new key and certificate (CN
/// `claim-{name}`), registered ACTIVE with the policy `fleetcore-claim-{name}` (made
/// if missing), which allows only that template's provisioning topics.
async fn create_claim_certificate(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let svc = service(&st)?;
    let b: NewClaimCert = if body.is_empty() {
        NewClaimCert::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?
    };
    let t = svc
        .template(&name)
        .ok_or_else(|| ApiError::not_found(format!("template {name:?} not found")))?;
    if t.template_type != TemplateType::FleetProvisioning {
        return Err(ApiError::invalid(format!(
            "template {name:?} is {}; claim certificates are for FLEET_PROVISIONING templates",
            t.template_type
        )));
    }
    let reg = &st.hub.registry;
    let policy = format!("fleetcore-claim-{name}");
    if reg.policy(&policy).is_none() {
        match reg.create_policy(&policy, &claim_policy(&name)).await {
            Ok(_) | Err(RegistryError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let cn = format!("claim-{name}");
    let (issued, key_pem) = st
        .ca
        .create_keys_and_certificate(&cn, b.days.unwrap_or(DEFAULT_DAYS))?;
    let info = ca::inspect_pem(&issued.pem)?;
    let rec = register_and_attach(
        &st,
        &info,
        &issued.pem,
        CertState::Active,
        None,
        std::slice::from_ref(&policy),
    )
    .await?;
    tracing::info!(certificate = %rec.id, template = %name, policy = %policy, "claim certificate created");
    Ok(created(json!({
        "certificate_id": rec.id,
        "certificate_pem": issued.pem,
        "private_key_pem": key_pem,
        "ca_pem": st.ca.ca_pem(),
        "policy_name": policy,
        "template_name": name,
    })))
}

async fn set_ca_template(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
    JsonBody(b): JsonBody<CaTemplate>,
) -> Result<Json<Value>, ApiError> {
    service(&st)?
        .set_ca_template(&id, Some(&b.template_name))
        .await
        .map_err(err)?;
    Ok(Json(
        json!({"caCertificateId": id, "templateName": b.template_name}),
    ))
}

async fn clear_ca_template(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> Result<Response, ApiError> {
    service(&st)?
        .set_ca_template(&id, None)
        .await
        .map_err(err)?;
    Ok(no_content())
}

async fn get_ca_template(
    State(st): State<Shared>,
    PathArgs(id): PathArgs<String>,
) -> Result<Response, ApiError> {
    let svc = service(&st)?;
    match svc.ca_templates().get(&id) {
        Some(t) => Ok(Json(json!({"caCertificateId": id, "templateName": t})).into_response()),
        None => Err(ApiError::not_found(format!(
            "CA {id:?} has no JITP template"
        ))),
    }
}

/// The OpenAPI paths of this module (merged into `GET /openapi.json`).
pub fn openapi_paths() -> Value {
    let name = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9A-Za-z_-]{1,36}$"}});
    let ca = json!({"name": "id", "in": "path", "required": true, "description": "the CA's certificate id", "schema": {"type": "string"}});
    let ok = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"type": "object"}}}});
    let e = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let body = || json!({"required": true, "content": {"application/json": {"schema": {"type": "object"}}}});
    json!({
        "/provisioning-templates": {
            "post": {"summary": "CreateProvisioningTemplate: {templateName, templateBody (the template JSON, as a string or an object), description?, enabled? (default true), type?: FLEET_PROVISIONING|JITP, preProvisioningHook?: {url: http(s) URL}}. A template that does not validate is refused naming the resource and field.",
                "requestBody": body(),
                "responses": {"201": ok("{templateName, templateArn, defaultVersionId}"), "400": e("invalid template"), "401": e("Unauthorized"), "409": e("ResourceAlreadyExists")}},
            "get": {"summary": "ListProvisioningTemplates",
                "responses": {"200": ok("{templates:[...]}"), "401": e("Unauthorized")}},
        },
        "/provisioning-templates/{name}": {
            "get": {"summary": "DescribeProvisioningTemplate, with templateBody", "parameters": [name.clone()],
                "responses": {"200": ok("{templateName, templateBody, enabled, type, ...}"), "401": e("Unauthorized"), "404": e("NotFound")}},
            "patch": {"summary": "UpdateProvisioningTemplate: {templateBody? (a new version), description?, enabled?, type?, preProvisioningHook?, removePreProvisioningHook?}", "parameters": [name.clone()],
                "requestBody": body(),
                "responses": {"200": ok("the template"), "400": e("invalid"), "401": e("Unauthorized"), "404": e("NotFound"), "409": e("attached to a CA")}},
            "delete": {"summary": "DeleteProvisioningTemplate", "parameters": [name.clone()],
                "responses": {"204": {"description": "deleted"}, "401": e("Unauthorized"), "404": e("NotFound"), "409": e("attached to a CA")}},
        },
        "/provisioning-templates/{name}/claim-certificates": {
            "post": {"summary": "A claim certificate for the template: a new key and certificate (CN claim-{name}), ACTIVE, with policy fleetcore-claim-{name} (made if missing) allowing only the provisioning topics. Body optional: {days?}.", "parameters": [name],
                "responses": {"201": ok("{certificate_id, certificate_pem, private_key_pem, ca_pem, policy_name, template_name}"), "400": e("not a fleet template"), "401": e("Unauthorized"), "404": e("NotFound")}},
        },
        "/cas/{id}/provisioning-template": {
            "put": {"summary": "Attach a JITP template to a registered CA: {templateName}", "parameters": [ca.clone()],
                "requestBody": body(),
                "responses": {"200": ok("{caCertificateId, templateName}"), "400": e("not a JITP template"), "401": e("Unauthorized"), "404": e("CA or template not found")}},
            "get": {"summary": "The CA's JITP template", "parameters": [ca.clone()],
                "responses": {"200": ok("{caCertificateId, templateName}"), "401": e("Unauthorized"), "404": e("none")}},
            "delete": {"summary": "Detach the CA's JITP template", "parameters": [ca],
                "responses": {"204": {"description": "detached"}, "401": e("Unauthorized")}},
        },
    })
}
