//! Shadow documents as pure functions: request validation, the merge of an update,
//! the delta, versions, and the JSON of every answer. No I/O, no clock (the caller
//! passes `now` in epoch seconds), so each rule is a unit test.
//!
//! The rules are IoT Core's (`docs/shadows.md` lists them with their sources); where
//! IoT Core's behaviour is not documented, Greengrass's shadow manager (AWS's own local
//! shadow service) is followed, and the choice is written next to the code.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Limits on documents and names; IoT Core's values are the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of `desired` + `reported` (serialized JSON, metadata not counted).
    pub max_state_bytes: usize,
    /// Levels of objects under `desired` / `reported` (the first key is level 1).
    pub max_depth: usize,
    pub max_thing_name: usize,
    pub max_shadow_name: usize,
    /// Requests of one connection waiting for their answer; one more gets 429.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_thing_name: 128,
            max_shadow_name: 64,
            max_in_flight: 10,
        }
    }
}

/// The longest `clientToken` accepted (IoT Core: 64 bytes).
pub const MAX_CLIENT_TOKEN: usize = 64;

/// A deleted shadow's version is continued by a new shadow of the same name within
/// this many seconds (IoT Core: 48 hours); after it, numbering starts again.
pub const VERSION_MEMORY_SECS: u64 = 48 * 3600;

/// An error answer: IoT Core's HTTP-style `code` and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowError {
    pub code: u16,
    pub message: String,
}

impl ShadowError {
    pub fn new(code: u16, message: impl Into<String>) -> ShadowError {
        ShadowError {
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ShadowError {
        ShadowError::new(400, message)
    }

    /// 404 for a shadow that does not exist (classic: named by its thing).
    pub fn not_found(thing: &str, shadow: Option<&str>) -> ShadowError {
        ShadowError::new(
            404,
            format!("No shadow exists with name: '{}'", shadow.unwrap_or(thing)),
        )
    }

    pub fn version_conflict() -> ShadowError {
        ShadowError::new(409, "Version conflict")
    }

    pub fn too_many_requests() -> ShadowError {
        ShadowError::new(429, "Too Many Requests")
    }

    pub fn internal() -> ShadowError {
        ShadowError::new(500, "Internal service failure")
    }

    /// The body of `/rejected` answers (and of HTTP errors): `code`, `message`,
    /// `timestamp` and the request's `clientToken` when it had a valid one.
    pub fn to_json(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut m = Map::new();
        m.insert("code".into(), json!(self.code));
        m.insert("message".into(), json!(self.message));
        m.insert("timestamp".into(), json!(now));
        if let Some(t) = client_token {
            m.insert("clientToken".into(), json!(t));
        }
        Value::Object(m)
    }
}

impl std::fmt::Display for ShadowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

/// One shadow as kept in memory and on disk. An empty section is an absent one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    #[serde(default)]
    pub desired: Map<String, Value>,
    #[serde(default)]
    pub reported: Map<String, Value>,
    /// Mirrors `desired`: `{"timestamp": T}` at every leaf, an object for every object.
    #[serde(default)]
    pub meta_desired: Map<String, Value>,
    #[serde(default)]
    pub meta_reported: Map<String, Value>,
    /// The last accepted version; kept after a delete.
    pub version: u64,
    /// When the shadow was deleted (epoch seconds); `None` while it exists.
    #[serde(default)]
    pub deleted_at: Option<u64>,
}

impl Shadow {
    /// Whether the shadow exists (was created and not deleted since).
    pub fn exists(&self) -> bool {
        self.deleted_at.is_none()
    }

    /// The version an update's `version` is compared with: the current one, or a
    /// deleted shadow's while it is remembered, else 0.
    pub fn current_version(&self, now: u64) -> u64 {
        match self.deleted_at {
            None => self.version,
            Some(at) if now.saturating_sub(at) < VERSION_MEMORY_SECS => self.version,
            Some(_) => 0,
        }
    }

    /// Bytes of state as the size limit counts them.
    pub fn state_bytes(&self) -> usize {
        section_bytes(&self.desired) + section_bytes(&self.reported)
    }

