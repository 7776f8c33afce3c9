//! Jobs, as IoT Core serves them to devices (`$aws/things/{thing}/jobs/...`: `get`,
//! `start-next`, `{jobId}/get` with `$next`, `{jobId}/update`, and the `notify` /
//! `notify-next` events) and to backends through the admin API (create, describe,
//! list, cancel, delete jobs; describe, list and cancel executions).
//!
//! - [`machine`]: states, transitions, the `$next` order and every answer's JSON, pure.
//! - [`store`]: `job` and `job_execution` records.
//! - this file: topics, the per-thing queue, rollouts and timers.
//!
//! **Order and durability.** Everything that changes a thing's executions (its own
//! requests, a new job reaching it, a cancel, a timeout) goes through that thing's
//! queue and runs one at a time; the change is written and on disk before memory
//! changes and before anything is answered or notified. Different things run side by
//! side and share the store's group commit.
//! **Answers** go to the requesting connection only (`Publisher::send_to`), as IoT
//! Core's; `notify` and `notify-next` are ordinary QoS 1 publishes a persistent session
//! receives after being offline. A connection may act only on its own thing's
//! executions: its certificate's or token's thing (for an anonymous client, its client
//! id) must be the topic's.
//! **Rollouts** create executions target by target through the things' queues, at
//! `maximumPerMinute` if set; a rollout that was running when the broker stopped
//! resumes at start (execution creation is idempotent per thing and job).
//! **Timers** (step timeouts, the job's in-progress timeout) are absolute times in
//! the execution records; a one-second tick ends the overdue ones as TIMED_OUT, after a
//! restart too.

pub mod machine;
pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use fleetcore_core::service::{
    Handled, Publisher, RefuseCode, ServiceContext, ServiceRequest, TopicService,
};
use fleetcore_core::storage::{Commit, RecordCommit, RecordOp, RecordStore, StoreError};
use fleetcore_core::time::now_secs;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::{publish_json, send_json};
use machine::{Execution, JobsError, Status};
use store::{AbortCriteria, FailureType, Job, JobStatus, RetryCriteria};

/// The largest job document (IoT Core: 32 KB).
pub const MAX_DOCUMENT_BYTES: usize = 32 * 1024;

/// What a device asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    GetPending,
    StartNext,
    /// `{jobId}/get`; `$next` is the head of the queue.
    Describe(String),
    Update(String),
}

impl DeviceOp {
    fn topic(&self) -> String {
        match self {
            DeviceOp::GetPending => "get".into(),
            DeviceOp::StartNext => "start-next".into(),
            DeviceOp::Describe(id) => format!("{id}/get"),
            DeviceOp::Update(id) => format!("{id}/update"),
        }
    }
}

/// What a topic under `$aws/things/+/jobs/#` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobsTopic {
    Request(String, DeviceOp),
    /// `/accepted`, `/rejected`, `notify`, `notify-next`: the service's.
    Answer,
    Invalid(String),
}

pub fn parse_topic(topic: &str) -> JobsTopic {
    let Some((thing, rest)) = topic
        .strip_prefix("$aws/things/")
        .and_then(|r| r.split_once("/jobs/"))
    else {
        return JobsTopic::Invalid("not a jobs topic".into());
    };
    let levels: Vec<&str> = rest.split('/').collect();
    let op = match levels.as_slice() {
        ["get"] => DeviceOp::GetPending,
        ["start-next"] => DeviceOp::StartNext,
        ["notify" | "notify-next"] => return JobsTopic::Answer,
        [_, "accepted" | "rejected"] | [_, _, "accepted" | "rejected"] => return JobsTopic::Answer,
        [id, "get"] if *id == "$next" || machine::valid_job_id(id) => {
            DeviceOp::Describe(id.to_string())
        }
        [id, "update"] if machine::valid_job_id(id) => DeviceOp::Update(id.to_string()),
        _ => {
            return JobsTopic::Invalid(format!(
            "{topic:?} is not a jobs request topic (get, start-next, <jobId>/get, <jobId>/update)"
        ))
        }
    };
    if !crate::shadow::document::valid_name(thing, 128) {
        return JobsTopic::Invalid(format!(
            "thing name {thing:?} is not 1 to 128 characters of a-z A-Z 0-9 : _ -"
        ));
    }
    JobsTopic::Request(thing.to_string(), op)
}

/// A job to create (the admin API's CreateJob, already resolved to things).
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub id: String,
    pub document: Value,
    pub description: Option<String>,
    pub things: Vec<String>,
    pub in_progress_timeout_minutes: Option<u64>,
    pub max_per_minute: Option<u32>,
    pub abort: Vec<AbortCriteria>,
    pub retry: Vec<RetryCriteria>,
    /// Thing groups targeted (their members are in `things` already).
    pub groups: Vec<String>,
    pub continuous: bool,
}

/// The Jobs service.
pub struct JobsService {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Mutex<BTreeMap<String, JobEntry>>,
    things: Mutex<HashMap<String, Slot>>,
    seq: AtomicU64,
    /// Executions a timeout op is queued for, so the tick does not queue it twice.
    timing_out: Mutex<HashSet<(String, String)>>,
    store: OnceLock<Arc<dyn RecordStore>>,
    publisher: OnceLock<Arc<dyn Publisher>>,
}

struct JobEntry {
    job: Job,
    document: Arc<Value>,
    /// Executions by status (index: `Status::index`).
    counts: [u64; 8],
    /// Retries decided but not yet queued (the job is not complete meanwhile).
    pending_retries: u64,
}

