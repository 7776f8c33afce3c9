//! The OpenAPI 3.1 description served at `GET /openapi.json`, written by hand from
//! `docs/admin-api.md`. A test checks it lists exactly the routes [`crate::api::routes`]
//! mounts, method by method.

use serde_json::{json, Map, Value};

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn error_responses(codes: &[u16]) -> Map<String, Value> {
    let mut m = Map::new();
    for code in codes {
        let what = match code {
            400 => "InvalidRequest: bad JSON, name, topic, policy document, PEM, CSR or token lifetime",
            401 => "Unauthorized: missing or wrong bearer token (and no admin client certificate)",
            404 => "NotFound",
            409 => "Conflict: already exists, still attached, revoked, or (tokens) no ACTIVE certificate attached to the thing",
            503 => "StoreUnavailable: the change could not be written",
            _ => "error",
        };
        m.insert(
            code.to_string(),
            json!({"description": what, "content": {"application/json": {"schema": schema("Error")}}}),
        );
    }
    m
}

/// One operation: summary, request body schema (if any), success status, its schema
/// (None: no body) and the error statuses it can answer besides 401.
fn op(summary: &str, body: Option<&str>, ok: u16, answer: Option<Value>, errors: &[u16]) -> Value {
    let mut responses = error_responses(&[401]);
    responses.extend(error_responses(errors));
    let ok_resp = match answer {
        Some(s) => {
            json!({"description": "success", "content": {"application/json": {"schema": s}}})
        }
        None => json!({"description": "success, no body"}),
    };
    responses.insert(ok.to_string(), ok_resp);
    let mut o = json!({"summary": summary, "responses": responses});
    if let Some(b) = body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": schema(b)}}});
    }
    o
}

fn list_of(key: &str, item: &str) -> Value {
    json!({"type": "object", "required": [key], "properties": {key: {"type": "array", "items": schema(item)}}})
}

fn path_param(name: &str, what: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": what, "schema": {"type": "string"}})
}

/// How a router path is written in the description: the wildcard `{*topic}` (which
/// takes raw slashes) is the parameter `{topic}`.
pub fn described_path(router_path: &str) -> String {
    router_path.replace("{*", "{")
}

