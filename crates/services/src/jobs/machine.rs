//! Jobs as pure functions: execution states and transitions, the `$next` order, and the
//! JSON of every device answer and notification (IoT Core's jobs MQTT API). No I/O and
//! no clock: `now` is epoch seconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// An execution's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Removed,
    Canceled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Queued,
        Status::InProgress,
        Status::Succeeded,
        Status::Failed,
        Status::TimedOut,
        Status::Rejected,
        Status::Removed,
        Status::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "QUEUED",
            Status::InProgress => "IN_PROGRESS",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::TimedOut => "TIMED_OUT",
            Status::Rejected => "REJECTED",
            Status::Removed => "REMOVED",
            Status::Canceled => "CANCELED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Queued | Status::InProgress)
    }

    pub fn index(self) -> usize {
        Status::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// One thing's execution of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub job_id: String,
    pub thing: String,
    pub status: Status,
    #[serde(default)]
    pub status_details: BTreeMap<String, String>,
    pub queued_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
    pub last_updated_at: u64,
    pub version: u64,
    pub execution_number: u64,
    /// Queue order among a thing's executions (creation order).
    pub seq: u64,
    /// When the step timer (stepTimeoutInMinutes) runs out, epoch seconds.
    #[serde(default)]
    pub step_deadline: Option<u64>,
    /// When the job's in-progress timer runs out, fixed when the execution started.
    #[serde(default)]
    pub in_progress_deadline: Option<u64>,
    #[serde(default)]
    pub force_canceled: bool,
    /// Retries so far after FAILED and after TIMED_OUT.
    #[serde(default)]
    pub retries_failed: u32,
    #[serde(default)]
    pub retries_timed_out: u32,
}

impl Execution {
    pub fn new(job_id: &str, thing: &str, seq: u64, now: u64) -> Execution {
        Execution {
            job_id: job_id.to_string(),
            thing: thing.to_string(),
            status: Status::Queued,
            status_details: BTreeMap::new(),
            queued_at: now,
            started_at: None,
            last_updated_at: now,
            version: 1,
            execution_number: 1,
            seq,
            step_deadline: None,
            in_progress_deadline: None,
            force_canceled: false,
            retries_failed: 0,
            retries_timed_out: 0,
        }
    }

    /// The next attempt of an execution that ended FAILED or TIMED_OUT: a new execution
    /// number, QUEUED again at version 1, if `allowed` retries of its kind remain.
    pub fn retry(
        &self,
        allowed_failed: u32,
        allowed_timed_out: u32,
        seq: u64,
        now: u64,
    ) -> Option<Execution> {
        let (used, allowed) = match self.status {
            Status::Failed => (self.retries_failed, allowed_failed),
            Status::TimedOut => (self.retries_timed_out, allowed_timed_out),
            _ => return None,
        };
        if used >= allowed {
            return None;
        }
        let mut next = Execution::new(&self.job_id, &self.thing, seq, now);
        next.execution_number = self.execution_number + 1;
        next.retries_failed = self.retries_failed + u32::from(self.status == Status::Failed);
        next.retries_timed_out =
            self.retries_timed_out + u32::from(self.status == Status::TimedOut);
        Some(next)
    }