#[derive(Default)]
struct Slot {
    execs: BTreeMap<String, Execution>,
    queue: VecDeque<Op>,
    busy: bool,
}

enum Op {
    Device {
        op: DeviceOp,
        payload: Bytes,
        client_id: Arc<str>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A job reaches the thing: its execution is created unless it exists.
    Queue { job_id: String },
    /// The service ends the execution (CANCELED, TIMED_OUT).
    End {
        job_id: String,
        status: Status,
        force: bool,
        reply: Option<oneshot::Sender<Result<Value, JobsError>>>,
    },
    /// The execution ended FAILED or TIMED_OUT and the job retries it.
    Retry {
        job_id: String,
        execution_number: u64,
    },
    /// The job is deleted: its execution goes too.
    Remove {
        job_id: String,
        done: oneshot::Sender<()>,
    },
}

/// What one op decided.
struct Decided {
    /// The execution as it will be after the write (`None`: removed), if it changes.
    change: Option<(String, Option<Execution>)>,
    /// The device's answer: (topic suffix, body).
    answer: Option<(String, Value)>,
    reply: Reply,
}

enum Reply {
    None,
    Device {
        client_id: Arc<str>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Admin(
        oneshot::Sender<Result<Value, JobsError>>,
        Result<Value, JobsError>,
    ),
    Removed(oneshot::Sender<()>),
    /// A retry was applied (or found moot): the job's pending count goes down.
    Retried(String),
}

impl Default for JobsService {
    fn default() -> Self {
        JobsService::new()
    }
}

impl JobsService {
    pub fn new() -> JobsService {
        JobsService {
            inner: Arc::new(Inner {
                jobs: Mutex::new(BTreeMap::new()),
                things: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(1),
                timing_out: Mutex::new(HashSet::new()),
                store: OnceLock::new(),
                publisher: OnceLock::new(),
            }),
        }
    }

    /// CreateJob: writes the job, then rolls it out to its things. Answers once the job
    /// is on disk; executions follow (at `max_per_minute`, if set).
    pub async fn create_job(&self, new: NewJob) -> Result<Value, JobsError> {
        if !machine::valid_job_id(&new.id) {
            return Err(JobsError::invalid(
                "jobId must be 1 to 64 characters of a-z A-Z 0-9 _ -",
            ));
        }
        let size = serde_json::to_vec(&new.document).map_or(usize::MAX, |v| v.len());
        if size > MAX_DOCUMENT_BYTES {
            return Err(JobsError::invalid(format!(
                "the job document is {size} bytes; at most {MAX_DOCUMENT_BYTES}"
            )));
        }
        let continuous_with_groups = new.continuous && !new.groups.is_empty();
        if new.things.is_empty() && !continuous_with_groups {
            return Err(JobsError::invalid(
                "a job needs at least one target thing (a continuous job: a target group)",
            ));
        }
        if let Some(t) = new.in_progress_timeout_minutes {
            if !(1..=machine::MAX_TIMEOUT_MINUTES).contains(&t) {
                return Err(JobsError::invalid(format!(
                    "inProgressTimeoutInMinutes must be between 1 and {}",
                    machine::MAX_TIMEOUT_MINUTES
                )));
            }
        }
        if new.max_per_minute == Some(0) {
            return Err(JobsError::invalid("maximumPerMinute must be at least 1"));
        }
        for a in &new.abort {
            if !(0.0..=100.0).contains(&a.threshold_percent) || a.min_executed == 0 {
                return Err(JobsError::invalid(
                    "abortConfig: thresholdPercentage must be 0 to 100 and minNumberOfExecutedThings at least 1",
                ));
            }
        }
        for r in &new.retry {
            if r.retries > 10 || matches!(r.failure_type, FailureType::Rejected) {
                return Err(JobsError::invalid(
                    "jobExecutionsRetryConfig: failureType FAILED, TIMED_OUT or ALL, numberOfRetries 0 to 10",
                ));
            }
        }
        let now = now_secs();
        let mut things = new.things.clone();
        things.sort();
        things.dedup();
        let job = Job {
            id: new.id.clone(),
            document: new.document,
            description: new.description,
            targets: things,
            status: JobStatus::InProgress,
            created_at: now,
            last_updated_at: now,
            completed_at: None,
            in_progress_timeout_minutes: new.in_progress_timeout_minutes,
            max_per_minute: new.max_per_minute,
            comment: None,
            reason_code: None,
            force_canceled: false,
            abort: new.abort,
            retry: new.retry,
            groups: new.groups,
            continuous: new.continuous,
        };
        {
            let mut jobs = self.inner.jobs.lock();
            if jobs.contains_key(&job.id) {
                return Err(JobsError::new(
                    "ResourceAlreadyExists",
                    format!("job {} already exists", job.id),
                ));
            }
            // Reserved now, so a second create of the same id is refused at once.
            jobs.insert(
                job.id.clone(),
                JobEntry {
                    document: Arc::new(job.document.clone()),
                    job: job.clone(),
                    counts: [0; 8],
                    pending_retries: 0,
                },
            );
        }
        if let Err(e) = self.inner.write(vec![store::put_job(&job)]).await {
            self.inner.jobs.lock().remove(&job.id);
            tracing::error!(job = %job.id, error = %e, "job write failed");
            return Err(JobsError::new("InternalError", e.to_string()));
        }
        tokio::spawn(Inner::rollout(Arc::downgrade(&self.inner), job.id.clone()));
        Ok(json!({"jobId": job.id, "description": job.description}))
    }

