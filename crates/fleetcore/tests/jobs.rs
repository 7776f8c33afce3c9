//! Jobs end to end: the AWS IoT Device SDK v2 for Python's jobs clients (v2 over MQTT 5,
//! v1 over MQTT 3.1.1) unchanged against jobs created on the admin API, the control
//! plane over HTTP, and kill -9 in the middle of a rate-limited rollout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Each device may use its own jobs topics only.
const JOBS_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}" },
    { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
      "Resource": "arn:aws:iot:*:*:topic/$aws/things/${iot:Certificate.Subject.CommonName}/jobs/*" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/$aws/things/${iot:Certificate.Subject.CommonName}/jobs/*" }
  ]
}"#;

fn ok(r: HttpResponse, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    if r.text().is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

fn thing(broker: &TestBroker, name: &str) {
    ok(
        broker.admin("POST", "/things", Some(&json!({ "name": name }))),
        201,
    );
}

fn run_sdk(broker: &TestBroker, client: &str) -> String {
    let mut cmd = tls_client_script(broker, "awsiot_jobs.py", &broker.pki().thing1);
    cmd.args([
        "--thing",
        "thing-1",
        "--first-job",
        "job-offline",
        "--client",
        client,
    ])
    .args([
        "--admin-url",
        &broker.admin_url(),
        "--token",
        &broker.admin_token(),
    ]);
    let out = run(cmd, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_ne!(
        out.status.code(),
        Some(10),
        "awsiotsdk is missing\n{}",
        describe(&out)
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!stdout.contains("fail "), "{stdout}");
    stdout
}

/// A broker with thing-1 registered and one job queued for it while it is offline.
fn broker_with_offline_job() -> TestBroker {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(JOBS_POLICY).admin());
    thing(&broker, "thing-1");
    ok(
        broker.admin(
            "PUT",
            "/jobs/job-offline",
            Some(
                &json!({"targets": ["arn:aws:iot:eu-west-1:123456789012:thing/thing-1"],
                         "document": "{\"operation\":\"reboot\"}", "description": "reboot"}),
            ),
        ),
        201,
    );
    broker
}

#[test]
fn sdk_v2_jobs_client_over_mqtt5_runs_jobs_created_on_the_admin_api() {
    let broker = broker_with_offline_job();
    let out = run_sdk(&broker, "v2");
    for c in [
        "v2.get_pending",
        "v2.start_next",
        "v2.version_mismatch",
        "v2.update_succeeded",
        "v2.notify_next_empty",
        "v2.notify_next_new_job",
        "v2.describe_next",
        "v2.terminal_is_final",
    ] {
        assert!(out.contains(&format!("ok {c}")), "{c} missing:\n{out}");
    }
    // The control plane saw it all.
    let job = ok(broker.admin("GET", "/jobs/job-offline", None), 200);
    assert_eq!(job["job"]["status"], "COMPLETED", "{job}");
    assert_eq!(
        job["job"]["jobProcessDetails"]["numberOfSucceededThings"],
        1
    );
    let ex = ok(
        broker.admin("GET", "/things/thing-1/jobs/job-offline", None),
        200,
    );
    assert_eq!(ex["execution"]["statusDetails"]["result"], "rebooted");
    let live = ok(broker.admin("GET", "/jobs/job-live/things", None), 200);
    assert_eq!(
        live["executionSummaries"][0]["jobExecutionSummary"]["status"],
        "REJECTED"
    );
    broker.assert_no_panic_logged();
}

#[test]
fn sdk_v1_jobs_client_over_mqtt311_follows_the_samples_flow() {
    let broker = broker_with_offline_job();
    let out = run_sdk(&broker, "v1");
    assert!(out.contains("ok v1.update_terminal_rejected"), "{out}");
    broker.assert_no_panic_logged();
}

#[test]
fn the_control_plane_refuses_bad_jobs_and_cancels_and_deletes() {
    let broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b"] {
        thing(&broker, t);
    }
    let bad = |body: Value, status: u16| {
        let r = broker.admin("PUT", "/jobs/j1", Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.text());
    };
    bad(json!({"targets": ["nobody"], "document": {}}), 404);
    bad(json!({"targets": [], "document": {}}), 400);
    bad(json!({"targets": ["a"], "document": "not json"}), 400);
    bad(json!({"targets": ["a"], "document": [1]}), 400);
    // An unknown group is 404; an ARN of anything but a thing or a group is 400.
    bad(
        json!({"targets": ["arn:aws:iot:r:1:thinggroup/g"], "document": {}}),
        404,
    );
    bad(
        json!({"targets": ["arn:aws:iot:r:1:policy/p"], "document": {}}),
        400,
    );
    bad(
        json!({"targets": ["a"], "document": {"x": "y".repeat(33 * 1024)}}),
        400,
    );
    bad(
        json!({"targets": ["a"], "document": {}, "targetSelection": "CONTINUOUS"}),
        400,
    );
    bad(json!({"targets": ["a"], "document": {}, "bogus": 1}), 400);
    bad(
        json!({"targets": ["a"], "document": {}, "abortConfig": {"criteriaList": [
        {"action": "PAUSE", "failureType": "FAILED", "minNumberOfExecutedThings": 1, "thresholdPercentage": 10}]}}),
        400,
    );
    bad(
        json!({"targets": ["a"], "document": {}, "jobExecutionsRetryConfig": {"criteriaList": [
        {"failureType": "FAILED", "numberOfRetries": 11}]}}),
        400,
    );
    let r = broker.admin(
        "PUT",
        "/jobs/bad id",
        Some(&json!({"targets": ["a"], "document": {}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    ok(
        broker.admin(
            "PUT",
            "/jobs/j1",
            Some(&json!({"targets": ["a", "b"], "document": {"op": 1}})),
        ),
        201,
    );
    let again = broker.admin(
        "PUT",
        "/jobs/j1",
        Some(&json!({"targets": ["a"], "document": {}})),
    );
    assert_eq!(again.status, 409, "{}", again.text());
    wait_for(&broker, "/jobs/j1", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 2
    });
    let doc = ok(broker.admin("GET", "/jobs/j1/job-document", None), 200);
    assert_eq!(doc["document"], "{\"op\":1}");
    let list = ok(broker.admin("GET", "/jobs?status=IN_PROGRESS", None), 200);
    assert_eq!(list["jobs"][0]["jobId"], "j1");
    let forthing = ok(broker.admin("GET", "/things/a/jobs", None), 200);
    assert_eq!(forthing["executionSummaries"][0]["jobId"], "j1");
    ok(
        broker.admin("PUT", "/things/a/jobs/j1/cancel", Some(&json!({}))),
        200,
    );
    let r = broker.admin("PUT", "/things/a/jobs/j1/cancel", Some(&json!({})));
    assert_eq!(r.status, 409, "{}", r.text());
    ok(
        broker.admin(
            "PUT",
            "/jobs/j1/cancel",
            Some(&json!({"comment": "wrong build"})),
        ),
        200,
    );
    wait_for(&broker, "/jobs/j1", |j| {
        j["job"]["jobProcessDetails"]["numberOfCanceledThings"] == 2
    });
    let j = ok(broker.admin("GET", "/jobs/j1", None), 200);
    assert_eq!(
        (j["job"]["status"].as_str(), j["job"]["comment"].as_str()),
        (Some("CANCELED"), Some("wrong build"))
    );
    ok(broker.admin("DELETE", "/jobs/j1", None), 204);
    let r = broker.admin("GET", "/jobs/j1", None);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = broker.admin("GET", "/things/a/jobs/j1", None);
    assert_eq!(r.status, 404, "{}", r.text());
    broker.assert_no_panic_logged();
}

/// Polls GET `path` until `pred` holds (at most 30 s).
fn wait_for(broker: &TestBroker, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = ok(broker.admin("GET", path, None), 200);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{path} never got there: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_rate_limited_rollout_of_2000_survives_kill_9_without_duplicates() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    let n = 2000;
    for i in 0..n {
        thing(&broker, &format!("dev-{i}"));
    }
    let targets: Vec<String> = (0..n).map(|i| format!("dev-{i}")).collect();
    // 6,000 a minute: 2,000 executions take about 20 s.
    ok(
        broker.admin(
            "PUT",
            "/jobs/fleet-update",
            Some(
                &json!({"targets": targets, "document": {"operation": "update"},
                         "jobExecutionsRolloutConfig": {"maximumPerMinute": 6000}}),
            ),
        ),
        201,
    );
    let part = wait_for(&broker, "/jobs/fleet-update", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"].as_u64() > Some(200)
    });
    let before = part["job"]["jobProcessDetails"]["numberOfQueuedThings"]
        .as_u64()
        .unwrap();
    // A device update accepted before the crash (dev-0 is first in the rollout).
    let ex = ok(
        broker.admin(
            "PUT",
            "/things/dev-0/jobs/fleet-update/cancel",
            Some(&json!({})),
        ),
        200,
    );
    assert_eq!(ex["execution"]["status"], "CANCELED");
    broker.kill9();
    broker.restart();
    let after = ok(broker.admin("GET", "/jobs/fleet-update", None), 200);
    let queued_now = after["job"]["jobProcessDetails"]["numberOfQueuedThings"]
        .as_u64()
        .unwrap();
    assert!(
        queued_now + 1 >= before.min(n as u64),
        "executions created before the kill were kept: {before} → {queued_now}"
    );
    assert!(
        queued_now < n as u64 - 1,
        "the rollout was still running when killed: {after}"
    );
    let done = wait_for(&broker, "/jobs/fleet-update", |j| {
        let d = &j["job"]["jobProcessDetails"];
        d["numberOfQueuedThings"].as_u64().unwrap() + d["numberOfCanceledThings"].as_u64().unwrap()
            == n as u64
    });
    assert_eq!(
        done["job"]["jobProcessDetails"]["numberOfCanceledThings"], 1,
        "{done}"
    );
    let list = ok(broker.admin("GET", "/jobs/fleet-update/things", None), 200);
    assert_eq!(
        list["executionSummaries"].as_array().unwrap().len(),
        n,
        "one execution per thing"
    );
    let ex = ok(
        broker.admin("GET", "/things/dev-0/jobs/fleet-update", None),
        200,
    );
    assert_eq!(
        ex["execution"]["status"], "CANCELED",
        "an accepted change survived kill -9"
    );
    assert_eq!(ex["execution"]["versionNumber"], 2);
    broker.assert_no_panic_logged();
}

#[test]
fn the_cli_creates_follows_cancels_and_deletes_jobs() {
    let broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b"] {
        thing(&broker, t);
    }
    let (ok_, out, err) = broker.cli_text(&[
        "job",
        "create",
        "upd-1",
        "--target",
        "a",
        "--target",
        "b",
        "--document",
        r#"{"operation":"update","version":"4.12.0"}"#,
        "--description",
        "agent update",
    ]);
    assert!(ok_, "{out}{err}");
    assert!(out.contains("created job upd-1"), "{out}");
    wait_for(&broker, "/jobs/upd-1", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 2
    });
    let (ok_, out, err) = broker.cli_text(&["job", "executions", "upd-1"]);
    assert!(
        ok_ && out.contains("THING")
            && out
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some("QUEUED"))
                .count()
                == 2,
        "{out}{err}"
    );
    let (ok_, out, _) = broker.cli_text(&["job", "executions", "--thing", "a"]);
    assert!(ok_ && out.contains("upd-1"), "{out}");
    let (ok_, out, _) = broker.cli_text(&["job", "document", "upd-1"]);
    assert!(ok_ && out.contains("\"version\": \"4.12.0\""), "{out}");
    let (ok_, out, err) = broker.cli_text(&["job", "cancel", "upd-1", "--comment", "hold"]);
    assert!(ok_, "{out}{err}");
    // --follow ends once no execution is open: it prints the final table.
    let (ok_, out, err) = broker.cli_text(&["job", "describe", "upd-1", "--follow"]);
    assert!(ok_, "{out}{err}");
    assert!(
        out.contains("CANCELED") && out.contains("2/2 executions ended"),
        "{out}{err}"
    );
    let (ok_, out, _) = broker.cli_text(&["--json", "job", "list"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(ok_ && v["jobs"][0]["status"] == "CANCELED", "{out}");
    let (ok_, _, err) =
        broker.cli_text(&["job", "create", "x", "--target", "a", "--document", "[1]"]);
    assert!(!ok_ && err.contains("must be a JSON object"), "{err}");
    let (ok_, _, err) = broker.cli_text(&[
        "job",
        "create",
        "x",
        "--target",
        "nobody",
        "--document",
        "{}",
    ]);
    assert!(
        !ok_ && err.contains("target thing \"nobody\" not found (404)"),
        "{err}"
    );
    let (ok_, out, err) = broker.cli_text(&["job", "delete", "upd-1"]);
    assert!(ok_ && out.contains("deleted job upd-1"), "{out}{err}");
    let (ok_, _, err) = broker.cli_text(&["job", "describe", "upd-1"]);
    assert!(!ok_ && err.contains("(404)"), "{err}");
    broker.assert_no_panic_logged();
}

#[test]
fn an_offline_persistent_session_gets_notify_next_when_it_comes_back() {
    let broker = TestBroker::start(BrokerOpts::new().tls().policy(JOBS_POLICY).admin());
    thing(&broker, "thing-1");
    let pki = broker.pki();
    let device = with(
        &broker.paho_tls(&pki.thing1),
        &[
            "--protocol",
            "3.1.1",
            "--client-id",
            "thing-1",
            "--persistent",
        ],
    );
    paho(
        "subscribe.py",
        &with(
            &device,
            &[
                "--filter",
                "$aws/things/thing-1/jobs/notify-next",
                "--qos",
                "1",
                "--exit-after-subscribe",
            ],
        ),
    )
    .expect_success(STEP);
    ok(
        broker.admin(
            "PUT",
            "/jobs/while-away",
            Some(&json!({"targets": ["thing-1"], "document": {"op": "x"}})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/while-away", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 1
    });
    let mut back = paho(
        "subscribe.py",
        &with(&device, &["--no-subscribe", "--count", "1"]),
    );
    let msg = back.expect_event("message", STEP);
    assert_eq!(msg.get("topic"), "$aws/things/thing-1/jobs/notify-next");
    let body: Value = serde_json::from_str(msg.get("payload")).unwrap();
    assert_eq!(body["execution"]["jobId"], "while-away");
    assert_eq!(body["execution"]["jobDocument"], json!({"op": "x"}));
    back.expect_success(STEP);
    broker.assert_no_panic_logged();
}

#[test]
fn abort_and_retry_configs_act_on_device_failures() {
    let broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b", "c"] {
        thing(&broker, t);
    }
    ok(
        broker.admin(
            "PUT",
            "/jobs/risky",
            Some(&json!({"targets": ["a", "b", "c"], "document": {"op": "flash"},
                "abortConfig": {"criteriaList": [{"action": "CANCEL", "failureType": "ALL",
                    "minNumberOfExecutedThings": 2, "thresholdPercentage": 100}]},
                "jobExecutionsRetryConfig": {"criteriaList": [{"failureType": "TIMED_OUT", "numberOfRetries": 2}]}})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/risky", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 3
    });
    // Two devices fail (anonymous TCP clients act as the thing of their client id).
    for t in ["a", "b"] {
        let topic = format!("$aws/things/{t}/jobs/risky/update");
        mosquitto_pub(&with(
            &broker.mosq_tcp(),
            &[
                "-i",
                t,
                "-t",
                &topic,
                "-m",
                r#"{"status":"FAILED"}"#,
                "-q",
                "1",
            ],
        ));
    }
    let j = wait_for(&broker, "/jobs/risky", |j| {
        j["job"]["status"] == "CANCELED"
            && j["job"]["jobProcessDetails"]["numberOfCanceledThings"] == 1
    });
    assert_eq!(j["job"]["reasonCode"], "ABORTED", "{j}");
    assert_eq!(
        j["job"]["jobProcessDetails"]["numberOfFailedThings"], 2,
        "{j}"
    );
    broker.assert_no_panic_logged();
}

#[test]
fn group_jobs_reach_members_and_descendants_and_continuous_jobs_follow_membership() {
    let broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b", "c", "d"] {
        thing(&broker, t);
    }
    ok(
        broker.admin("POST", "/thing-groups", Some(&json!({"name": "fleet"}))),
        201,
    );
    ok(
        broker.admin(
            "POST",
            "/thing-groups",
            Some(&json!({"name": "fleet-eu", "parent": "fleet"})),
        ),
        201,
    );
    for (g, t) in [("fleet", "a"), ("fleet", "b"), ("fleet-eu", "c")] {
        let r = broker.admin("PUT", &format!("/thing-groups/{g}/things/{t}"), None);
        assert!(r.status / 100 == 2, "{}", r.text());
    }
    let group_arn = "arn:aws:iot:eu-west-1:123456789012:thinggroup/fleet";
    ok(
        broker.admin(
            "PUT",
            "/jobs/grp",
            Some(&json!({"targets": [group_arn], "document": {"op": "x"}})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/grp", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 3
    });
    // a and b answer now; c was offline and answers when it comes back.
    let finish = |t: &str, job: &str| {
        let topic = format!("$aws/things/{t}/jobs/{job}/update");
        mosquitto_pub(&with(
            &broker.mosq_tcp(),
            &[
                "-i",
                t,
                "-t",
                &topic,
                "-m",
                r#"{"status":"SUCCEEDED"}"#,
                "-q",
                "1",
            ],
        ));
    };
    finish("a", "grp");
    finish("b", "grp");
    let j = wait_for(&broker, "/jobs/grp", |j| {
        j["job"]["jobProcessDetails"]["numberOfSucceededThings"] == 2
    });
    assert_eq!(j["job"]["status"], "IN_PROGRESS", "c has not run it yet");
    finish("c", "grp");
    wait_for(&broker, "/jobs/grp", |j| j["job"]["status"] == "COMPLETED");

    // A continuous job on the parent group reaches d when d joins the child group.
    ok(
        broker.admin(
            "PUT",
            "/jobs/cont",
            Some(&json!({"targets": [group_arn], "document": {"op": "y"}, "targetSelection": "CONTINUOUS"})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/cont", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 3
    });
    let r = broker.admin("PUT", "/thing-groups/fleet-eu/things/d", None);
    assert!(r.status / 100 == 2, "{}", r.text());
    let j = wait_for(&broker, "/jobs/cont", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 4
    });
    assert_eq!(j["job"]["targetSelection"], "CONTINUOUS");
    ok(broker.admin("GET", "/things/d/jobs/cont", None), 200);
    // d leaves before running it: REMOVED.
    let r = broker.admin("DELETE", "/thing-groups/fleet-eu/things/d", None);
    assert!(r.status / 100 == 2, "{}", r.text());
    wait_for(&broker, "/things/d/jobs/cont", |e| {
        e["execution"]["status"] == "REMOVED"
    });
    // A continuous job needs a group; an unknown group is 404.
    let bad = broker.admin(
        "PUT",
        "/jobs/c2",
        Some(&json!({"targets": ["a"], "document": {}, "targetSelection": "CONTINUOUS"})),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    let missing = broker.admin(
        "PUT",
        "/jobs/c3",
        Some(&json!({"targets": ["arn:aws:iot:r:1:thinggroup/nope"], "document": {}})),
    );
    assert_eq!(missing.status, 404, "{}", missing.text());
    broker.assert_no_panic_logged();
}

#[test]
fn a_step_timer_set_before_kill_9_times_the_execution_out_after_the_restart() {
    let mut broker = TestBroker::start(BrokerOpts::new().admin());
    thing(&broker, "a");
    ok(
        broker.admin(
            "PUT",
            "/jobs/slow",
            Some(&json!({"targets": ["a"], "document": {}})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/slow", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 1
    });
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &[
            "-i",
            "a",
            "-t",
            "$aws/things/a/jobs/start-next",
            "-m",
            r#"{"stepTimeoutInMinutes":1}"#,
            "-q",
            "1",
        ],
    ));
    let ex = wait_for(&broker, "/things/a/jobs/slow", |e| {
        e["execution"]["status"] == "IN_PROGRESS"
    });
    assert_eq!(ex["execution"]["versionNumber"], 2);
    broker.kill9();
    broker.restart();
    // The timer (one minute, IoT Core's shortest) is in the record and fires after the
    // restart; the tick runs every second.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let e = ok(broker.admin("GET", "/things/a/jobs/slow", None), 200);
        if e["execution"]["status"] == "TIMED_OUT" {
            break;
        }
        assert_eq!(e["execution"]["status"], "IN_PROGRESS", "{e}");
        assert!(Instant::now() < deadline, "never timed out: {e}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let j = ok(broker.admin("GET", "/jobs/slow", None), 200);
    assert_eq!(j["job"]["status"], "COMPLETED");
    assert_eq!(j["job"]["jobProcessDetails"]["numberOfTimedOutThings"], 1);
    broker.assert_no_panic_logged();
}

#[test]
fn cancel_without_force_spares_in_progress_executions_and_force_takes_them() {
    let broker = TestBroker::start(BrokerOpts::new().admin());
    for t in ["a", "b"] {
        thing(&broker, t);
    }
    ok(
        broker.admin(
            "PUT",
            "/jobs/k",
            Some(&json!({"targets": ["a", "b"], "document": {}})),
        ),
        201,
    );
    wait_for(&broker, "/jobs/k", |j| {
        j["job"]["jobProcessDetails"]["numberOfQueuedThings"] == 2
    });
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &[
            "-i",
            "a",
            "-t",
            "$aws/things/a/jobs/k/update",
            "-m",
            r#"{"status":"IN_PROGRESS"}"#,
            "-q",
            "1",
        ],
    ));
    wait_for(&broker, "/things/a/jobs/k", |e| {
        e["execution"]["status"] == "IN_PROGRESS"
    });
    ok(broker.admin("PUT", "/jobs/k/cancel", Some(&json!({}))), 200);
    wait_for(&broker, "/things/b/jobs/k", |e| {
        e["execution"]["status"] == "CANCELED"
    });
    let a = ok(broker.admin("GET", "/things/a/jobs/k", None), 200);
    assert_eq!(
        a["execution"]["status"], "IN_PROGRESS",
        "no force: in progress runs on"
    );
    ok(
        broker.admin("PUT", "/jobs/k/cancel", Some(&json!({"force": true}))),
        200,
    );
    let a = wait_for(&broker, "/things/a/jobs/k", |e| {
        e["execution"]["status"] == "CANCELED"
    });
    assert_eq!(a["execution"]["forceCanceled"], true);
    broker.assert_no_panic_logged();
}
