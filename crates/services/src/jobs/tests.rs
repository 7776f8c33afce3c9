//! The service with the real store and a publisher that keeps what was sent.

use super::*;
use fleetcore_core::message::Message;
use fleetcore_core::service::Requester;
use fleetcore_store::{Store, StoreOptions};
use mqtt_proto::v5::PublishProperties;
use mqtt_proto::{QoS, TopicName};

use crate::testing::Sent;

struct Rig {
    jobs: JobsService,
    sent: Arc<Sent>,
    dir: tempfile::TempDir,
}

fn rig_at(dir: tempfile::TempDir) -> Rig {
    let (store, loaded) = Store::open(&dir.path().join("j.redb"), StoreOptions::default()).unwrap();
    let jobs = JobsService::new();
    let sent = Arc::new(Sent::default());
    jobs.start(ServiceContext {
        store: Arc::new(store),
        records: &loaded.records,
        publisher: sent.clone(),
    });
    Rig { jobs, sent, dir }
}

fn new_job(id: &str, things: &[&str]) -> NewJob {
    NewJob {
        id: id.into(),
        document: json!({"operation": "reboot"}),
        description: None,
        things: things.iter().map(|t| t.to_string()).collect(),
        in_progress_timeout_minutes: None,
        max_per_minute: None,
        abort: Vec::new(),
        retry: Vec::new(),
        groups: Vec::new(),
        continuous: false,
    }
}

impl Rig {
    /// Sends one device request and waits for its PUBACK.
    async fn device(&self, thing: &str, topic: &str, body: Value) {
        if let Some(code) = self.try_device(thing, topic, body).await {
            panic!("refused with {code:?}");
        }
    }

    /// As `device`; the refusal, if the service refused the publish.
    async fn try_device(&self, thing: &str, topic: &str, body: Value) -> Option<RefuseCode> {
        let msg = Message::from_publish(
            TopicName::try_from(format!("$aws/things/{thing}/jobs/{topic}").as_str()).unwrap(),
            Bytes::from(body.to_string()),
            QoS::Level1,
            false,
            PublishProperties::default(),
            1,
        );
        let from = Requester {
            client_id: Arc::from(thing),
            thing: Some(Arc::from(thing)),
            cert_id: None,
        };
        let out: Arc<dyn Publisher> = self.sent.clone();
        let h = self.jobs.handle(
            ServiceRequest {
                message: &msg,
                from: &from,
            },
            &out,
        );
        match h {
            Handled::Consumed { commit: Some(c) } => {
                c.await.unwrap();
                None
            }
            Handled::Consumed { commit: None } => None,
            Handled::Refused { code, .. } => Some(code),
            Handled::PassThrough => panic!("passed through"),
        }
    }