    /// DescribeJob, with the number of executions in each state.
    pub fn describe_job(&self, id: &str) -> Result<Value, JobsError> {
        let jobs = self.inner.jobs.lock();
        let e = jobs
            .get(id)
            .ok_or_else(|| JobsError::not_found(format!("job {id} not found")))?;
        Ok(json!({"job": job_json(e), "documentSource": null}))
    }

    /// ListJobs, optionally of one status.
    pub fn list_jobs(&self, status: Option<&str>) -> Value {
        let jobs = self.inner.jobs.lock();
        let list: Vec<Value> = jobs
            .values()
            .filter(|e| status.is_none_or(|s| e.job.status.as_str() == s))
            .map(|e| {
                json!({"jobId": e.job.id, "status": e.job.status.as_str(),
                       "createdAt": e.job.created_at, "lastUpdatedAt": e.job.last_updated_at,
                       "completedAt": e.job.completed_at, "targetSelection": selection(&e.job)})
            })
            .collect();
        json!({ "jobs": list })
    }

    /// The job's document.
    pub fn job_document(&self, id: &str) -> Result<Value, JobsError> {
        let jobs = self.inner.jobs.lock();
        let e = jobs
            .get(id)
            .ok_or_else(|| JobsError::not_found(format!("job {id} not found")))?;
        Ok(json!({"document": e.document.to_string()}))
    }

    /// CancelJob: QUEUED executions become CANCELED; IN_PROGRESS ones too with `force`.
    pub async fn cancel_job(
        &self,
        id: &str,
        force: bool,
        comment: Option<String>,
        reason_code: Option<String>,
    ) -> Result<Value, JobsError> {
        self.inner.cancel(id, force, comment, reason_code).await
    }

    /// DeleteJob: the job and its executions. A job with executions in progress needs
    /// `force`.
    pub async fn delete_job(&self, id: &str, force: bool) -> Result<(), JobsError> {
        let targets = {
            let jobs = self.inner.jobs.lock();
            let e = jobs
                .get(id)
                .ok_or_else(|| JobsError::not_found(format!("job {id} not found")))?;
            if e.counts[Status::InProgress.index()] > 0 && !force {
                return Err(JobsError::new(
                    "InvalidStateTransition",
                    format!("job {id} has executions in progress; delete it with force"),
                ));
            }
            e.job.targets.clone()
        };
        let mut waits = Vec::new();
        for thing in &targets {
            let (tx, rx) = oneshot::channel();
            self.inner.enqueue(
                thing,
                Op::Remove {
                    job_id: id.to_string(),
                    done: tx,
                },
            );
            waits.push(rx);
        }
        for w in waits {
            let _ = w.await;
        }
        self.inner
            .write(vec![store::delete_job(id)])
            .await
            .map_err(|e| JobsError::new("InternalError", e.to_string()))?;
        self.inner.jobs.lock().remove(id);
        self.inner.job_event(id, "deleted");
        Ok(())
    }

    /// A thing joined thing groups (`groups`: the group and every ancestor of it):
    /// each continuous job in progress that targets one of them now targets the thing,
    /// and its execution is queued.
    pub async fn thing_joined(&self, thing: &str, groups: &[String]) {
        let changed: Vec<Job> = {
            let mut jobs = self.inner.jobs.lock();
            jobs.values_mut()
                .filter(|e| {
                    e.job.continuous
                        && e.job.status == JobStatus::InProgress
                        && e.job.groups.iter().any(|g| groups.contains(g))
                        && !e.job.targets.iter().any(|t| t == thing)
                })
                .map(|e| {
                    e.job.targets.push(thing.to_string());
                    e.job.last_updated_at = now_secs();
                    e.job.clone()
                })
                .collect()
        };
        for job in changed {
            if let Err(e) = self.inner.write(vec![store::put_job(&job)]).await {
                tracing::error!(job = %job.id, thing, error = %e, "cannot record a new target of a continuous job");
                continue;
            }
            self.inner.enqueue(
                thing,
                Op::Queue {
                    job_id: job.id.clone(),
                },
            );
        }
    }

    /// A thing left thing groups (`groups`: the group and its ancestors): a continuous
    /// job that reached it only through them ends its open execution as REMOVED.
    pub async fn thing_left(&self, thing: &str, groups: &[String], still_in: &[String]) {
        let ids: Vec<String> = {
            let jobs = self.inner.jobs.lock();
            jobs.values()
                .filter(|e| {
                    e.job.continuous
                        && e.job.groups.iter().any(|g| groups.contains(g))
                        && !e.job.groups.iter().any(|g| still_in.contains(g))
                })
                .map(|e| e.job.id.clone())
                .collect()
        };
        for id in ids {
            self.inner.enqueue(
                thing,
                Op::End {
                    job_id: id,
                    status: Status::Removed,
                    force: true,
                    reply: None,
                },
            );
        }
    }

    /// DescribeJobExecution (control plane: `jobDocument` left out, `forceCanceled` in).
    pub fn describe_execution(&self, thing: &str, job_id: &str) -> Result<Value, JobsError> {
        let things = self.inner.things.lock();
        let e = things
            .get(thing)
            .and_then(|s| s.execs.get(job_id))
            .ok_or_else(|| {
                JobsError::not_found(format!("no execution of job {job_id} on {thing}"))
            })?;
        let mut v = e.to_json(None);
        v["forceCanceled"] = json!(e.force_canceled);
        Ok(json!({ "execution": v }))
    }

