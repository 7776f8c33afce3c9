//! The Device Shadow HTTP data plane, as IoT Core's (`GetThingShadow`,
//! `UpdateThingShadow`, `DeleteThingShadow`, `ListNamedShadowsForThing`), on the admin
//! API and behind its token:
//!
//! - `GET|POST|DELETE /things/{thing}/shadow[?name=S]`
//! - `GET /api/things/shadow/ListNamedShadowsForThing/{thing}[?nextToken=&pageSize=]`
//!
//! Bodies are IoT Core's; so are errors (`{"code","message","timestamp"}`, with the
//! HTTP status of `code`). An update or delete here publishes the same
//! `update/accepted`, `update/delta`, `update/documents` or `delete/accepted` messages
//! over MQTT as a device's would; errors are only answered over HTTP.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Json;
use fleetcore_core::time::now_secs;
use fleetcore_services::shadow::document::ShadowError;
use fleetcore_services::shadow::{Key, ShadowService};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{ApiError, PathArgs, Shared};

/// ListNamedShadowsForThing's page size: default and most (Greengrass's values; IoT
/// Core's are not documented).
pub const DEFAULT_PAGE: usize = 25;
pub const MAX_PAGE: usize = 100;

pub fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    vec![
        (
            "/things/{thing}/shadow",
            get(get_shadow).post(update_shadow).delete(delete_shadow),
        ),
        (
            "/api/things/shadow/ListNamedShadowsForThing/{thing}",
            get(list_named),
        ),
    ]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameQuery {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListQuery {
    next_token: Option<String>,
    page_size: Option<usize>,
}

/// A shadow error as IoT Core answers it over HTTP.
struct Rejected(ShadowError);

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0.to_json(None, now_secs()))).into_response()
    }
}

fn service(st: &Shared) -> Result<&ShadowService, ApiError> {
    st.shadows.as_deref().ok_or_else(|| {
        ApiError::not_found("the shadow service is disabled ([shadow] enabled = false)")
    })
}

fn key(thing: String, q: Result<Query<NameQuery>, QueryRejection>) -> Result<Key, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    Ok(Key {
        thing,
        name: q.name,
    })
}

fn answer(r: Result<Value, ShadowError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => Rejected(e).into_response(),
    }
}

async fn get_shadow(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
    q: Result<Query<NameQuery>, QueryRejection>,
) -> Response {
    match (service(&st), key(thing, q)) {
        (Ok(s), Ok(k)) => answer(s.get(k).await),
        (Err(e), _) | (_, Err(e)) => e.into_response(),
    }
}

async fn update_shadow(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
    q: Result<Query<NameQuery>, QueryRejection>,
    body: Bytes,
) -> Response {
    match (service(&st), key(thing, q)) {
        (Ok(s), Ok(k)) => answer(s.update(k, body).await),
        (Err(e), _) | (_, Err(e)) => e.into_response(),
    }
}

async fn delete_shadow(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
    q: Result<Query<NameQuery>, QueryRejection>,
) -> Response {
    match (service(&st), key(thing, q)) {
        (Ok(s), Ok(k)) => answer(s.delete(k).await),
        (Err(e), _) | (_, Err(e)) => e.into_response(),
    }
}

async fn list_named(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let s = match service(&st) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return ApiError::invalid(e.body_text()).into_response(),
    };
    let page = q.page_size.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&page) {
        return Rejected(ShadowError::new(
            400,
            format!("pageSize must be between 1 and {MAX_PAGE}"),
        ))
        .into_response();
    }
    answer(s.list_named(&thing, q.next_token.as_deref(), page))
}

/// The OpenAPI paths of these routes.
pub fn openapi_paths() -> Value {
    let name = json!({"name": "name", "in": "query", "required": false, "schema": {"type": "string"},
        "description": "a named shadow; absent: the classic shadow"});
    let thing =
        json!({"name": "thing", "in": "path", "required": true, "schema": {"type": "string"}});
    let err = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ShadowError"}}}});
    let doc = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"type": "object"}}}});
    json!({
        "/things/{thing}/shadow": {
            "get": {"summary": "GetThingShadow: the document with state.desired, state.reported, state.delta, metadata, version and timestamp (epoch seconds)",
                "parameters": [thing, name],
                "responses": {"200": doc("the shadow document"), "401": {"description": "Unauthorized"}, "404": err("No shadow exists with name: ..."), "400": err("bad thing or shadow name")}},
            "post": {"summary": "UpdateThingShadow: merges a request document {\"state\":{\"desired\"|\"reported\":...},\"version\"?,\"clientToken\"?}; publishes update/accepted, update/delta and update/documents over MQTT",
                "parameters": [thing, name],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"200": doc("the update/accepted document"), "401": {"description": "Unauthorized"},
                    "400": err("invalid JSON, missing state, bad node, too deep, bad clientToken or version"), "409": err("Version conflict"),
                    "413": err("state over [shadow] max_state_bytes"), "415": err("not UTF-8"), "500": err("the change could not be written")}},
            "delete": {"summary": "DeleteThingShadow: {\"version\",\"timestamp\"}; the version is kept for a shadow created again within 48 hours; publishes delete/accepted",
                "parameters": [thing, name],
                "responses": {"200": doc("{version, timestamp}"), "401": {"description": "Unauthorized"}, "404": err("No shadow exists with name: ..."), "500": err("the change could not be written")}},
        },
        "/api/things/shadow/ListNamedShadowsForThing/{thing}": {
            "get": {"summary": "ListNamedShadowsForThing: {\"results\":[names],\"nextToken\"?,\"timestamp\"}; an unknown thing has none",
                "parameters": [thing,
                    {"name": "nextToken", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "pageSize", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}}],
                "responses": {"200": doc("a page of names"), "401": {"description": "Unauthorized"}, "400": err("bad pageSize or nextToken")}},
        },
    })
}

/// The OpenAPI schemas of these routes.
pub fn openapi_schemas() -> Value {
    json!({
        "ShadowError": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "integer"}, "message": {"type": "string"}, "timestamp": {"type": "integer"},
            "clientToken": {"type": "string"}}},
    })
}