    /// Waits until `thing` has an execution of `job` (the rollout runs in the background).
    async fn wait_queued(&self, thing: &str, job: &str) {
        for _ in 0..200 {
            if self.jobs.describe_execution(thing, job).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no execution of {job} on {thing}");
    }
}

#[test]
fn topics_are_requests_answers_or_invalid() {
    assert_eq!(
        parse_topic("$aws/things/t/jobs/get"),
        JobsTopic::Request("t".into(), DeviceOp::GetPending)
    );
    assert_eq!(
        parse_topic("$aws/things/t/jobs/$next/get"),
        JobsTopic::Request("t".into(), DeviceOp::Describe("$next".into()))
    );
    assert_eq!(
        parse_topic("$aws/things/t/jobs/j-1/update"),
        JobsTopic::Request("t".into(), DeviceOp::Update("j-1".into()))
    );
    for a in [
        "$aws/things/t/jobs/notify",
        "$aws/things/t/jobs/notify-next",
        "$aws/things/t/jobs/get/accepted",
        "$aws/things/t/jobs/j/update/rejected",
        "$aws/things/t/jobs/start-next/accepted",
    ] {
        assert_eq!(parse_topic(a), JobsTopic::Answer, "{a}");
    }
    for bad in [
        "$aws/things/t/jobs/frob",
        "$aws/things/t/jobs/$next/update",
        "$aws/things/t/jobs/a b/get",
        "$aws/things/t.x/jobs/get",
    ] {
        assert!(matches!(parse_topic(bad), JobsTopic::Invalid(_)), "{bad}");
    }
}

#[tokio::test]
async fn a_job_reaches_the_device_which_runs_it_to_success() {
    let r = rig_at(tempfile::tempdir().unwrap());
    r.jobs.create_job(new_job("j1", &["t1"])).await.unwrap();
    r.wait_queued("t1", "j1").await;
    // notify and notify-next went out as ordinary publishes
    let (to, n) = r.sent.last_on("/jobs/notify-next").unwrap();
    assert_eq!(to, None);
    assert_eq!(n["execution"]["jobDocument"]["operation"], "reboot");
    assert!(r.sent.last_on("/jobs/notify").is_some());
    r.sent.take();

    r.device(
        "t1",
        "start-next",
        json!({"clientToken": "s", "statusDetails": {"step": "1"}}),
    )
    .await;
    let (to, a) = r.sent.last_on("start-next/accepted").unwrap();
    assert_eq!(
        to.as_deref(),
        Some("t1"),
        "answers go to the requester only"
    );
    assert_eq!(a["execution"]["status"], "IN_PROGRESS");
    assert_eq!(a["execution"]["versionNumber"], 2);
    assert_eq!(a["clientToken"], "s");
    // The head did not change: no notify-next, but notify (a status change).
    assert!(r.sent.last_on("notify-next").is_none());
    r.device(
        "t1",
        "j1/update",
        json!({"status": "SUCCEEDED", "expectedVersion": 2, "includeJobExecutionState": true, "clientToken": "u"}),
    )
    .await;
    let (_, a) = r.sent.last_on("j1/update/accepted").unwrap();
    assert_eq!(a["executionState"]["status"], "SUCCEEDED");
    assert_eq!(a["executionState"]["versionNumber"], 3);
    let (_, next) = r.sent.last_on("notify-next").unwrap();
    assert!(next.get("execution").is_none(), "queue empty: {next}");
    let job = r.jobs.describe_job("j1").unwrap();
    assert_eq!(job["job"]["status"], "COMPLETED");
    assert_eq!(
        job["job"]["jobProcessDetails"]["numberOfSucceededThings"],
        1
    );
    assert!(r.sent.last_on("$aws/events/job/j1/completed").is_some());
    assert!(r
        .sent
        .last_on("$aws/events/jobExecution/j1/succeeded")
        .is_some());
    // A terminal execution refuses changes and describe.
    r.device(
        "t1",
        "j1/update",
        json!({"status": "FAILED", "clientToken": "x"}),
    )
    .await;
    let (_, e) = r.sent.last_on("j1/update/rejected").unwrap();
    assert_eq!(e["code"], "InvalidStateTransition");
    assert_eq!(e["clientToken"], "x");
    r.device("t1", "j1/get", json!({})).await;
    let (_, e) = r.sent.last_on("j1/get/rejected").unwrap();
    assert_eq!(e["code"], "TerminalStateReached");
}

#[tokio::test]
async fn another_thing_cannot_touch_the_execution_and_answer_topics_are_refused() {
    let r = rig_at(tempfile::tempdir().unwrap());
    let msg = Message::from_publish(
        TopicName::try_from("$aws/things/t1/jobs/get").unwrap(),
        Bytes::new(),
        QoS::Level1,
        false,
        PublishProperties::default(),
        1,
    );
    let from = Requester {
        client_id: Arc::from("t2"),
        thing: Some(Arc::from("t2")),
        cert_id: None,
    };
    let out: Arc<dyn Publisher> = r.sent.clone();
    assert!(matches!(
        r.jobs.handle(
            ServiceRequest {
                message: &msg,
                from: &from
            },
            &out
        ),
        Handled::Refused {
            code: RefuseCode::NotAuthorized,
            ..
        }
    ));
    assert_eq!(
        r.try_device("t1", "notify-next", json!({})).await,
        Some(RefuseCode::NotAuthorized)
    );
}

#[tokio::test]
async fn cancel_takes_queued_executions_and_in_progress_ones_only_with_force() {
    let r = rig_at(tempfile::tempdir().unwrap());
    r.jobs.create_job(new_job("j", &["a", "b"])).await.unwrap();
    r.wait_queued("a", "j").await;
    r.wait_queued("b", "j").await;
    r.device("a", "j/update", json!({"status": "IN_PROGRESS"}))
        .await;
    r.jobs.cancel_job("j", false, None, None).await.unwrap();
    for _ in 0..100 {
        if r.jobs.describe_execution("b", "j").unwrap()["execution"]["status"] == "CANCELED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.jobs.describe_execution("b", "j").unwrap()["execution"]["status"],
        "CANCELED"
    );
    assert_eq!(
        r.jobs.describe_execution("a", "j").unwrap()["execution"]["status"],
        "IN_PROGRESS"
    );
    let e = r.jobs.cancel_execution("a", "j", false).await.unwrap_err();
    assert_eq!(e.code, "InvalidStateTransition");
    let v = r.jobs.cancel_execution("a", "j", true).await.unwrap();
    assert_eq!(v["status"], "CANCELED");
    assert_eq!(
        r.jobs.describe_execution("a", "j").unwrap()["execution"]["forceCanceled"],
        true
    );
    // the device can no longer update it
    r.device("a", "j/update", json!({"status": "SUCCEEDED"}))
        .await;
    assert_eq!(
        r.sent.last_on("j/update/rejected").unwrap().1["code"],
        "InvalidStateTransition"
    );
    r.jobs.delete_job("j", false).await.unwrap();
    assert!(r.jobs.describe_job("j").is_err());
    assert!(r.jobs.describe_execution("a", "j").is_err());
}

#[tokio::test]
async fn executions_and_rollouts_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let dir = {
        let r = rig_at(dir);
        let mut job = new_job("slow", &["t1", "t2", "t3"]);
        // One a minute: the first is created at once, the rest wait.
        job.max_per_minute = Some(1);
        r.jobs.create_job(job).await.unwrap();
        r.jobs.create_job(new_job("fast", &["t1"])).await.unwrap();
        r.wait_queued("t1", "fast").await;
        r.wait_queued("t1", "slow").await;
        r.device(
            "t1",
            "fast/update",
            json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 5}),
        )
        .await;
        assert!(r.jobs.describe_execution("t2", "slow").is_err());
        r.dir
    };
    let r = rig_at(dir);
    let e = r.jobs.describe_execution("t1", "fast").unwrap();
    assert_eq!(e["execution"]["status"], "IN_PROGRESS");
    assert_eq!(e["execution"]["versionNumber"], 2);
    // The slow rollout resumed: t2 gets its execution without waiting a minute.
    r.wait_queued("t2", "slow").await;
    let job = r.jobs.describe_job("slow").unwrap();
    assert_eq!(job["job"]["jobProcessDetails"]["numberOfQueuedThings"], 2);
    // $next order: the in-progress one first.
    r.device("t1", "$next/get", json!({"clientToken": "n"}))
        .await;
    let (_, a) = r.sent.last_on("$next/get/accepted").unwrap();
    assert_eq!(a["execution"]["jobId"], "fast");
    r.device("t1", "get", json!({})).await;
    let (_, a) = r.sent.last_on("jobs/get/accepted").unwrap();
    assert_eq!(a["inProgressJobs"][0]["jobId"], "fast");
    assert_eq!(a["queuedJobs"][0]["jobId"], "slow");
}

