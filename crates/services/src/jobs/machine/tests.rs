use super::*;

const T: u64 = 1_700_000_000;

fn queued(job: &str, seq: u64) -> Execution {
    Execution::new(job, "thing-1", seq, T)
}

fn req(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!(),
    }
}

#[test]
fn next_is_in_progress_first_then_queue_order() {
    let a = queued("a", 1);
    let mut b = queued("b", 2);
    let c = queued("c", 3);
    let mut done = queued("d", 0);
    done.status = Status::Succeeded;
    b.status = Status::InProgress;
    let all = [a.clone(), b.clone(), c.clone(), done];
    let p = pending(all.iter());
    let ids: Vec<&str> = p.iter().map(|e| e.job_id.as_str()).collect();
    assert_eq!(ids, ["b", "a", "c"]);
    let answer = pending_answer(&p, Some("t"), T);
    assert_eq!(answer["inProgressJobs"][0]["jobId"], "b");
    assert_eq!(answer["queuedJobs"].as_array().unwrap().len(), 2);
    assert_eq!(answer["clientToken"], "t");
    assert!(
        answer["queuedJobs"][0].get("status").is_none(),
        "summaries carry no status"
    );
    let n = notify_body(&p, T);
    assert_eq!(n["jobs"]["IN_PROGRESS"][0]["jobId"], "b");
    assert_eq!(n["jobs"]["QUEUED"][1]["jobId"], "c");
    assert_eq!(notify_body(&[], T), json!({"timestamp": T, "jobs": {}}));
}

#[test]
fn start_next_moves_the_head_to_in_progress_once() {
    let e = queued("a", 1);
    let r = req(json!({"statusDetails": {"step": "download"}, "stepTimeoutInMinutes": 5}));
    let (started, changed) = start_next(Some(&e), &r, Some(60), T).unwrap().unwrap();
    assert!(changed);
    assert_eq!(started.status, Status::InProgress);
    assert_eq!(started.version, 2);
    assert_eq!(started.started_at, Some(T));
    assert_eq!(started.step_deadline, Some(T + 300));
    assert_eq!(started.in_progress_deadline, Some(T + 3600));
    assert_eq!(started.deadline(), Some(T + 300));
    assert_eq!(started.status_details["step"], "download");
    // Again: returned as it is, details unchanged.
    let again = req(json!({"statusDetails": {"step": "other"}}));
    let (same, changed) = start_next(Some(&started), &again, None, T + 1)
        .unwrap()
        .unwrap();
    assert!(!changed);
    assert_eq!(same, started);
    assert!(start_next(None, &again, None, T).unwrap().is_none());
}

#[test]
fn updates_follow_the_state_machine() {
    let e = queued("a", 1);
    let u = |v: Value| parse_update(&req(v)).unwrap();
    let p = update(
        &e,
        &u(json!({"status": "IN_PROGRESS", "statusDetails": {"pct": "10"}})),
        None,
        T,
    )
    .unwrap();
    assert_eq!((p.status, p.version), (Status::InProgress, 2));
    let p2 = update(
        &p,
        &u(json!({"status": "IN_PROGRESS", "statusDetails": {"pct": "50"}})),
        None,
        T,
    )
    .unwrap();
    assert_eq!((p2.version, p2.status_details["pct"].as_str()), (3, "50"));
    let done = update(&p2, &u(json!({"status": "SUCCEEDED"})), None, T).unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert_eq!(
        done.status_details["pct"], "50",
        "details unchanged when not given"
    );
    let err = update(&done, &u(json!({"status": "IN_PROGRESS"})), None, T).unwrap_err();
    assert_eq!(err.code, "InvalidStateTransition");
    assert_eq!(err.execution_state.unwrap()["status"], "SUCCEEDED");
    // QUEUED may be rejected directly.
    let r = update(&e, &u(json!({"status": "REJECTED"})), None, T).unwrap();
    assert_eq!(r.status, Status::Rejected);
}