    /// The earliest timer that would end this execution, if it is in progress.
    pub fn deadline(&self) -> Option<u64> {
        if self.status != Status::InProgress {
            return None;
        }
        match (self.step_deadline, self.in_progress_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// JobExecution as the MQTT API shows it (`jobDocument` as an object).
    pub fn to_json(&self, document: Option<&Value>) -> Value {
        let mut m = Map::new();
        m.insert("jobId".into(), json!(self.job_id));
        m.insert("thingName".into(), json!(self.thing));
        if let Some(d) = document {
            m.insert("jobDocument".into(), d.clone());
        }
        m.insert("status".into(), json!(self.status.as_str()));
        if !self.status_details.is_empty() {
            m.insert("statusDetails".into(), json!(self.status_details));
        }
        m.insert("queuedAt".into(), json!(self.queued_at));
        if let Some(s) = self.started_at {
            m.insert("startedAt".into(), json!(s));
        }
        m.insert("lastUpdatedAt".into(), json!(self.last_updated_at));
        m.insert("versionNumber".into(), json!(self.version));
        m.insert("executionNumber".into(), json!(self.execution_number));
        Value::Object(m)
    }

    /// JobExecutionSummary.
    pub fn summary(&self) -> Value {
        let mut m = Map::new();
        m.insert("jobId".into(), json!(self.job_id));
        m.insert("queuedAt".into(), json!(self.queued_at));
        if let Some(s) = self.started_at {
            m.insert("startedAt".into(), json!(s));
        }
        m.insert("lastUpdatedAt".into(), json!(self.last_updated_at));
        m.insert("versionNumber".into(), json!(self.version));
        m.insert("executionNumber".into(), json!(self.execution_number));
        Value::Object(m)
    }

    /// JobExecutionState.
    pub fn state(&self) -> Value {
        json!({"status": self.status.as_str(), "statusDetails": self.status_details,
               "versionNumber": self.version})
    }
}

/// A rejection: IoT Core's string `code`, a message, and the execution's state for
/// `InvalidStateTransition` and `VersionMismatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsError {
    pub code: &'static str,
    pub message: String,
    pub execution_state: Option<Value>,
}

impl JobsError {
    pub fn new(code: &'static str, message: impl Into<String>) -> JobsError {
        JobsError {
            code,
            message: message.into(),
            execution_state: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> JobsError {
        JobsError::new("InvalidRequest", message)
    }

    pub fn not_found(message: impl Into<String>) -> JobsError {
        JobsError::new("ResourceNotFound", message)
    }

    fn with_state(mut self, e: &Execution) -> JobsError {
        self.execution_state = Some(e.state());
        self
    }

    pub fn to_json(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut m = Map::new();
        m.insert("code".into(), json!(self.code));
        m.insert("message".into(), json!(self.message));
        m.insert("timestamp".into(), json!(now));
        if let Some(t) = client_token {
            m.insert("clientToken".into(), json!(t));
        }
        if let Some(s) = &self.execution_state {
            m.insert("executionState".into(), s.clone());
        }
        Value::Object(m)
    }
}

impl std::fmt::Display for JobsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The longest clientToken accepted.
pub const MAX_CLIENT_TOKEN: usize = 64;
/// Step and in-progress timeouts, minutes.
pub const MAX_TIMEOUT_MINUTES: u64 = 10080;

/// A request body as the device sent it: a JSON object (an empty body is `{}`).
pub fn body(payload: &[u8]) -> Result<Map<String, Value>, JobsError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JobsError::new(
            "InvalidJson",
            "the request is not a JSON object",
        )),
    }
}

/// The request's clientToken.
pub fn token(m: &Map<String, Value>) -> Result<Option<String>, JobsError> {
    match m.get("clientToken") {
        None => Ok(None),
        Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN => Ok(Some(t.clone())),
        Some(_) => Err(JobsError::invalid(format!(
            "clientToken must be a string of at most {MAX_CLIENT_TOKEN} bytes"
        ))),
    }
}

fn status_details(m: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, JobsError> {
    match m.get("statusDetails") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(d)) => {
            let mut out = BTreeMap::new();
            for (k, v) in d {
                let ok_key = !k.is_empty()
                    && k.len() <= 128
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
                let Value::String(v) = v else {
                    return Err(JobsError::invalid(format!(
                        "statusDetails values must be strings ({k:?} is not)"
                    )));
                };
                if !ok_key || v.is_empty() || v.chars().any(char::is_control) {
                    return Err(JobsError::invalid(format!(
                        "statusDetails key {k:?} or its value is not valid (keys: 1 to 128 of a-z A-Z 0-9 : _ -; values: 1 or more printable characters)"
                    )));
                }
                out.insert(k.clone(), v.clone());
            }
            Ok(Some(out))
        }
        Some(_) => Err(JobsError::invalid(
            "statusDetails must be an object of strings",
        )),
    }
}

