#!/usr/bin/env python3
"""A device using the Jobs clients of the AWS IoT Device SDK v2 for Python (awsiotsdk),
pointed at fleetcore with only the endpoint and the CA changed; the backend half (creating
jobs) uses fleetcore's admin API over HTTP, as the SDK's own sample uses boto3.

Before it runs, the thing has one QUEUED job, --first-job, created while it was offline.

--client v2: `IotJobsClientV2` over MQTT 5: get pending, start-next, a stale
expectedVersion (VersionMismatch), update to SUCCEEDED with statusDetails, the
notify-next stream (empty queue, then a job created while connected), describe with the
document, REJECTED.
--client v1: `IotJobsClient` over MQTT 3.1.1, the SDK sample's flow: subscribe
notify-next, start-next, update to SUCCEEDED.

Prints `ok NAME detail` / `fail NAME detail`; exit 0 only if every check passed; exit 10
when awsiotsdk is missing.
"""

import argparse
import json
import queue
import sys
import threading
import time
import urllib.request

try:
    from awscrt import mqtt, mqtt5, mqtt_request_response
    from awsiot import iotjobs, mqtt5_client_builder, mqtt_connection_builder
    import awsiot
except ImportError:
    print("fail import awsiotsdk is not installed: python3 -m pip install awsiotsdk")
    sys.exit(10)

from checks import check, run

TIMEOUT = 10.0


def create_job(a, job_id, doc):
    req = urllib.request.Request(
        a.admin_url + "/jobs/" + job_id, method="PUT",
        data=json.dumps({"targets": [a.thing], "document": doc}).encode(),
        headers={"Authorization": "Bearer " + a.token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.status


def run_v2(a):
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.thing,
        on_lifecycle_connection_success=lambda _d: connected.set())
    client.start()
    check("v2.connect", connected.wait(TIMEOUT))
    jobs = iotjobs.IotJobsClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=int(TIMEOUT)))
    thing = a.thing

    nexts = queue.Queue()
    up = threading.Event()

    def status(ev):
        if ev.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            up.set()

    stream = jobs.create_next_job_execution_changed_stream(
        iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
        awsiot.ServiceStreamOptions(incoming_event_listener=nexts.put, subscription_status_listener=status))
    stream.open()
    check("v2.notify_next_subscribed", up.wait(TIMEOUT))

    pending = jobs.get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(thing_name=thing)).result(TIMEOUT)
    queued = [j.job_id for j in (pending.queued_jobs or [])]
    check("v2.get_pending", queued == [a.first_job] and not pending.in_progress_jobs, str(queued))

    started = jobs.start_next_pending_job_execution(iotjobs.StartNextPendingJobExecutionRequest(
        thing_name=thing, status_details={"step": "downloading"})).result(TIMEOUT)
    ex = started.execution
    check("v2.start_next", ex is not None and ex.job_id == a.first_job and ex.status == "IN_PROGRESS"
          and ex.version_number == 2 and ex.job_document == {"operation": "reboot"}
          and ex.status_details == {"step": "downloading"} and ex.queued_at is not None,
          "%s %s v%s" % (ex and ex.job_id, ex and ex.status, ex and ex.version_number))

    try:
        jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id=a.first_job, status="SUCCEEDED", expected_version=1)).result(TIMEOUT)
        check("v2.version_mismatch", False, "accepted")
    except awsiot.V2ServiceException as e:
        err = e.modeled_error
        check("v2.version_mismatch", err is not None and err.code == "VersionMismatch"
              and err.execution_state is not None and err.execution_state.version_number == 2
              and bool(err.client_token), "%s" % (err and err.code))

    res = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=thing, job_id=a.first_job, status="SUCCEEDED", expected_version=2,
        status_details={"result": "rebooted"}, include_job_execution_state=True)).result(TIMEOUT)
    st = res.execution_state
    check("v2.update_succeeded", st is not None and st.status == "SUCCEEDED" and st.version_number == 3
          and st.status_details == {"result": "rebooted"}, str(st and st.status))

    # The queue emptied: notify-next without an execution.
    try:
        ev = nexts.get(timeout=TIMEOUT)
        check("v2.notify_next_empty", ev.execution is None and ev.timestamp is not None)
    except queue.Empty:
        check("v2.notify_next_empty", False, "no event")

    # A job created while the device is connected reaches it on notify-next.
    check("v2.backend_creates_job", create_job(a, "job-live", {"operation": "collect-logs"}) == 201)
    try:
        ev = nexts.get(timeout=TIMEOUT)
        check("v2.notify_next_new_job", ev.execution is not None and ev.execution.job_id == "job-live"
              and ev.execution.job_document == {"operation": "collect-logs"}, str(ev.execution and ev.execution.job_id))
    except queue.Empty:
        check("v2.notify_next_new_job", False, "no event")

    d = jobs.describe_job_execution(iotjobs.DescribeJobExecutionRequest(
        thing_name=thing, job_id="$next")).result(TIMEOUT)
    check("v2.describe_next", d.execution is not None and d.execution.job_id == "job-live"
          and d.execution.status == "QUEUED" and d.execution.job_document == {"operation": "collect-logs"})

    res = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=thing, job_id="job-live", status="REJECTED",
        include_job_execution_state=True)).result(TIMEOUT)
    check("v2.reject", res.execution_state is not None and res.execution_state.status == "REJECTED")
    try:
        jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id="job-live", status="IN_PROGRESS")).result(TIMEOUT)
        check("v2.terminal_is_final", False, "accepted")
    except awsiot.V2ServiceException as e:
        check("v2.terminal_is_final", e.modeled_error is not None
              and e.modeled_error.code == "InvalidStateTransition", str(e.modeled_error and e.modeled_error.code))
    del stream
    client.stop()


