//! Jobs on the record-store contract: a `job` record per job (key: the job id) and a
//! `job_execution` record per execution (key: `thing/jobId`), each JSON.

use std::collections::HashMap;

use fleetcore_core::storage::RecordOp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::machine::Execution;

pub const JOB: &str = "job";
pub const EXECUTION: &str = "job_execution";

/// A job's state (not an execution's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InProgress,
    Completed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Canceled => "CANCELED",
        }
    }
}

/// A job as created (and as it changes: status, times, cancel reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub document: Value,
    #[serde(default)]
    pub description: Option<String>,
    /// The things it targets: the named ones and the members of its groups at creation,
    /// and (continuous jobs) things that joined a target group since.
    pub targets: Vec<String>,
    /// The thing groups it targets, by name.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `targetSelection: CONTINUOUS`: a thing added to a target group later gets the
    /// job too, and the job never completes by itself.
    #[serde(default)]
    pub continuous: bool,
    pub status: JobStatus,
    pub created_at: u64,
    pub last_updated_at: u64,
    #[serde(default)]
    pub completed_at: Option<u64>,
    /// `timeoutConfig.inProgressTimeoutInMinutes`.
    #[serde(default)]
    pub in_progress_timeout_minutes: Option<u64>,
    /// `jobExecutionsRolloutConfig.maximumPerMinute`.
    #[serde(default)]
    pub max_per_minute: Option<u32>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub reason_code: Option<String>,
    #[serde(default)]
    pub force_canceled: bool,
    /// `abortConfig.criteriaList`: cancel the job when too many executions fail.
    #[serde(default)]
    pub abort: Vec<AbortCriteria>,
    /// `jobExecutionsRetryConfig.criteriaList`: run failed or timed-out executions again.
    #[serde(default)]
    pub retry: Vec<RetryCriteria>,
}

/// Which ended executions count as failures for abort and retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureType {
    Failed,
    Rejected,
    TimedOut,
    All,
}

impl FailureType {
    pub fn covers(self, s: super::machine::Status) -> bool {
        use super::machine::Status;
        match self {
            FailureType::Failed => s == Status::Failed,
            FailureType::Rejected => s == Status::Rejected,
            FailureType::TimedOut => s == Status::TimedOut,
            FailureType::All => matches!(s, Status::Failed | Status::Rejected | Status::TimedOut),
        }
    }
}

/// Cancel the job once at least `min_executed` executions ended and `threshold_percent`
/// of them ended in `failure_type`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AbortCriteria {
    pub failure_type: FailureType,
    pub min_executed: u64,
    pub threshold_percent: f64,
}

/// Run an execution that ended in `failure_type` (FAILED, TIMED_OUT or ALL of those two)
/// again, at most `retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryCriteria {
    pub failure_type: FailureType,
    pub retries: u32,
}

pub fn put_job(job: &Job) -> RecordOp {
    RecordOp::Put {
        kind: JOB,
        key: job.id.clone(),
        value: serde_json::to_vec(job).expect("a job encodes"),
    }
}

pub fn delete_job(id: &str) -> RecordOp {
    RecordOp::Delete {
        kind: JOB,
        key: id.to_string(),
    }
}

pub fn execution_key(thing: &str, job_id: &str) -> String {
    format!("{thing}/{job_id}")
}

pub fn put_execution(e: &Execution) -> RecordOp {
    RecordOp::Put {
        kind: EXECUTION,
        key: execution_key(&e.thing, &e.job_id),
        value: serde_json::to_vec(e).expect("an execution encodes"),
    }
}

pub fn delete_execution(thing: &str, job_id: &str) -> RecordOp {
    RecordOp::Delete {
        kind: EXECUTION,
        key: execution_key(thing, job_id),
    }
}

/// The jobs and executions among the loaded records (undecodable ones are logged and
/// skipped).
pub fn load(
    records: &[fleetcore_core::service::Record],
) -> (Vec<Job>, HashMap<String, Vec<Execution>>) {
    let mut jobs = Vec::new();
    let mut execs: HashMap<String, Vec<Execution>> = HashMap::new();
    for (kind, key, value, _) in records {
        match kind.as_str() {
            JOB => match serde_json::from_slice::<Job>(value) {
                Ok(j) => jobs.push(j),
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "job record does not decode; skipped")
                }
            },
            EXECUTION => match serde_json::from_slice::<Execution>(value) {
                Ok(x) => execs.entry(x.thing.clone()).or_default().push(x),
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "job execution record does not decode; skipped")
                }
            },
            _ => {}
        }
    }
    (jobs, execs)
}