    /// The delta: what `desired` wants that `reported` does not say.
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired, &self.reported)
    }

    /// The `get/accepted` body (and the HTTP GetThingShadow body).
    pub fn get_answer(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut state = Map::new();
        let mut metadata = Map::new();
        if !self.desired.is_empty() {
            state.insert("desired".into(), Value::Object(self.desired.clone()));
            metadata.insert("desired".into(), Value::Object(self.meta_desired.clone()));
        }
        if !self.reported.is_empty() {
            state.insert("reported".into(), Value::Object(self.reported.clone()));
            metadata.insert("reported".into(), Value::Object(self.meta_reported.clone()));
        }
        let delta = self.delta();
        if !delta.is_empty() {
            state.insert("delta".into(), Value::Object(delta));
        }
        let mut m = Map::new();
        m.insert("state".into(), Value::Object(state));
        m.insert("metadata".into(), Value::Object(metadata));
        m.insert("version".into(), json!(self.version));
        m.insert("timestamp".into(), json!(now));
        with_token(m, client_token)
    }

    /// A snapshot for `update/documents`: state and metadata without delta.
    fn snapshot(&self) -> Value {
        let mut state = Map::new();
        let mut metadata = Map::new();
        if !self.desired.is_empty() {
            state.insert("desired".into(), Value::Object(self.desired.clone()));
            metadata.insert("desired".into(), Value::Object(self.meta_desired.clone()));
        }
        if !self.reported.is_empty() {
            state.insert("reported".into(), Value::Object(self.reported.clone()));
            metadata.insert("reported".into(), Value::Object(self.meta_reported.clone()));
        }
        json!({"state": state, "metadata": metadata, "version": self.version})
    }
}

fn section_bytes(m: &Map<String, Value>) -> usize {
    if m.is_empty() {
        0
    } else {
        serde_json::to_vec(m).map_or(usize::MAX, |v| v.len())
    }
}

fn with_token(mut m: Map<String, Value>, client_token: Option<&str>) -> Value {
    if let Some(t) = client_token {
        m.insert("clientToken".into(), json!(t));
    }
    Value::Object(m)
}

/// What an update does to one of `desired` / `reported`.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionPatch {
    /// Not in the request: unchanged.
    Keep,
    /// `null`: the whole section goes.
    Clear,
    /// An object merged into the section (`{}` changes nothing).
    Merge(Map<String, Value>),
}

/// A validated `update` request.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub client_token: Option<String>,
    /// The version the client expects the shadow to have (optimistic locking).
    pub version: Option<u64>,
    /// `"state": null`: clears both sections (the shadow stays, its version grows).
    pub clear_all: bool,
    pub desired: SectionPatch,
    pub reported: SectionPatch,
    /// The request's `state` node as sent, echoed in `update/accepted`.
    pub state: Value,
}

/// Reads the `clientToken` of a `get` or `delete` request, whose body IoT Core
/// otherwise ignores: an empty or non-JSON body has none; a token that is not a string
/// of at most 64 bytes is refused.
pub fn request_token(payload: &[u8]) -> Result<Option<String>, ShadowError> {
    if payload.is_empty() {
        return Ok(None);
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else {
        return Ok(None);
    };
    token_of(&m)
}

fn token_of(m: &Map<String, Value>) -> Result<Option<String>, ShadowError> {
    match m.get("clientToken") {
        None => Ok(None),
        Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN => Ok(Some(t.clone())),
        Some(_) => Err(ShadowError::bad("Invalid clientToken")),
    }
}

/// Validates an `update` body. On error, also returns the request's `clientToken` if it
/// could be read, so the rejection can echo it (the SDK v2 client matches on it).
pub fn parse_update(
    payload: &[u8],
    limits: &Limits,
) -> Result<UpdateRequest, (ShadowError, Option<String>)> {
    let text = std::str::from_utf8(payload).map_err(|_| {
        (
            ShadowError::new(
                415,
                "Unsupported documented encoding; supported encoding is UTF-8",
            ),
            None,
        )
    })?;
    if text.trim().is_empty() {
        // IoT Core's wording is not documented; Greengrass's.
        return Err((ShadowError::bad("Missing update payload"), None));
    }
    let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(text) else {
        return Err((ShadowError::bad("Invalid JSON"), None));
    };
    let client_token = token_of(&body).map_err(|e| (e, None))?;
    let fail = |e: ShadowError| (e, client_token.clone());
    let version = match body.get("version") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| fail(ShadowError::bad("Invalid version")))?,
        ),
    };
    let state = body
        .remove("state")
        .ok_or_else(|| fail(ShadowError::bad("Missing required node: state")))?;
    let (clear_all, desired, reported) = match &state {
        Value::Null => (true, SectionPatch::Keep, SectionPatch::Keep),
        Value::Object(s) => {
            if let Some(k) = s.keys().find(|k| *k != "desired" && *k != "reported") {
                return Err(fail(ShadowError::bad(format!(
                    "State contains an invalid node: '{k}'"
                ))));
            }
            let section = |name: &str, what: &str| -> Result<SectionPatch, ShadowError> {
                match s.get(name) {
                    None => Ok(SectionPatch::Keep),
                    Some(Value::Null) => Ok(SectionPatch::Clear),
                    Some(Value::Object(m)) => {
                        if object_depth(m) > limits.max_depth {
                            return Err(ShadowError::bad(format!(
                                "JSON contains too many levels of nesting; maximum is {}",
                                limits.max_depth
                            )));
                        }
                        if m.values().any(array_holds_null) {
                            return Err(ShadowError::bad(
                                "Invalid JSON: an array in a shadow may not contain null",
                            ));
                        }
                        Ok(SectionPatch::Merge(m.clone()))
                    }
                    Some(_) => Err(ShadowError::bad(format!("{what} node must be an object"))),
                }
            };
            let desired = section("desired", "Desired").map_err(fail)?;
            let reported = section("reported", "Reported").map_err(fail)?;
            (false, desired, reported)
        }
        _ => return Err(fail(ShadowError::bad("State node must be an object"))),
    };
    Ok(UpdateRequest {
        client_token,
        version,
        clear_all,
        desired,
        reported,
        state,
    })
}