fn step_timeout(m: &Map<String, Value>) -> Result<Option<u64>, JobsError> {
    match m.get("stepTimeoutInMinutes") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TIMEOUT_MINUTES).contains(&n) => Ok(Some(n)),
            _ => Err(JobsError::invalid(format!(
                "stepTimeoutInMinutes must be between 1 and {MAX_TIMEOUT_MINUTES}"
            ))),
        },
    }
}

fn flag(m: &Map<String, Value>, key: &str, default: bool) -> Result<bool, JobsError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(JobsError::invalid(format!("{key} must be true or false"))),
    }
}

fn number(m: &Map<String, Value>, key: &str) -> Result<Option<u64>, JobsError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| JobsError::invalid(format!("{key} must be a non-negative integer"))),
    }
}

/// A thing's pending executions in `$next` order: IN_PROGRESS first, then QUEUED, each
/// in queue order.
pub fn pending<'a>(execs: impl Iterator<Item = &'a Execution>) -> Vec<&'a Execution> {
    let mut p: Vec<&Execution> = execs.filter(|e| !e.status.is_terminal()).collect();
    p.sort_by_key(|e| (e.status != Status::InProgress, e.seq));
    p
}

/// GetPendingJobExecutions' answer.
pub fn pending_answer(pending: &[&Execution], token: Option<&str>, now: u64) -> Value {
    let pick = |s: Status| -> Vec<Value> {
        pending
            .iter()
            .filter(|e| e.status == s)
            .map(|e| e.summary())
            .collect()
    };
    with_token(
        json!({"inProgressJobs": pick(Status::InProgress), "queuedJobs": pick(Status::Queued), "timestamp": now}),
        token,
    )
}

/// The `notify` event: up to 10 pending executions by status.
pub fn notify_body(pending: &[&Execution], now: u64) -> Value {
    let mut jobs = Map::new();
    for e in pending.iter().take(10) {
        jobs.entry(e.status.as_str())
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("an array")
            .push(e.summary());
    }
    json!({"timestamp": now, "jobs": jobs})
}

/// The `notify-next` event: the head of the queue with its document, or just the time.
pub fn notify_next_body(head: Option<(&Execution, &Value)>, now: u64) -> Value {
    match head {
        Some((e, doc)) => json!({"timestamp": now, "execution": e.to_json(Some(doc))}),
        None => json!({ "timestamp": now }),
    }
}

pub fn with_token(mut v: Value, token: Option<&str>) -> Value {
    if let (Some(t), Value::Object(m)) = (token, &mut v) {
        m.insert("clientToken".into(), json!(t));
    }
    v
}

/// StartNextPendingJobExecution: the head of the queue, moved to IN_PROGRESS if it was
/// QUEUED (with the request's statusDetails and step timer); returned unchanged if it
/// was already IN_PROGRESS. `None`: nothing is pending.
pub fn start_next(
    head: Option<&Execution>,
    req: &Map<String, Value>,
    job_timeout_minutes: Option<u64>,
    now: u64,
) -> Result<Option<(Execution, bool)>, JobsError> {
    let details = status_details(req)?;
    let step = step_timeout(req)?;
    let Some(e) = head else {
        return Ok(None);
    };
    if e.status == Status::InProgress {
        return Ok(Some((e.clone(), false)));
    }
    let mut next = e.clone();
    start(&mut next, job_timeout_minutes, now);
    if let Some(d) = details {
        next.status_details = d;
    }
    next.step_deadline = step.map(|m| now + m * 60);
    next.version += 1;
    next.last_updated_at = now;
    Ok(Some((next, true)))
}

fn start(e: &mut Execution, job_timeout_minutes: Option<u64>, now: u64) {
    e.status = Status::InProgress;
    e.started_at = Some(now);
    e.in_progress_deadline = job_timeout_minutes.map(|m| now + m * 60);
}

/// A validated UpdateJobExecution request.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub status: Status,
    pub details: Option<BTreeMap<String, String>>,
    pub expected_version: Option<u64>,
    pub execution_number: Option<u64>,
    pub include_state: bool,
    pub include_document: bool,
    pub step_timeout: Option<u64>,
}