    /// ListJobExecutionsForJob.
    pub fn executions_for_job(&self, job_id: &str) -> Result<Value, JobsError> {
        let targets = {
            let jobs = self.inner.jobs.lock();
            jobs.get(job_id)
                .ok_or_else(|| JobsError::not_found(format!("job {job_id} not found")))?
                .job
                .targets
                .clone()
        };
        let things = self.inner.things.lock();
        let list: Vec<Value> = targets
            .iter()
            .filter_map(|t| things.get(t).and_then(|s| s.execs.get(job_id)))
            .map(|e| json!({"thingName": e.thing, "jobExecutionSummary": exec_summary(e)}))
            .collect();
        Ok(json!({ "executionSummaries": list }))
    }

    /// ListJobExecutionsForThing.
    pub fn executions_for_thing(&self, thing: &str) -> Value {
        let things = self.inner.things.lock();
        let list: Vec<Value> = things
            .get(thing)
            .map(|s| {
                s.execs
                    .values()
                    .map(|e| json!({"jobId": e.job_id, "jobExecutionSummary": exec_summary(e)}))
                    .collect()
            })
            .unwrap_or_default();
        json!({ "executionSummaries": list })
    }

    /// CancelJobExecution.
    pub async fn cancel_execution(
        &self,
        thing: &str,
        job_id: &str,
        force: bool,
    ) -> Result<Value, JobsError> {
        let (tx, rx) = oneshot::channel();
        self.inner.enqueue(
            thing,
            Op::End {
                job_id: job_id.to_string(),
                status: Status::Canceled,
                force,
                reply: Some(tx),
            },
        );
        rx.await
            .unwrap_or_else(|_| Err(JobsError::new("InternalError", "the service stopped")))
    }
}

fn selection(job: &Job) -> &'static str {
    if job.continuous {
        "CONTINUOUS"
    } else {
        "SNAPSHOT"
    }
}

fn exec_summary(e: &Execution) -> Value {
    json!({"status": e.status.as_str(), "queuedAt": e.queued_at, "startedAt": e.started_at,
           "lastUpdatedAt": e.last_updated_at, "executionNumber": e.execution_number,
           "versionNumber": e.version, "forceCanceled": e.force_canceled})
}

fn job_json(e: &JobEntry) -> Value {
    let c = |s: Status| e.counts[s.index()];
    json!({
        "jobId": e.job.id, "status": e.job.status.as_str(), "targetSelection": selection(&e.job),
        "description": e.job.description, "targets": e.job.targets, "targetGroups": e.job.groups,
        "createdAt": e.job.created_at, "lastUpdatedAt": e.job.last_updated_at,
        "completedAt": e.job.completed_at, "forceCanceled": e.job.force_canceled,
        "comment": e.job.comment, "reasonCode": e.job.reason_code,
        "timeoutConfig": {"inProgressTimeoutInMinutes": e.job.in_progress_timeout_minutes},
        "jobExecutionsRolloutConfig": {"maximumPerMinute": e.job.max_per_minute},
        "jobProcessDetails": {
            "numberOfQueuedThings": c(Status::Queued),
            "numberOfInProgressThings": c(Status::InProgress),
            "numberOfSucceededThings": c(Status::Succeeded),
            "numberOfFailedThings": c(Status::Failed),
            "numberOfRejectedThings": c(Status::Rejected),
            "numberOfCanceledThings": c(Status::Canceled),
            "numberOfTimedOutThings": c(Status::TimedOut),
            "numberOfRemovedThings": c(Status::Removed),
        },
    })
}

impl Inner {
    /// CancelJob (and an abort).
    async fn cancel(
        self: &Arc<Self>,
        id: &str,
        force: bool,
        comment: Option<String>,
        reason_code: Option<String>,
    ) -> Result<Value, JobsError> {
        let job = {
            let mut jobs = self.jobs.lock();
            let e = jobs
                .get_mut(id)
                .ok_or_else(|| JobsError::not_found(format!("job {id} not found")))?;
            // A canceled job may be canceled again only to force its in-progress executions.
            if e.job.status == JobStatus::Canceled && (!force || e.job.force_canceled) {
                return Err(JobsError::new(
                    "InvalidStateTransition",
                    format!("job {id} is already canceled"),
                ));
            }
            if e.job.status == JobStatus::Completed {
                return Err(JobsError::new(
                    "InvalidStateTransition",
                    format!("job {id} is completed"),
                ));
            }
            let mut j = e.job.clone();
            j.status = JobStatus::Canceled;
            j.force_canceled = force;
            j.comment = comment;
            j.reason_code = reason_code;
            j.last_updated_at = now_secs();
            e.job = j.clone();
            j
        };
        self.write(vec![store::put_job(&job)])
            .await
            .map_err(|e| JobsError::new("InternalError", e.to_string()))?;
        for thing in &job.targets {
            self.enqueue(
                thing,
                Op::End {
                    job_id: id.to_string(),
                    status: Status::Canceled,
                    force,
                    reply: None,
                },
            );
        }
        self.job_event(id, "canceled");
        Ok(json!({"jobId": id, "description": job.description}))
    }

    async fn write(&self, ops: Vec<RecordOp>) -> Result<(), StoreError> {
        match self.store.get() {
            Some(s) => s.submit_records(ops).await.map(|_| ()),
            None => Err(StoreError::Closed),
        }
    }

    fn enqueue(self: &Arc<Self>, thing: &str, op: Op) {
        let mut things = self.things.lock();
        let slot = things.entry(thing.to_string()).or_default();
        slot.queue.push_back(op);
        if !slot.busy {
            slot.busy = true;
            tokio::spawn(self.clone().drain(thing.to_string()));
        }
    }