#[test]
fn expected_version_and_execution_number_are_checked() {
    let e = queued("a", 1);
    let u = parse_update(&req(json!({"status": "IN_PROGRESS", "expectedVersion": 5}))).unwrap();
    let err = update(&e, &u, None, T).unwrap_err();
    assert_eq!(err.code, "VersionMismatch");
    assert_eq!(err.execution_state.as_ref().unwrap()["versionNumber"], 1);
    let body = err.to_json(Some("c"), T);
    assert_eq!(body["clientToken"], "c");
    assert_eq!(body["executionState"]["status"], "QUEUED");
    let u = parse_update(&req(json!({"status": "IN_PROGRESS", "executionNumber": 2}))).unwrap();
    assert_eq!(
        update(&e, &u, None, T).unwrap_err().code,
        "ResourceNotFound"
    );
}

#[test]
fn bad_update_requests_are_invalid() {
    for bad in [
        json!({}),
        json!({"status": 1}),
        json!({"status": "DONE"}),
        json!({"status": "CANCELED"}),
        json!({"status": "TIMED_OUT"}),
        json!({"status": "SUCCEEDED", "statusDetails": {"k": 1}}),
        json!({"status": "SUCCEEDED", "statusDetails": {"bad key": "v"}}),
        json!({"status": "SUCCEEDED", "statusDetails": {"k": ""}}),
        json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}),
        json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10081}),
        json!({"status": "IN_PROGRESS", "expectedVersion": "1"}),
        json!({"status": "IN_PROGRESS", "includeJobDocument": "yes"}),
    ] {
        let e = parse_update(&req(bad.clone())).unwrap_err();
        assert_eq!(e.code, "InvalidRequest", "{bad}");
    }
    assert_eq!(body(b"{nope").unwrap_err().code, "InvalidJson");
    assert_eq!(body(b"[1]").unwrap_err().code, "InvalidJson");
    assert!(body(b"").unwrap().is_empty());
    assert!(token(&req(json!({"clientToken": "x".repeat(65)}))).is_err());
}

#[test]
fn the_service_cancels_queued_and_only_with_force_in_progress() {
    let q = queued("a", 1);
    let c = end(&q, Status::Canceled, false, T).unwrap();
    assert_eq!(
        (c.status, c.version, c.force_canceled),
        (Status::Canceled, 2, false)
    );
    let mut p = q.clone();
    p.status = Status::InProgress;
    assert_eq!(
        end(&p, Status::Canceled, false, T).unwrap_err().code,
        "InvalidStateTransition"
    );
    let f = end(&p, Status::Canceled, true, T).unwrap();
    assert!(f.force_canceled);
    assert_eq!(
        end(&f, Status::TimedOut, false, T).unwrap_err().code,
        "InvalidStateTransition"
    );
    let t = end(&p, Status::TimedOut, false, T).unwrap();
    assert_eq!(t.status, Status::TimedOut);
}

#[test]
fn executions_show_iot_cores_fields_and_notify_next_carries_the_document() {
    let mut e = queued("job-1", 1);
    e.status_details.insert("k".into(), "v".into());
    let doc = json!({"operation": "reboot"});
    let j = e.to_json(Some(&doc));
    assert_eq!(j["jobDocument"], doc);
    assert_eq!(j["status"], "QUEUED");
    assert_eq!(j["versionNumber"], 1);
    assert_eq!(j["executionNumber"], 1);
    assert_eq!(j["queuedAt"], T);
    assert!(j.get("startedAt").is_none());
    assert_eq!(
        notify_next_body(Some((&e, &doc)), T)["execution"]["jobId"],
        "job-1"
    );
    assert_eq!(notify_next_body(None, T), json!({ "timestamp": T }));
}

#[test]
fn job_ids_follow_iot_cores_pattern() {
    assert!(valid_job_id("fw-update_2"));
    for bad in ["", "a b", "a/b", "$next", &"x".repeat(65)] {
        assert!(!valid_job_id(bad), "{bad}");
    }
}

#[test]
fn statuses_serialize_as_iot_core_names() {
    for s in Status::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        assert_eq!(Status::parse(s.as_str()), Some(s));
    }
}