def run_v1(a):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.thing, clean_session=True, keep_alive_secs=30)
    conn.connect().result(TIMEOUT)
    check("v1.connect", True)
    jobs = iotjobs.IotJobsClient(conn)
    thing = a.thing
    q1 = mqtt.QoS.AT_LEAST_ONCE
    got = {k: queue.Queue() for k in ["next", "start_ok", "start_err", "upd_ok", "upd_err"]}
    subs = [
        jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), q1, got["next"].put),
        jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), q1, got["start_ok"].put),
        jobs.subscribe_to_start_next_pending_job_execution_rejected(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), q1, got["start_err"].put),
        jobs.subscribe_to_update_job_execution_accepted(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), q1, got["upd_ok"].put),
        jobs.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), q1, got["upd_err"].put),
    ]
    granted = [fut.result(TIMEOUT) for fut, _topic in subs]
    check("v1.subscribe", all(g is not None for g in granted), str(granted))

    def take(k):
        try:
            return got[k].get(timeout=TIMEOUT)
        except queue.Empty:
            return None

    jobs.publish_start_next_pending_job_execution(iotjobs.StartNextPendingJobExecutionRequest(
        thing_name=thing, client_token="s1"), q1).result(TIMEOUT)
    r = take("start_ok")
    check("v1.start_next", r is not None and r.client_token == "s1" and r.execution is not None
          and r.execution.job_id == a.first_job and r.execution.status == "IN_PROGRESS", str(r and r.execution))
    jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=thing, job_id=a.first_job, status="SUCCEEDED", client_token="u1",
        status_details={"result": "done"}), q1).result(TIMEOUT)
    r = take("upd_ok")
    check("v1.update_accepted", r is not None and r.client_token == "u1")
    r = take("next")
    check("v1.notify_next_empty", r is not None and r.execution is None)
    jobs.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=thing, job_id=a.first_job, status="FAILED", client_token="u2"), q1).result(TIMEOUT)
    r = take("upd_err")
    check("v1.update_terminal_rejected", r is not None and r.code == "InvalidStateTransition"
          and r.client_token == "u2", str(r and r.code))
    conn.disconnect().result(TIMEOUT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--thing", required=True)
    p.add_argument("--first-job", required=True)
    p.add_argument("--admin-url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--client", choices=["v1", "v2"], required=True)
    a = p.parse_args()
    run((run_v2 if a.client == "v2" else run_v1), a)


if __name__ == "__main__":
    main()
