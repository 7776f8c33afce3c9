//! The Jobs control plane on the admin API, after IoT Core's (CreateJob, DescribeJob,
//! ListJobs, GetJobDocument, CancelJob, DeleteJob, DescribeJobExecution,
//! ListJobExecutionsForJob / ForThing, CancelJobExecution). Targets are things of the
//! registry, by name or thing ARN.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put, MethodRouter};
use axum::Json;
use fleetcore_services::jobs::machine::JobsError;
use fleetcore_services::jobs::store::{AbortCriteria, RetryCriteria};
use fleetcore_services::jobs::{JobsService, NewJob};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{ApiError, JsonBody, PathArgs, Shared};
use crate::models::{CancelJob, CreateJob};

pub fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    vec![
        ("/jobs", get(list_jobs)),
        (
            "/jobs/{job}",
            put(create_job).get(describe_job).delete(delete_job),
        ),
        ("/jobs/{job}/job-document", get(job_document)),
        ("/jobs/{job}/cancel", put(cancel_job)),
        ("/jobs/{job}/things", get(executions_for_job)),
        ("/things/{thing}/jobs", get(executions_for_thing)),
        ("/things/{thing}/jobs/{job}", get(describe_execution)),
        ("/things/{thing}/jobs/{job}/cancel", put(cancel_execution)),
    ]
}

fn err(e: JobsError) -> ApiError {
    let status = match e.code {
        "InvalidRequest" | "InvalidJson" => StatusCode::BAD_REQUEST,
        "ResourceNotFound" => StatusCode::NOT_FOUND,
        "ResourceAlreadyExists" | "InvalidStateTransition" | "VersionMismatch" => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.code, e.message)
}

fn service(st: &Shared) -> Result<&JobsService, ApiError> {
    st.jobs
        .as_deref()
        .ok_or_else(|| ApiError::not_found("the jobs service is disabled ([jobs] enabled = false)"))
}