#[tokio::test]
async fn an_overdue_step_timer_times_the_execution_out() {
    let r = rig_at(tempfile::tempdir().unwrap());
    r.jobs.create_job(new_job("j", &["t"])).await.unwrap();
    r.wait_queued("t", "j").await;
    r.device("t", "start-next", json!({"stepTimeoutInMinutes": 1}))
        .await;
    // Move the deadline into the past, as if a minute went by.
    {
        let mut things = r.jobs.inner.things.lock();
        let e = things.get_mut("t").unwrap().execs.get_mut("j").unwrap();
        e.step_deadline = Some(now_secs() - 1);
    }
    r.jobs.inner.tick();
    for _ in 0..100 {
        if r.jobs.describe_execution("t", "j").unwrap()["execution"]["status"] == "TIMED_OUT" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.jobs.describe_execution("t", "j").unwrap()["execution"]["status"],
        "TIMED_OUT"
    );
    assert!(r
        .sent
        .last_on("$aws/events/jobExecution/j/timed_out")
        .is_some());
}

#[tokio::test]
async fn bad_jobs_are_refused() {
    let r = rig_at(tempfile::tempdir().unwrap());
    assert_eq!(
        r.jobs
            .create_job(new_job("a b", &["t"]))
            .await
            .unwrap_err()
            .code,
        "InvalidRequest"
    );
    assert_eq!(
        r.jobs.create_job(new_job("j", &[])).await.unwrap_err().code,
        "InvalidRequest"
    );
    let mut big = new_job("big", &["t"]);
    big.document = json!({"blob": "x".repeat(MAX_DOCUMENT_BYTES)});
    assert_eq!(
        r.jobs.create_job(big).await.unwrap_err().code,
        "InvalidRequest"
    );
    r.jobs.create_job(new_job("j", &["t"])).await.unwrap();
    assert_eq!(
        r.jobs
            .create_job(new_job("j", &["t"]))
            .await
            .unwrap_err()
            .code,
        "ResourceAlreadyExists"
    );
    r.wait_queued("t", "j").await;
    r.device(
        "t",
        "j/update",
        json!({"status": "DONE", "clientToken": "c"}),
    )
    .await;
    let (_, e) = r.sent.last_on("j/update/rejected").unwrap();
    assert_eq!(
        (e["code"].as_str(), e["clientToken"].as_str()),
        (Some("InvalidRequest"), Some("c"))
    );
    r.device("t", "nope/update", json!({"status": "SUCCEEDED"}))
        .await;
    assert_eq!(
        r.sent.last_on("nope/update/rejected").unwrap().1["code"],
        "ResourceNotFound"
    );
}