/// Levels of objects in `m` (itself level 1); arrays add no level.
pub fn object_depth(m: &Map<String, Value>) -> usize {
    1 + m.values().map(value_depth).max().unwrap_or(0)
}

fn value_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => object_depth(m),
        Value::Array(a) => a.iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `v` holds an array with a `null` anywhere inside it.
fn array_holds_null(v: &Value) -> bool {
    fn any_null(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Array(a) => a.iter().any(any_null),
            Value::Object(m) => m.values().any(any_null),
            _ => false,
        }
    }
    match v {
        Value::Array(a) => a.iter().any(any_null),
        Value::Object(m) => m.values().any(array_holds_null),
        _ => false,
    }
}

/// Merges `patch` into one section and its metadata: `null` deletes a key, objects
/// merge recursively, anything else (arrays included) replaces the value and gets the
/// timestamp `now`. Nulls inside an object that is new are dropped.
pub fn merge(
    state: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: u64,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                state.remove(k);
                meta.remove(k);
            }
            Value::Object(p) => {
                if let Some(Value::Object(s)) = state.get_mut(k) {
                    if !matches!(meta.get(k), Some(Value::Object(_))) {
                        meta.insert(k.clone(), Value::Object(Map::new()));
                    }
                    let Some(Value::Object(m)) = meta.get_mut(k) else {
                        unreachable!("inserted above")
                    };
                    merge(s, m, p, now);
                } else {
                    let mut s = Map::new();
                    let mut m = Map::new();
                    merge(&mut s, &mut m, p, now);
                    state.insert(k.clone(), Value::Object(s));
                    meta.insert(k.clone(), Value::Object(m));
                }
            }
            _ => {
                state.insert(k.clone(), v.clone());
                meta.insert(k.clone(), json!({ "timestamp": now }));
            }
        }
    }
}

/// The desired values that `reported` does not match: keys missing from reported or
/// different there, nested down to the differing leaf; arrays compare whole; numbers
/// compare by value (1 equals 1.0). Reported-only keys never appear.
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, d) in desired {
        match (d, reported.get(k)) {
            (Value::Object(dm), Some(Value::Object(rm))) => {
                let sub = delta(dm, rm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Value::Object(sub));
                }
            }
            (_, Some(r)) if same(d, r) => {}
            _ => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

/// JSON equality with numbers compared by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| same(a, b)))
        }
        _ => a == b,
    }
}

/// The metadata of the keys in `shape`, taken from `meta`.
fn meta_for(meta: &Map<String, Value>, shape: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in shape {
        match (v, meta.get(k)) {
            (Value::Object(sub), Some(Value::Object(m))) if !is_leaf_meta(m) => {
                out.insert(k.clone(), Value::Object(meta_for(m, sub)));
            }
            (_, Some(m)) => {
                out.insert(k.clone(), m.clone());
            }
            (_, None) => {}
        }
    }
    out
}

fn is_leaf_meta(m: &Map<String, Value>) -> bool {
    m.len() == 1 && m.get("timestamp").is_some_and(Value::is_u64)
}