/// The description, as JSON.
pub fn spec() -> Value {
    let name = path_param("name", "thing or policy name (URL-encoded)");
    let cert = path_param("certificate_id", "certificate id: SHA-256 of the DER, hex");
    let id = path_param("id", "certificate id: SHA-256 of the DER, hex");
    let paths = json!({
        "/things": {
            "post": op("Create a thing", Some("NewThing"), 201, Some(schema("Thing")), &[400, 409, 503]),
            "get": op("List things", None, 200, Some(list_of("things", "Thing")), &[]),
        },
        "/things/{name}": {
            "parameters": [name],
            "get": op("A thing, with the certificates attached to it", None, 200, Some(schema("ThingDetail")), &[404]),
            "patch": op("Update a thing's type and attributes", Some("ThingUpdate"), 200, Some(schema("Thing")), &[400, 404, 503]),
            "delete": op("Delete a thing (409 while certificates are attached)", None, 204, None, &[404, 409, 503]),
        },
        "/things/{name}/principals/{certificate_id}": {
            "parameters": [name, cert],
            "put": op("Attach a certificate to a thing", None, 204, None, &[404, 503]),
            "delete": op("Detach a certificate from a thing", None, 204, None, &[404, 503]),
        },
        "/certificates": {
            "get": op("List certificates (without PEM)", None, 200, Some(list_of("certificates", "Certificate")), &[]),
        },
        "/certificates/from-csr": {
            "post": op("Issue a certificate from a CSR (CN = thing, or the CSR's CN); with thing, create it if missing and attach it; attach policies", Some("FromCsr"), 201, Some(schema("IssuedCertificate")), &[400, 404, 409, 503]),
        },
        "/certificates/create": {
            "post": op("Create a key pair and a certificate for a thing; the key is returned once and never stored", Some("CreateCertificate"), 201, Some(schema("CreatedCertificate")), &[400, 404, 409, 503]),
        },
        "/certificates/register": {
            "post": op("Register a certificate that chains to the fleetcore CA or a registered CA", Some("RegisterCertificate"), 201, Some(schema("Certificate")), &[400, 404, 409, 503]),
        },
        "/certificates/{id}": {
            "parameters": [id],
            "get": op("A certificate with its PEM, policies and things", None, 200, Some(schema("CertificateDetail")), &[404]),
            "delete": op("Delete a certificate (409 while ACTIVE or attached)", None, 204, None, &[404, 409, 503]),
        },
        "/certificates/{id}/state": {
            "parameters": [id],
            "put": op("Change a certificate's state; leaving ACTIVE disconnects its live connections at once", Some("StateChange"), 200, Some(schema("Certificate")), &[400, 404, 409, 503]),
        },
        "/policies": {
            "post": op("Create a policy (400 names the statement and field at fault)", Some("NewPolicy"), 201, Some(schema("Policy")), &[400, 409, 503]),
            "get": op("List policies", None, 200, Some(list_of("policies", "Policy")), &[]),
        },
        "/policies/{name}": {
            "parameters": [name],
            "get": op("A policy with every version's document", None, 200, Some(schema("Policy")), &[404]),
            "delete": op("Delete a policy (409 while attached)", None, 204, None, &[404, 409, 503]),
        },
        "/policies/{name}/versions": {
            "parameters": [name],
            "post": op("Add a policy version (at most 5 are kept)", Some("NewPolicyVersion"), 201, Some(schema("Policy")), &[400, 404, 503]),
        },
        "/policies/{name}/default-version": {
            "parameters": [name],
            "put": op("Set the default version", Some("DefaultVersion"), 200, Some(schema("Policy")), &[400, 404, 503]),
        },
        "/policies/{name}/targets/{certificate_id}": {
            "parameters": [name, cert],
            "put": op("Attach a policy to a certificate", None, 204, None, &[404, 503]),
            "delete": op("Detach a policy from a certificate", None, 204, None, &[404, 503]),
        },
        "/cas": {
            "post": op("Register a CA certificate (bring your own PKI)", Some("NewCa"), 201, Some(schema("Ca")), &[400, 409, 503]),
            "get": op("List CAs, the fleetcore CA first", None, 200, Some(list_of("cas", "Ca")), &[]),
        },
        "/tokens": {
            "post": op("Issue a short-lived signed token for a thing, standing for one of its ACTIVE certificates (the MQTT password, user name = thing name)", Some("NewToken"), 201, Some(schema("IssuedToken")), &[400, 404, 409, 503]),
        },
        "/tokens/keys": {
            "get": op("The token signing keys, oldest first (public parts only): the signing one, and retired ones that still verify", None, 200, Some(list_of("keys", "TokenKey")), &[]),
        },
        "/tokens/keys/rotate": {
            "post": op("Make a new signing key now; tokens signed by the previous one stay valid until they expire", None, 201, Some(schema("TokenKey")), &[503]),
        },
        "/crl": {
            "get": {
                "summary": "The CA's certificate revocation list: DER, or PEM with ?format=pem",
                "parameters": [{"name": "format", "in": "query", "required": false, "schema": {"type": "string", "enum": ["der", "pem"]}}],
                "responses": {
                    "200": {"description": "the CRL", "content": {
                        "application/pkix-crl": {"schema": {"type": "string", "contentEncoding": "binary"}},
                        "application/x-pem-file": {"schema": {"type": "string"}}}},
                    "400": error_responses(&[400])["400"],
                    "401": error_responses(&[401])["401"],
                }
            }
        },
        "/retainedMessage": {
            "get": {
                "summary": "ListRetainedMessages (as IoT Core): retained topics in topic order, a page at a time, without payloads",
                "parameters": [
                    {"name": "maxResults", "in": "query", "required": false, "description": "topics per page",
                     "schema": {"type": "integer", "minimum": 1, "maximum": crate::retained::MAX_MAX_RESULTS, "default": crate::retained::DEFAULT_MAX_RESULTS}},
                    {"name": "nextToken", "in": "query", "required": false, "description": "the nextToken of the previous page, as it came",
                     "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "success", "content": {"application/json": {"schema": schema("RetainedTopics")}}},
                    "400": {"description": "InvalidRequest: maxResults not a whole number from 1 to 200, or a nextToken this API did not return", "content": {"application/json": {"schema": schema("Error")}}},
                    "401": error_responses(&[401])["401"],
                }
            }
        },
        "/retainedMessage/{topic}": {
            "parameters": [path_param("topic", "the topic; URL-encoded, its slashes either as %2F or as they are (retainedMessage/acct/dev1/config)")],
            "get": op("GetRetainedMessage (as IoT Core): the retained message of a topic", None, 200, Some(schema("RetainedMessage")), &[400, 404]),
            "delete": op("fleetcore extension: delete the retained message of a topic, as MQTT does (a zero-byte retained publish, delivered to subscribers too); answered once the removal is on disk", None, 200, Some(schema("RetainedDeleted")), &[400, 404, 503]),
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format); no token needed",
                "description": "Served without authentication, for Prometheus. Reveals counters and gauges only (connections, sessions, retained messages, messages and bytes in and out, refusals), no names, certificates, policies or payloads.",
                "security": [],
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                }
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness, open connections and sessions; no token needed",
                "description": "Served without authentication, for load balancer health checks. Reveals the number of open connections and of sessions.",
                "security": [],
                "responses": {
                    "200": {"description": "success", "content": {"application/json": {"schema": schema("Health")}}},
                }
            }
        },
        "/openapi.json": {
            "get": op("This description", None, 200, Some(json!({"type": "object"})), &[]),
        },
    });

    let str_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let string_list = json!({"type": "array", "items": {"type": "string"}});
    let state =
        json!({"type": "string", "enum": ["ACTIVE", "INACTIVE", "REVOKED", "PENDING_ACTIVATION"]});
    let document = json!({"description": "an IoT Core policy document, as JSON or as its text", "oneOf": [{"type": "object"}, {"type": "string"}]});
    let certificate_props = json!({
        "id": {"type": "string"}, "subject": {"type": "string"}, "subject_cn": {"type": ["string", "null"]},
        "issuer": {"type": "string"}, "serial": {"type": "string", "description": "lower-case hex"},
        "state": state, "not_after_ms": {"type": "integer"}, "created_ms": {"type": "integer"},
        "updated_ms": {"type": "integer"}, "revoked_ms": {"type": "integer"},
    });
    let mut detail_props = certificate_props.clone();
    detail_props["pem"] = json!({"type": "string"});
    detail_props["policies"] = string_list.clone();
    detail_props["things"] = string_list.clone();
    let thing_props = json!({
        "name": {"type": "string"}, "type": {"type": "string"}, "attributes": str_map,
        "version": {"type": "integer"}, "created_ms": {"type": "integer"},
    });
    let mut thing_detail_props = thing_props.clone();
    thing_detail_props["principals"] = string_list.clone();
    let issue_props = json!({
        "policies": string_list, "state": state,
        "days": {"type": "integer", "minimum": 1, "default": crate::api::DEFAULT_DAYS},
    });
    let with = |base: &Value, extra: Value| {
        let mut v = base.clone();
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    };
    let schemas = json!({
        "Error": (json!({"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "enum": ["InvalidRequest", "Unauthorized", "NotFound", "Conflict", "StoreUnavailable", "MethodNotAllowed"]},
                "message": {"type": "string"}}}}})),
        "Thing": {"type": "object", "required": ["name", "attributes", "version", "created_ms"], "properties": thing_props},
        "ThingDetail": {"type": "object", "required": ["name", "attributes", "version", "created_ms", "principals"], "properties": thing_detail_props},
        "NewThing": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "pattern": "^[a-zA-Z0-9:_-]{1,128}$"}, "type": {"type": "string"}, "attributes": str_map}},
        "ThingUpdate": {"type": "object", "additionalProperties": false, "properties": {
            "type": {"type": "string", "description": "\"\" removes the type"}, "attributes": str_map,
            "merge": {"type": "boolean", "default": false, "description": "true: merge into the attributes, an attribute set to \"\" is removed; false: replace them"}}},
        "Certificate": {"type": "object", "required": ["id", "subject", "issuer", "serial", "state", "not_after_ms", "created_ms", "updated_ms"], "properties": certificate_props},
        "CertificateDetail": {"type": "object", "required": ["id", "pem", "policies", "things"], "properties": detail_props},
        "FromCsr": {"type": "object", "required": ["csr_pem"], "additionalProperties": false, "properties": with(&issue_props, json!({
            "csr_pem": {"type": "string"}, "thing": {"type": "string"}}))},
        "CreateCertificate": {"type": "object", "required": ["thing"], "additionalProperties": false, "properties": with(&issue_props, json!({
            "thing": {"type": "string"}}))},
        "RegisterCertificate": {"type": "object", "required": ["certificate_pem"], "additionalProperties": false, "properties": {
            "certificate_pem": {"type": "string"}, "state": state, "thing": {"type": "string"}, "policies": string_list}},
        "IssuedCertificate": {"type": "object", "required": ["certificate_id", "certificate_pem", "ca_pem"], "properties": {
            "certificate_id": {"type": "string"}, "certificate_pem": {"type": "string"}, "ca_pem": {"type": "string"}}},
        "CreatedCertificate": {"type": "object", "required": ["certificate_id", "certificate_pem", "private_key_pem", "ca_pem"], "properties": {
            "certificate_id": {"type": "string"}, "certificate_pem": {"type": "string"},
            "private_key_pem": {"type": "string"}, "ca_pem": {"type": "string"}}},
        "StateChange": {"type": "object", "required": ["state"], "additionalProperties": false, "properties": {"state": state}},
        "Policy": {"type": "object", "required": ["name", "default_version", "versions", "created_ms"], "properties": {
            "name": {"type": "string"}, "default_version": {"type": "integer"}, "created_ms": {"type": "integer"},
            "versions": {"type": "object", "description": "by version number", "additionalProperties": {
                "type": "object", "properties": {"document": {"type": "string", "description": "the document's JSON text"}, "created_ms": {"type": "integer"}}}}}},
        "NewPolicy": {"type": "object", "required": ["name", "document"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "pattern": "^[a-zA-Z0-9+=,.@_-]{1,128}$"}, "document": document}},
        "NewPolicyVersion": {"type": "object", "required": ["document"], "additionalProperties": false, "properties": {
            "document": document, "set_as_default": {"type": "boolean", "default": false}}},
        "DefaultVersion": {"type": "object", "required": ["version"], "additionalProperties": false, "properties": {"version": {"type": "integer", "minimum": 1}}},
        "NewCa": {"type": "object", "required": ["certificate_pem"], "additionalProperties": false, "properties": {"certificate_pem": {"type": "string"}}},
        "Ca": {"type": "object", "required": ["id", "subject", "created_ms"], "properties": {
            "id": {"type": "string"}, "subject": {"type": "string"}, "created_ms": {"type": "integer"},
            "source": {"type": "string", "enum": ["fleetcore", "registered"]}}},
        "NewToken": {"type": "object", "required": ["thing"], "additionalProperties": false, "properties": {
            "thing": {"type": "string"},
            "ttl": {"description": "lifetime: a whole number followed by s, m, h or d (\"90s\", \"30m\", \"1h\", \"2d\"), or a number of seconds; default [tokens] default_ttl_secs, at most max_ttl_secs", "oneOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]},
            "ttl_secs": {"type": "integer", "minimum": 1, "description": "lifetime in seconds (instead of ttl)"},
            "certificate_id": {"type": "string", "description": "an ACTIVE certificate attached to the thing; default: its most recently created one"}}},
        "IssuedToken": {"type": "object", "required": ["token", "thing", "certificate_id", "key_id", "issued_at", "expires_at", "issued_at_ms", "expires_at_ms"], "properties": {
            "token": {"type": "string", "description": "fct1.<claims>.<signature>"}, "thing": {"type": "string"},
            "certificate_id": {"type": "string"}, "key_id": {"type": "string"},
            "issued_at": {"type": "string", "format": "date-time"}, "expires_at": {"type": "string", "format": "date-time"},
            "issued_at_ms": {"type": "integer"}, "expires_at_ms": {"type": "integer"}}},
        "TokenKey": {"type": "object", "required": ["key_id", "created", "created_ms", "signing", "public_key"], "properties": {
            "key_id": {"type": "string"}, "created": {"type": "string", "format": "date-time"}, "created_ms": {"type": "integer"},
            "signing": {"type": "boolean", "description": "true for the key new tokens are signed with"},
            "verify_until": {"type": "string", "format": "date-time", "description": "retired keys: tokens they signed are accepted until then"},
            "verify_until_ms": {"type": "integer"},
            "public_key": {"type": "string", "description": "Ed25519 public key, base64url without padding"}}},
        "RetainedTopics": {"type": "object", "required": ["retainedTopics"], "properties": {
            "retainedTopics": {"type": "array", "items": {"type": "object", "required": ["topic", "payloadSize", "qos", "lastModifiedTime"], "properties": {
                "topic": {"type": "string"}, "payloadSize": {"type": "integer", "description": "bytes"},
                "qos": {"type": "integer", "minimum": 0, "maximum": 2},
                "lastModifiedTime": {"type": "integer", "description": "when the message was retained, unix milliseconds"}}}},
            "nextToken": {"type": "string", "description": "absent on the last page"}}},
        "RetainedMessage": {"type": "object", "required": ["topic", "payload", "qos", "lastModifiedTime"], "properties": {
            "topic": {"type": "string"},
            "payload": {"type": "string", "contentEncoding": "base64"},
            "qos": {"type": "integer", "minimum": 0, "maximum": 2},
            "lastModifiedTime": {"type": "integer", "description": "when the message was retained, unix milliseconds"},
            "userProperties": {"type": "string", "contentEncoding": "base64", "description": "base64 of a JSON array of one-key objects, [{\"name\":\"value\"}, ...], in the publisher's order; absent without user properties"}}},
        "RetainedDeleted": {"type": "object", "required": ["topic", "deleted"], "properties": {
            "topic": {"type": "string"}, "deleted": {"type": "boolean", "const": true}}},
        "Health": {"type": "object", "required": ["status", "connections", "sessions"], "properties": {
            "status": {"type": "string", "const": "ok"}, "connections": {"type": "integer"}, "sessions": {"type": "integer"}}},
    });

    let (mut paths, mut schemas) = (paths, schemas);
    for more in [
        crate::shadow::openapi_paths(),
        crate::jobs::openapi_paths(),
        crate::provisioning::openapi_paths(),
    ] {
        if let (Some(p), Value::Object(more)) = (paths.as_object_mut(), more) {
            p.extend(more);
        }
    }
    if let (Some(s), Value::Object(more)) =
        (schemas.as_object_mut(), crate::shadow::openapi_schemas())
    {
        s.extend(more);
    }
    // Thing groups.
    if let (Some(p), Value::Object(more)) = (paths.as_object_mut(), crate::groups::openapi_paths())
    {
        p.extend(more);
    }
    if let (Some(s), Value::Object(more)) =
        (schemas.as_object_mut(), crate::groups::openapi_schemas())
    {
        s.extend(more);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fleetcore admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Things, certificates, policies, CAs, the CRL and metrics of a fleetcore broker. The token is in <data_dir>/admin.token.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "64 hex characters from <data_dir>/admin.token"}},
            "schemas": schemas,
        },
    })
}