    async fn drain(self: Arc<Self>, thing: String) {
        loop {
            let (decided, head_before, commit) = {
                let mut things = self.things.lock();
                let Some(slot) = things.get_mut(&thing) else {
                    return;
                };
                let Some(op) = slot.queue.pop_front() else {
                    slot.busy = false;
                    if slot.execs.is_empty() {
                        things.remove(&thing);
                    }
                    return;
                };
                let head_before = head(&slot.execs);
                let decided = self.decide(&thing, &slot.execs, op);
                let commit = match &decided.change {
                    Some((_, Some(e))) => self.submit(vec![store::put_execution(e)]),
                    Some((job_id, None)) => {
                        self.submit(vec![store::delete_execution(&thing, job_id)])
                    }
                    None => Commit::ready(),
                };
                (decided, head_before, commit)
            };
            self.finish(&thing, decided, head_before, commit.await.map(|_| ()));
        }
    }

    fn submit(&self, ops: Vec<RecordOp>) -> RecordCommit {
        match self.store.get() {
            Some(s) => s.submit_records(ops),
            None => Commit::failed(StoreError::Closed),
        }
    }

    /// Retries the job allows after FAILED and after TIMED_OUT.
    fn retries_allowed(&self, job_id: &str) -> (u32, u32) {
        let jobs = self.jobs.lock();
        let Some(e) = jobs.get(job_id) else {
            return (0, 0);
        };
        let pick = |s: Status| {
            e.job
                .retry
                .iter()
                .filter(|r| r.failure_type.covers(s))
                .map(|r| r.retries)
                .max()
                .unwrap_or(0)
        };
        (pick(Status::Failed), pick(Status::TimedOut))
    }

    fn job_info(&self, job_id: &str) -> Option<(JobStatus, Arc<Value>, Option<u64>)> {
        self.jobs.lock().get(job_id).map(|e| {
            (
                e.job.status,
                e.document.clone(),
                e.job.in_progress_timeout_minutes,
            )
        })
    }

    /// Works out one op against the thing's executions as they are.
    fn decide(&self, thing: &str, execs: &BTreeMap<String, Execution>, op: Op) -> Decided {
        let now = now_secs();
        match op {
            Op::Queue { job_id } => {
                let live = matches!(self.job_info(&job_id), Some((JobStatus::InProgress, _, _)));
                let change = (live && !execs.contains_key(&job_id)).then(|| {
                    let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                    (
                        job_id.clone(),
                        Some(Execution::new(&job_id, thing, seq, now)),
                    )
                });
                Decided {
                    change,
                    answer: None,
                    reply: Reply::None,
                }
            }
            Op::End {
                job_id,
                status,
                force,
                reply,
            } => {
                let result = match execs.get(&job_id) {
                    None => Err(JobsError::not_found(format!(
                        "no execution of job {job_id} on {thing}"
                    ))),
                    Some(e) => machine::end(e, status, force, now),
                };
                let (change, answer) = match result {
                    Ok(next) => {
                        let v = next.to_json(None);
                        (Some((job_id, Some(next))), Ok(v))
                    }
                    Err(e) => (None, Err(e)),
                };
                Decided {
                    change,
                    answer: None,
                    reply: match reply {
                        Some(tx) => Reply::Admin(tx, answer),
                        None => Reply::None,
                    },
                }
            }
            Op::Retry {
                job_id,
                execution_number,
            } => {
                let (allowed_failed, allowed_timed_out) = self.retries_allowed(&job_id);
                let live = matches!(self.job_info(&job_id), Some((JobStatus::InProgress, _, _)));
                let change = execs
                    .get(&job_id)
                    .filter(|e| live && e.execution_number == execution_number)
                    .and_then(|e| {
                        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                        e.retry(allowed_failed, allowed_timed_out, seq, now)
                    })
                    .map(|next| (job_id.clone(), Some(next)));
                Decided {
                    change,
                    answer: None,
                    reply: Reply::Retried(job_id),
                }
            }
            Op::Remove { job_id, done } => Decided {
                change: execs.contains_key(&job_id).then_some((job_id, None)),
                answer: None,
                reply: Reply::Removed(done),
            },
            Op::Device {
                op,
                payload,
                client_id,
                done,
            } => {
                let (change, answer) = self.device(execs, &op, &payload, now);
                Decided {
                    change,
                    answer: Some(answer),
                    reply: Reply::Device { client_id, done },
                }
            }
        }
    }