pub fn parse_update(m: &Map<String, Value>) -> Result<Update, JobsError> {
    let status = match m.get("status") {
        Some(Value::String(s)) => match Status::parse(s) {
            Some(
                st @ (Status::InProgress | Status::Succeeded | Status::Failed | Status::Rejected),
            ) => st,
            Some(other) => {
                return Err(JobsError::invalid(format!(
                    "a device may set IN_PROGRESS, SUCCEEDED, FAILED or REJECTED, not {}",
                    other.as_str()
                )))
            }
            None => return Err(JobsError::invalid(format!("unknown status {s:?}"))),
        },
        Some(_) => return Err(JobsError::invalid("status must be a string")),
        None => return Err(JobsError::invalid("status is required")),
    };
    Ok(Update {
        status,
        details: status_details(m)?,
        expected_version: number(m, "expectedVersion")?,
        execution_number: number(m, "executionNumber")?,
        include_state: flag(m, "includeJobExecutionState", false)?,
        include_document: flag(m, "includeJobDocument", false)?,
        step_timeout: step_timeout(m)?,
    })
}

/// UpdateJobExecution applied to `e`: the new execution. Terminal executions refuse any
/// change; QUEUED may go to IN_PROGRESS or straight to an end state; IN_PROGRESS may
/// repeat (progress) or end.
pub fn update(
    e: &Execution,
    u: &Update,
    job_timeout_minutes: Option<u64>,
    now: u64,
) -> Result<Execution, JobsError> {
    if let Some(n) = u.execution_number {
        if n != e.execution_number {
            return Err(JobsError::not_found(format!(
                "no execution number {n} of job {} on {}",
                e.job_id, e.thing
            )));
        }
    }
    if let Some(v) = u.expected_version {
        if v != e.version {
            return Err(JobsError::new(
                "VersionMismatch",
                format!("expected version {v}, the execution is at {}", e.version),
            )
            .with_state(e));
        }
    }
    if e.status.is_terminal() {
        return Err(JobsError::new(
            "InvalidStateTransition",
            format!(
                "the execution is {} (terminal); it cannot become {}",
                e.status.as_str(),
                u.status.as_str()
            ),
        )
        .with_state(e));
    }
    let mut next = e.clone();
    if e.status == Status::Queued && u.status != Status::Queued {
        next.started_at = Some(now);
        if u.status == Status::InProgress {
            start(&mut next, job_timeout_minutes, now);
        }
    }
    next.status = u.status;
    if let Some(d) = &u.details {
        next.status_details = d.clone();
    }
    if u.status == Status::InProgress {
        if let Some(m) = u.step_timeout {
            next.step_deadline = Some(now + m * 60);
        }
    } else {
        next.step_deadline = None;
        next.in_progress_deadline = None;
    }
    next.version += 1;
    next.last_updated_at = now;
    Ok(next)
}

/// The service ends an execution (CANCELED, TIMED_OUT, REMOVED).
pub fn end(e: &Execution, status: Status, force: bool, now: u64) -> Result<Execution, JobsError> {
    if e.status.is_terminal() {
        return Err(JobsError::new(
            "InvalidStateTransition",
            format!("the execution is already {}", e.status.as_str()),
        )
        .with_state(e));
    }
    if status == Status::Canceled && e.status == Status::InProgress && !force {
        return Err(JobsError::new(
            "InvalidStateTransition",
            "the execution is IN_PROGRESS; cancel it with force",
        )
        .with_state(e));
    }
    let mut next = e.clone();
    next.force_canceled = status == Status::Canceled && e.status == Status::InProgress;
    next.status = status;
    next.step_deadline = None;
    next.in_progress_deadline = None;
    next.version += 1;
    next.last_updated_at = now;
    Ok(next)
}

/// Whether `id` is a valid job id: 1 to 64 of `[a-zA-Z0-9_-]`.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

#[cfg(test)]
mod tests;