fn answer(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A job target: a thing or a thing group.
enum Target {
    Thing(String),
    Group(String),
}

/// A target as given: a thing name, `arn:aws:iot:<region>:<account>:thing/NAME` or
/// `arn:aws:iot:<region>:<account>:thinggroup/NAME`.
fn target(t: &str) -> Result<Target, ApiError> {
    if let Some(rest) = t.strip_prefix("arn:") {
        let resource = rest.splitn(5, ':').nth(4).unwrap_or("");
        if let Some(name) = resource.strip_prefix("thing/") {
            return Ok(Target::Thing(name.to_string()));
        }
        if let Some(name) = resource.strip_prefix("thinggroup/") {
            return Ok(Target::Group(name.to_string()));
        }
        return Err(ApiError::invalid(format!(
            "target {t:?} is neither a thing nor a thing group ARN (arn:aws:iot:REGION:ACCOUNT:thing/NAME or .../thinggroup/NAME)"
        )));
    }
    Ok(Target::Thing(t.to_string()))
}

async fn create_job(
    State(st): State<Shared>,
    PathArgs(job): PathArgs<String>,
    JsonBody(req): JsonBody<CreateJob>,
) -> Response {
    let run = async {
        let jobs = service(&st)?;
        let continuous = match req.target_selection.as_deref() {
            None | Some("SNAPSHOT") => false,
            Some("CONTINUOUS") => true,
            Some(sel) => {
                return Err(ApiError::invalid(format!(
                    "targetSelection {sel:?}: SNAPSHOT or CONTINUOUS"
                )))
            }
        };
        let document = match req.document {
            Value::String(s) => serde_json::from_str::<Value>(&s)
                .map_err(|e| ApiError::invalid(format!("document is not JSON: {e}")))?,
            v @ Value::Object(_) => v,
            _ => {
                return Err(ApiError::invalid(
                    "document must be a JSON object or a string holding one",
                ))
            }
        };
        if !document.is_object() {
            return Err(ApiError::invalid("document must be a JSON object"));
        }
        let mut abort = Vec::new();
        for c in req
            .abort_config
            .map(|a| a.criteria_list)
            .unwrap_or_default()
        {
            if c.action != "CANCEL" {
                return Err(ApiError::invalid(format!(
                    "abortConfig action {:?}: only CANCEL exists",
                    c.action
                )));
            }
            abort.push(AbortCriteria {
                failure_type: c.failure_type,
                min_executed: c.min_number_of_executed_things,
                threshold_percent: c.threshold_percentage,
            });
        }
        let retry = req
            .job_executions_retry_config
            .map(|r| r.criteria_list)
            .unwrap_or_default()
            .into_iter()
            .map(|c| RetryCriteria {
                failure_type: c.failure_type,
                retries: c.number_of_retries,
            })
            .collect();
        let mut things = Vec::new();
        let mut groups = Vec::new();
        for t in &req.targets {
            match target(t)? {
                Target::Thing(name) => {
                    if st.hub.registry.thing(&name).is_none() {
                        return Err(ApiError::not_found(format!(
                            "target thing {name:?} not found"
                        )));
                    }
                    things.push(name);
                }
                Target::Group(name) => {
                    // The group and every group below it, as IoT Core runs a group job.
                    let members = st.hub.registry.group_things(&name, true).ok_or_else(|| {
                        ApiError::not_found(format!("target thing group {name:?} not found"))
                    })?;
                    things.extend(members);
                    groups.push(name);
                }
            }
        }
        if continuous && groups.is_empty() {
            return Err(ApiError::invalid(
                "a CONTINUOUS job needs a thing group among its targets",
            ));
        }
        jobs.create_job(NewJob {
            id: job,
            document,
            description: req.description,
            things,
            in_progress_timeout_minutes: req
                .timeout_config
                .and_then(|t| t.in_progress_timeout_in_minutes),
            max_per_minute: req
                .job_executions_rollout_config
                .and_then(|r| r.maximum_per_minute),
            abort,
            retry,
            groups,
            continuous,
        })
        .await
        .map_err(err)
    };
    match run.await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    status: Option<String>,
}

async fn list_jobs(
    State(st): State<Shared>,
    q: Result<Query<StatusQuery>, QueryRejection>,
) -> Response {
    answer((|| {
        let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
        Ok(service(&st)?.list_jobs(q.status.as_deref()))
    })())
}

async fn describe_job(State(st): State<Shared>, PathArgs(job): PathArgs<String>) -> Response {
    answer(service(&st).and_then(|s| s.describe_job(&job).map_err(err)))
}

async fn job_document(State(st): State<Shared>, PathArgs(job): PathArgs<String>) -> Response {
    answer(service(&st).and_then(|s| s.job_document(&job).map_err(err)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// A cancel body; an empty body is `{}`.
fn cancel_body(bytes: &[u8]) -> Result<CancelJob, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(CancelJob::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

async fn cancel_job(
    State(st): State<Shared>,
    PathArgs(job): PathArgs<String>,
    q: Result<Query<ForceQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let run = async {
        let s = service(&st)?;
        let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
        let c = cancel_body(&body)?;
        s.cancel_job(&job, c.force || q.force, c.comment, c.reason_code)
            .await
            .map_err(err)
    };
    answer(run.await)
}

async fn delete_job(
    State(st): State<Shared>,
    PathArgs(job): PathArgs<String>,
    q: Result<Query<ForceQuery>, QueryRejection>,
) -> Response {
    let run = async {
        let s = service(&st)?;
        let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
        s.delete_job(&job, q.force).await.map_err(err)
    };
    match run.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn executions_for_job(State(st): State<Shared>, PathArgs(job): PathArgs<String>) -> Response {
    answer(service(&st).and_then(|s| s.executions_for_job(&job).map_err(err)))
}

async fn executions_for_thing(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
) -> Response {
    answer(service(&st).map(|s| s.executions_for_thing(&thing)))
}

async fn describe_execution(
    State(st): State<Shared>,
    PathArgs((thing, job)): PathArgs<(String, String)>,
) -> Response {
    answer(service(&st).and_then(|s| s.describe_execution(&thing, &job).map_err(err)))
}

async fn cancel_execution(
    State(st): State<Shared>,
    PathArgs((thing, job)): PathArgs<(String, String)>,
    q: Result<Query<ForceQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let run = async {
        let s = service(&st)?;
        let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
        let c = cancel_body(&body)?;
        s.cancel_execution(&thing, &job, c.force || q.force)
            .await
            .map(|v| json!({ "execution": v }))
            .map_err(err)
    };
    answer(run.await)
}

/// The OpenAPI paths of these routes.
pub fn openapi_paths() -> Value {
    let job = json!({"name": "job", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}});
    let thing =
        json!({"name": "thing", "in": "path", "required": true, "schema": {"type": "string"}});
    let force = json!({"name": "force", "in": "query", "required": false, "schema": {"type": "boolean", "default": false}});
    let ok = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"type": "object"}}}});
    let e = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "/jobs": {"get": {"summary": "ListJobs (?status=IN_PROGRESS|COMPLETED|CANCELED)",
            "parameters": [{"name": "status", "in": "query", "required": false, "schema": {"type": "string"}}],
            "responses": {"200": ok("{jobs:[...]}"), "401": e("Unauthorized")}}},
        "/jobs/{job}": {
            "put": {"summary": "CreateJob: {targets:[thing names, thing ARNs or thinggroup ARNs (the group and its descendants)], document: object or JSON string (≤ 32 KB), description?, targetSelection?: SNAPSHOT|CONTINUOUS (a thing added to a target group later gets the job), timeoutConfig?: {inProgressTimeoutInMinutes}, jobExecutionsRolloutConfig?: {maximumPerMinute}, abortConfig?: {criteriaList:[{action: CANCEL, failureType: FAILED|REJECTED|TIMED_OUT|ALL, minNumberOfExecutedThings, thresholdPercentage}]}, jobExecutionsRetryConfig?: {criteriaList:[{failureType: FAILED|TIMED_OUT|ALL, numberOfRetries: 0-10}]}}",
                "parameters": [job.clone()],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {"201": ok("{jobId, description}"), "400": e("invalid"), "401": e("Unauthorized"), "404": e("a target thing does not exist"), "409": e("ResourceAlreadyExists")}},
            "get": {"summary": "DescribeJob, with jobProcessDetails (executions per state)", "parameters": [job.clone()],
                "responses": {"200": ok("{job}"), "401": e("Unauthorized"), "404": e("ResourceNotFound")}},
            "delete": {"summary": "DeleteJob and its executions; force when executions are in progress", "parameters": [job.clone(), force.clone()],
                "responses": {"204": {"description": "deleted"}, "401": e("Unauthorized"), "404": e("ResourceNotFound"), "409": e("InvalidStateTransition")}},
        },
        "/jobs/{job}/job-document": {"get": {"summary": "GetJobDocument", "parameters": [job.clone()],
            "responses": {"200": ok("{document: string}"), "401": e("Unauthorized"), "404": e("ResourceNotFound")}}},
        "/jobs/{job}/cancel": {"put": {"summary": "CancelJob {force?, comment?, reasonCode?}: QUEUED executions become CANCELED, IN_PROGRESS ones too with force",
            "parameters": [job.clone(), force.clone()],
            "responses": {"200": ok("{jobId}"), "401": e("Unauthorized"), "404": e("ResourceNotFound"), "409": e("InvalidStateTransition")}}},
        "/jobs/{job}/things": {"get": {"summary": "ListJobExecutionsForJob", "parameters": [job.clone()],
            "responses": {"200": ok("{executionSummaries:[...]}"), "401": e("Unauthorized"), "404": e("ResourceNotFound")}}},
        "/things/{thing}/jobs": {"get": {"summary": "ListJobExecutionsForThing", "parameters": [thing.clone()],
            "responses": {"200": ok("{executionSummaries:[...]}"), "401": e("Unauthorized")}}},
        "/things/{thing}/jobs/{job}": {"get": {"summary": "DescribeJobExecution", "parameters": [thing.clone(), job.clone()],
            "responses": {"200": ok("{execution}"), "401": e("Unauthorized"), "404": e("ResourceNotFound")}}},
        "/things/{thing}/jobs/{job}/cancel": {"put": {"summary": "CancelJobExecution {force?}", "parameters": [thing, job, force],
            "responses": {"200": ok("{execution}"), "401": e("Unauthorized"), "404": e("ResourceNotFound"), "409": e("InvalidStateTransition")}}},
    })
}