    /// A device request: the change (if any) and the (topic suffix, body) answer.
    #[allow(clippy::type_complexity)]
    fn device(
        &self,
        execs: &BTreeMap<String, Execution>,
        op: &DeviceOp,
        payload: &[u8],
        now: u64,
    ) -> (Option<(String, Option<Execution>)>, (String, Value)) {
        let base = op.topic();
        let reject = |e: JobsError, token: Option<&str>| {
            (None, (format!("{base}/rejected"), e.to_json(token, now)))
        };
        let body = match machine::body(payload) {
            Ok(b) => b,
            Err(e) => return reject(e, None),
        };
        let token = match machine::token(&body) {
            Ok(t) => t,
            Err(e) => return reject(e, None),
        };
        let token = token.as_deref();
        let accept = |v: Value| (format!("{base}/accepted"), machine::with_token(v, token));
        match op {
            DeviceOp::GetPending => {
                let p = machine::pending(execs.values());
                (None, accept(machine::pending_answer(&p, None, now)))
            }
            DeviceOp::StartNext => {
                let p = machine::pending(execs.values());
                let head = p.first().copied();
                let timeout = head
                    .and_then(|h| self.job_info(&h.job_id))
                    .and_then(|i| i.2);
                match machine::start_next(head, &body, timeout, now) {
                    Err(e) => reject(e, token),
                    Ok(None) => (None, accept(json!({ "timestamp": now }))),
                    Ok(Some((next, changed))) => {
                        let doc = self.job_info(&next.job_id).map(|i| i.1);
                        let answer = accept(
                            json!({"execution": next.to_json(doc.as_deref()), "timestamp": now}),
                        );
                        let change = changed.then(|| (next.job_id.clone(), Some(next)));
                        (change, answer)
                    }
                }
            }
            DeviceOp::Describe(id) => {
                let include_doc = match body.get("includeJobDocument") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return reject(
                            JobsError::invalid("includeJobDocument must be true or false"),
                            token,
                        )
                    }
                };
                let found = if id == "$next" {
                    machine::pending(execs.values()).first().copied()
                } else {
                    execs.get(id)
                };
                match found {
                    None if id == "$next" => (None, accept(json!({ "timestamp": now }))),
                    None => reject(
                        JobsError::not_found(format!("no execution of job {id} for this thing")),
                        token,
                    ),
                    Some(e) if e.status.is_terminal() && id != "$next" => reject(
                        JobsError::new(
                            "TerminalStateReached",
                            format!("the execution of job {id} is {}", e.status.as_str()),
                        ),
                        token,
                    ),
                    Some(e) => {
                        let doc = include_doc
                            .then(|| self.job_info(&e.job_id).map(|i| i.1))
                            .flatten();
                        (
                            None,
                            accept(
                                json!({"execution": e.to_json(doc.as_deref()), "timestamp": now}),
                            ),
                        )
                    }
                }
            }
            DeviceOp::Update(id) => {
                let u = match machine::parse_update(&body) {
                    Ok(u) => u,
                    Err(e) => return reject(e, token),
                };
                let Some(e) = execs.get(id) else {
                    return reject(
                        JobsError::not_found(format!("no execution of job {id} for this thing")),
                        token,
                    );
                };
                let info = self.job_info(id);
                match machine::update(e, &u, info.as_ref().and_then(|i| i.2), now) {
                    Err(err) => reject(err, token),
                    Ok(next) => {
                        let mut v = Map::new();
                        if u.include_state {
                            v.insert("executionState".into(), next.state());
                        }
                        if u.include_document {
                            if let Some(i) = &info {
                                v.insert("jobDocument".into(), (*i.1).clone());
                            }
                        }
                        v.insert("timestamp".into(), json!(now));
                        (Some((id.clone(), Some(next))), accept(Value::Object(v)))
                    }
                }
            }
        }
    }

    /// After the write: memory, counts, answers, notifications, events.
    fn finish(
        self: &Arc<Self>,
        thing: &str,
        d: Decided,
        head_before: Option<String>,
        stored: Result<(), StoreError>,
    ) {
        let now = now_secs();
        let prefix = format!("$aws/things/{thing}/jobs");
        if let Err(e) = &stored {
            if d.change.is_some() {
                tracing::error!(thing, error = %e, "job execution write failed; the request is answered InternalError and nothing changed");
            }
        }
        let ok = stored.is_ok();
        let mut notify = None;
        let mut ended = None;
        if let (true, Some((job_id, next))) = (ok, &d.change) {
            let mut things = self.things.lock();
            let slot = things.entry(thing.to_string()).or_default();
            let before = slot.execs.get(job_id).map(|e| e.status);
            match next {
                Some(e) => {
                    slot.execs.insert(job_id.clone(), e.clone());
                }
                None => {
                    slot.execs.remove(job_id);
                }
            }
            let after = next.as_ref().map(|e| e.status);
            self.timing_out
                .lock()
                .remove(&(thing.to_string(), job_id.clone()));
            if before != after {
                let pending = machine::pending(slot.execs.values());
                notify = Some(machine::notify_body(&pending, now));
                if let Some(s) = after.filter(|s| s.is_terminal()) {
                    ended = Some((job_id.clone(), s));
                }
            }
            let head_after = head(&slot.execs);
            let next_body = (head_after != head_before).then(|| {
                let h = machine::pending(slot.execs.values())
                    .first()
                    .map(|e| (*e).clone());
                h
            });
            drop(things);
            // A retry is decided before the counts, so the job is not complete meanwhile.
            if let (Some(e), Some(Status::Failed | Status::TimedOut)) = (next, after) {
                let (f, t) = self.retries_allowed(job_id);
                if before != after && e.retry(f, t, 0, now).is_some() {
                    if let Some(j) = self.jobs.lock().get_mut(job_id) {
                        j.pending_retries += 1;
                    }
                    self.enqueue(
                        thing,
                        Op::Retry {
                            job_id: job_id.clone(),
                            execution_number: e.execution_number,
                        },
                    );
                }
            }
            self.count(job_id, before, after);
            if let Some(n) = notify.take() {
                self.publish(&format!("{prefix}/notify"), &n);
            }
            if let Some(h) = next_body {
                let body = match &h {
                    Some(e) => {
                        let doc = self.job_info(&e.job_id).map(|i| i.1);
                        let doc = doc.map(|d| (*d).clone()).unwrap_or(Value::Null);
                        machine::notify_next_body(Some((e, &doc)), now)
                    }
                    None => machine::notify_next_body(None, now),
                };
                self.publish(&format!("{prefix}/notify-next"), &body);
            }
            if let Some((job_id, s)) = ended {
                self.execution_event(&job_id, thing, s, now);
                self.check_abort(&job_id);
            }
        }
        match d.reply {
            Reply::None => {}
            Reply::Removed(tx) => {
                let _ = tx.send(());
            }
            Reply::Retried(job_id) => {
                let complete = {
                    let mut jobs = self.jobs.lock();
                    jobs.get_mut(&job_id).is_some_and(|j| {
                        j.pending_retries = j.pending_retries.saturating_sub(1);
                        true
                    })
                };
                if complete {
                    self.count(&job_id, None, None);
                }
            }
            Reply::Admin(tx, result) => {
                let result = if ok {
                    result
                } else {
                    Err(JobsError::new(
                        "InternalError",
                        "the change could not be written",
                    ))
                };
                let _ = tx.send(result);
            }
            Reply::Device { client_id, done } => {
                if let Some((suffix, body)) = d.answer {
                    let (suffix, body) = if ok {
                        (suffix, body)
                    } else {
                        let base = suffix.rsplit_once('/').map_or("", |(b, _)| b).to_string();
                        let token = body
                            .get("clientToken")
                            .and_then(Value::as_str)
                            .map(str::to_string);
                        (
                            format!("{base}/rejected"),
                            JobsError::new("InternalError", "the change could not be written")
                                .to_json(token.as_deref(), now),
                        )
                    };
                    self.send_to(&client_id, &format!("{prefix}/{suffix}"), &body);
                }
                let _ = done.send(stored);
            }
        }
    }

    fn count(&self, job_id: &str, before: Option<Status>, after: Option<Status>) {
        let mut completed = None;
        {
            let mut jobs = self.jobs.lock();
            let Some(e) = jobs.get_mut(job_id) else {
                return;
            };
            if let Some(b) = before {
                e.counts[b.index()] = e.counts[b.index()].saturating_sub(1);
            }
            if let Some(a) = after {
                e.counts[a.index()] += 1;
            }
            let total: u64 = e.counts.iter().sum();
            let open = e.counts[Status::Queued.index()] + e.counts[Status::InProgress.index()];
            if e.job.status == JobStatus::InProgress
                && !e.job.continuous
                && open == 0
                && e.pending_retries == 0
                && total as usize == e.job.targets.len()
            {
                let now = now_secs();
                e.job.status = JobStatus::Completed;
                e.job.completed_at = Some(now);
                e.job.last_updated_at = now;
                completed = Some(e.job.clone());
            }
        }
        if let Some(job) = completed {
            drop(self.submit(vec![store::put_job(&job)]));
            self.job_event(&job.id, "completed");
        }
    }

    /// Cancels the job (its QUEUED executions) when an abort criterion is met.
    fn check_abort(self: &Arc<Self>, job_id: &str) {
        let hit = {
            let jobs = self.jobs.lock();
            let Some(e) = jobs.get(job_id) else {
                return;
            };
            if e.job.status != JobStatus::InProgress {
                return;
            }
            let c = |s: Status| e.counts[s.index()];
            let executed = c(Status::Succeeded)
                + c(Status::Failed)
                + c(Status::Rejected)
                + c(Status::TimedOut);
            e.job
                .abort
                .iter()
                .find(|a| {
                    let failures: u64 = Status::ALL
                        .iter()
                        .filter(|s| a.failure_type.covers(**s))
                        .map(|s| c(*s))
                        .sum();
                    executed >= a.min_executed
                        && failures as f64 * 100.0 >= a.threshold_percent * executed as f64
                })
                .copied()
        };
        if let Some(a) = hit {
            tracing::warn!(job = job_id, failure_type = ?a.failure_type, threshold = a.threshold_percent, "job aborted: too many executions failed");
            let inner = self.clone();
            let id = job_id.to_string();
            tokio::spawn(async move {
                let comment = format!(
                    "aborted: at least {}% of at least {} executions ended {:?}",
                    a.threshold_percent, a.min_executed, a.failure_type
                );
                if let Err(e) = inner
                    .cancel(&id, false, Some(comment), Some("ABORTED".into()))
                    .await
                {
                    tracing::error!(job = %id, error = %e, "job abort failed");
                }
            });
        }
    }

    fn publish(&self, topic: &str, body: &Value) {
        if let Some(p) = self.publisher.get() {
            publish_json(p.as_ref(), topic, body);
        }
    }

    fn send_to(&self, client_id: &str, topic: &str, body: &Value) {
        if let Some(p) = self.publisher.get() {
            send_json(p.as_ref(), client_id, topic, body);
        }
    }

    /// `$aws/events/job/{jobId}/{completed,canceled,deleted}` for backends.
    fn job_event(&self, job_id: &str, what: &str) {
        let now = now_secs();
        self.publish(
            &format!("$aws/events/job/{job_id}/{what}"),
            &json!({"eventType": "JOB", "operation": what, "jobId": job_id, "timestamp": now}),
        );
    }

    /// `$aws/events/jobExecution/{jobId}/{succeeded,failed,...}` for backends.
    fn execution_event(&self, job_id: &str, thing: &str, s: Status, now: u64) {
        let what = s.as_str().to_ascii_lowercase();
        self.publish(
            &format!("$aws/events/jobExecution/{job_id}/{what}"),
            &json!({"eventType": "JOB_EXECUTION", "operation": what, "jobId": job_id,
                    "thingName": thing, "status": s.as_str(), "timestamp": now}),
        );
    }

    /// Creates the job's executions target by target, at its rate if it has one. Holds
    /// the service weakly (a rollout waiting for its next slot does not keep it alive).
    async fn rollout(weak: Weak<Inner>, job_id: String) {
        let Some((targets, rate)) = weak.upgrade().and_then(|inner| {
            inner
                .jobs
                .lock()
                .get(&job_id)
                .map(|e| (e.job.targets.clone(), e.job.max_per_minute))
        }) else {
            return;
        };
        let gap = rate.map(|r| Duration::from_secs_f64(60.0 / f64::from(r)));
        for (i, thing) in targets.iter().enumerate() {
            {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if !matches!(inner.job_info(&job_id), Some((JobStatus::InProgress, _, _))) {
                    return;
                }
                let exists = inner
                    .things
                    .lock()
                    .get(thing)
                    .is_some_and(|s| s.execs.contains_key(&job_id));
                if exists {
                    continue;
                }
                inner.enqueue(
                    thing,
                    Op::Queue {
                        job_id: job_id.clone(),
                    },
                );
            }
            match gap {
                Some(g) => tokio::time::sleep(g).await,
                None if i % 256 == 255 => tokio::task::yield_now().await,
                None => {}
            }
        }
    }

    /// Ends the executions whose timers ran out.
    fn tick(self: &Arc<Self>) {
        let now = now_secs();
        let due: Vec<(String, String)> = {
            let things = self.things.lock();
            things
                .iter()
                .flat_map(|(t, s)| {
                    s.execs
                        .values()
                        .filter(|e| e.deadline().is_some_and(|d| d <= now))
                        .map(move |e| (t.clone(), e.job_id.clone()))
                })
                .collect()
        };
        for (thing, job_id) in due {
            if !self
                .timing_out
                .lock()
                .insert((thing.clone(), job_id.clone()))
            {
                continue;
            }
            self.enqueue(
                &thing,
                Op::End {
                    job_id,
                    status: Status::TimedOut,
                    force: true,
                    reply: None,
                },
            );
        }
    }
}