/// The metadata `update/accepted` shows for a request section as sent: a timestamp at
/// every leaf (deleted keys included), objects mirrored.
fn request_meta(v: &Value, now: u64) -> Value {
    match v {
        Value::Object(m) if !m.is_empty() => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), request_meta(v, now)))
                .collect(),
        ),
        _ => json!({ "timestamp": now }),
    }
}

/// What an accepted update produced: the new shadow and the bodies to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated {
    pub shadow: Shadow,
    /// `update/accepted`.
    pub accepted: Value,
    /// `update/delta`, when desired and reported differ after the update.
    pub delta: Option<Value>,
    /// `update/documents`.
    pub documents: Value,
}

/// Applies a validated update to the shadow as it is (`None`: never existed) at `now`.
pub fn apply_update(
    current: Option<&Shadow>,
    req: &UpdateRequest,
    limits: &Limits,
    now: u64,
) -> Result<Updated, ShadowError> {
    let base_version = current.map_or(0, |s| s.current_version(now));
    if let Some(v) = req.version {
        if v != base_version {
            return Err(ShadowError::version_conflict());
        }
    }
    let previous = current.filter(|s| s.exists());
    let mut next = previous.cloned().unwrap_or_default();
    next.deleted_at = None;
    next.version = base_version + 1;
    if req.clear_all {
        next.desired.clear();
        next.reported.clear();
        next.meta_desired.clear();
        next.meta_reported.clear();
    }
    for (patch, state, meta) in [
        (&req.desired, &mut next.desired, &mut next.meta_desired),
        (&req.reported, &mut next.reported, &mut next.meta_reported),
    ] {
        match patch {
            SectionPatch::Keep => {}
            SectionPatch::Clear => {
                state.clear();
                meta.clear();
            }
            SectionPatch::Merge(p) => merge(state, meta, p, now),
        }
    }
    if next.state_bytes() > limits.max_state_bytes {
        return Err(ShadowError::new(
            413,
            "The payload exceeds the maximum size allowed",
        ));
    }
    let token = req.client_token.as_deref();
    let accepted = if req.clear_all {
        let mut m = Map::new();
        m.insert("state".into(), Value::Null);
        m.insert("metadata".into(), json!({ "timestamp": now }));
        m.insert("version".into(), json!(next.version));
        m.insert("timestamp".into(), json!(now));
        with_token(m, token)
    } else {
        let mut metadata = Map::new();
        if let Value::Object(s) = &req.state {
            for (k, v) in s {
                metadata.insert(k.clone(), request_meta(v, now));
            }
        }
        let mut m = Map::new();
        m.insert("state".into(), req.state.clone());
        m.insert("metadata".into(), Value::Object(metadata));
        m.insert("version".into(), json!(next.version));
        m.insert("timestamp".into(), json!(now));
        with_token(m, token)
    };
    let d = next.delta();
    let delta = (!d.is_empty()).then(|| {
        let mut m = Map::new();
        m.insert(
            "metadata".into(),
            Value::Object(meta_for(&next.meta_desired, &d)),
        );
        m.insert("state".into(), Value::Object(d));
        m.insert("version".into(), json!(next.version));
        m.insert("timestamp".into(), json!(now));
        with_token(m, token)
    });
    let mut docs = Map::new();
    if let Some(p) = previous {
        docs.insert("previous".into(), p.snapshot());
    }
    docs.insert("current".into(), next.snapshot());
    docs.insert("timestamp".into(), json!(now));
    let documents = with_token(docs, token);
    Ok(Updated {
        shadow: next,
        accepted,
        delta,
        documents,
    })
}

/// Deletes an existing shadow: the tombstone that keeps its version, and the
/// `delete/accepted` body carrying that (unchanged) version.
pub fn apply_delete(
    current: Option<&Shadow>,
    client_token: Option<&str>,
    now: u64,
    not_found: impl FnOnce() -> ShadowError,
) -> Result<(Shadow, Value), ShadowError> {
    let Some(s) = current.filter(|s| s.exists()) else {
        return Err(not_found());
    };
    let tomb = Shadow {
        version: s.version,
        deleted_at: Some(now),
        ..Shadow::default()
    };
    let mut m = Map::new();
    m.insert("version".into(), json!(s.version));
    m.insert("timestamp".into(), json!(now));
    Ok((tomb, with_token(m, client_token)))
}

/// Whether `name` is a valid thing or shadow name: 1 to `max` bytes of
/// `[a-zA-Z0-9:_-]`.
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

#[cfg(test)]
mod tests;