#[tokio::test]
async fn a_failed_execution_is_retried_with_a_new_execution_number() {
    let r = rig_at(tempfile::tempdir().unwrap());
    let mut job = new_job("j", &["t"]);
    job.retry = vec![RetryCriteria {
        failure_type: FailureType::Failed,
        retries: 1,
    }];
    r.jobs.create_job(job).await.unwrap();
    r.wait_queued("t", "j").await;
    r.device("t", "j/update", json!({"status": "FAILED"})).await;
    let mut e = Value::Null;
    for _ in 0..100 {
        e = r.jobs.describe_execution("t", "j").unwrap();
        if e["execution"]["executionNumber"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(e["execution"]["executionNumber"], 2, "{e}");
    assert_eq!(e["execution"]["status"], "QUEUED");
    assert_eq!(
        r.jobs.describe_job("j").unwrap()["job"]["status"],
        "IN_PROGRESS",
        "not complete while retrying"
    );
    // The second failure is final: no retry left, the job completes.
    r.device("t", "j/update", json!({"status": "FAILED"})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = r.jobs.describe_execution("t", "j").unwrap();
    assert_eq!(
        (
            e["execution"]["executionNumber"].as_u64(),
            e["execution"]["status"].as_str()
        ),
        (Some(2), Some("FAILED"))
    );
    assert_eq!(
        r.jobs.describe_job("j").unwrap()["job"]["status"],
        "COMPLETED"
    );
}

#[tokio::test]
async fn a_job_is_aborted_when_too_many_executions_fail() {
    let r = rig_at(tempfile::tempdir().unwrap());
    let mut job = new_job("j", &["a", "b", "c", "d"]);
    job.abort = vec![AbortCriteria {
        failure_type: FailureType::All,
        min_executed: 2,
        threshold_percent: 50.0,
    }];
    r.jobs.create_job(job).await.unwrap();
    for t in ["a", "b", "c", "d"] {
        r.wait_queued(t, "j").await;
    }
    r.device("a", "j/update", json!({"status": "FAILED"})).await;
    assert_eq!(
        r.jobs.describe_job("j").unwrap()["job"]["status"],
        "IN_PROGRESS",
        "one executed: under the minimum"
    );
    r.device("b", "j/update", json!({"status": "REJECTED"}))
        .await;
    let mut j = Value::Null;
    for _ in 0..100 {
        j = r.jobs.describe_job("j").unwrap();
        if j["job"]["jobProcessDetails"]["numberOfCanceledThings"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(j["job"]["status"], "CANCELED", "{j}");
    assert_eq!(j["job"]["reasonCode"], "ABORTED");
    assert_eq!(
        j["job"]["jobProcessDetails"]["numberOfCanceledThings"], 2,
        "{j}"
    );
}

#[tokio::test]
async fn a_continuous_job_reaches_things_that_join_its_group_and_leaves_those_that_go() {
    let r = rig_at(tempfile::tempdir().unwrap());
    let mut job = new_job("cont", &["t1"]);
    job.groups = vec!["fleet".into()];
    job.continuous = true;
    r.jobs.create_job(job).await.unwrap();
    r.wait_queued("t1", "cont").await;
    // t2 joins a child group of "fleet": the ancestors include "fleet".
    r.jobs
        .thing_joined("t2", &["fleet/eu".into(), "fleet".into()])
        .await;
    r.wait_queued("t2", "cont").await;
    // Unrelated groups do nothing.
    r.jobs.thing_joined("t3", &["other".into()]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(r.jobs.describe_execution("t3", "cont").is_err());
    // Every execution ends, yet a continuous job stays in progress.
    for t in ["t1", "t2"] {
        r.device(t, "cont/update", json!({"status": "SUCCEEDED"}))
            .await;
    }
    assert_eq!(
        r.jobs.describe_job("cont").unwrap()["job"]["status"],
        "IN_PROGRESS"
    );
    assert_eq!(
        r.jobs.describe_job("cont").unwrap()["job"]["targetSelection"],
        "CONTINUOUS"
    );
    // A thing that leaves the group before running it: REMOVED.
    r.jobs.thing_joined("t4", &["fleet".into()]).await;
    r.wait_queued("t4", "cont").await;
    r.jobs.thing_left("t4", &["fleet".into()], &[]).await;
    for _ in 0..100 {
        if r.jobs.describe_execution("t4", "cont").unwrap()["execution"]["status"] == "REMOVED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.jobs.describe_execution("t4", "cont").unwrap()["execution"]["status"],
        "REMOVED"
    );
}