fn head(execs: &BTreeMap<String, Execution>) -> Option<String> {
    machine::pending(execs.values())
        .first()
        .map(|e| e.job_id.clone())
}

impl TopicService for JobsService {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn filters(&self) -> Vec<String> {
        vec!["$aws/things/+/jobs/#".into()]
    }

    fn handle(&self, req: ServiceRequest<'_>, _out: &Arc<dyn Publisher>) -> Handled {
        let topic: &str = &req.message.topic;
        let (thing, op) = match parse_topic(topic) {
            JobsTopic::Request(thing, op) => (thing, op),
            JobsTopic::Answer => {
                return Handled::Refused {
                    code: RefuseCode::NotAuthorized,
                    why: format!(
                    "{topic:?} is a topic of the jobs service; clients may only subscribe to it"
                ),
                }
            }
            JobsTopic::Invalid(why) => {
                return Handled::Refused {
                    code: RefuseCode::TopicNameInvalid,
                    why,
                }
            }
        };
        let caller = req.from.thing.as_deref().unwrap_or(&req.from.client_id);
        if caller != thing {
            return Handled::Refused {
                code: RefuseCode::NotAuthorized,
                why: format!(
                    "{:?} may use the jobs of its own thing only, not of {thing:?}",
                    caller
                ),
            };
        }
        let (done, rx) = oneshot::channel();
        self.inner.enqueue(
            &thing,
            Op::Device {
                op,
                payload: req.message.payload.clone(),
                client_id: req.from.client_id.clone(),
                done,
            },
        );
        metrics::counter!("fleetcore_jobs_requests_total").increment(1);
        Handled::Consumed {
            commit: Some(Commit::waiting(rx)),
        }
    }

    fn start(&self, ctx: ServiceContext<'_>) {
        let (jobs, execs) = store::load(ctx.records);
        let _ = self.inner.publisher.set(ctx.publisher);
        let _ = self.inner.store.set(ctx.store);
        let mut max_seq = 0;
        {
            let mut things = self.inner.things.lock();
            for (thing, list) in execs {
                let slot = things.entry(thing).or_default();
                for e in list {
                    max_seq = max_seq.max(e.seq);
                    slot.execs.insert(e.job_id.clone(), e);
                }
            }
        }
        self.inner.seq.store(max_seq + 1, Ordering::Relaxed);
        let mut resume = Vec::new();
        {
            let things = self.inner.things.lock();
            let mut map = self.inner.jobs.lock();
            for job in jobs {
                let mut counts = [0u64; 8];
                for t in &job.targets {
                    if let Some(e) = things.get(t).and_then(|s| s.execs.get(&job.id)) {
                        counts[e.status.index()] += 1;
                    }
                }
                if job.status == JobStatus::InProgress
                    && (counts.iter().sum::<u64>() as usize) < job.targets.len()
                {
                    resume.push(job.id.clone());
                }
                map.insert(
                    job.id.clone(),
                    JobEntry {
                        document: Arc::new(job.document.clone()),
                        job,
                        counts,
                        pending_retries: 0,
                    },
                );
            }
        }
        tracing::info!(
            jobs = self.inner.jobs.lock().len(),
            resumed_rollouts = resume.len(),
            "jobs loaded"
        );
        for id in resume {
            tokio::spawn(Inner::rollout(Arc::downgrade(&self.inner), id));
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.tick(),
                    None => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests;
