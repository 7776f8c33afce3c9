#!/usr/bin/env python3
"""A device using the Device Shadow clients of the AWS IoT Device SDK v2 for Python
(awsiotsdk), pointed at fleetcore with only the endpoint and the CA changed.

--client v2: `IotShadowClientV2` (the request-response client) over MQTT 5: update,
get with delta, the delta and update/documents streams, a stale version (409), named
shadow get/update/delete, 404 after delete, clientToken on rejected answers.
--client v1: `IotShadowClient` over MQTT 3.1.1 on the exact topics, with
`desired_is_nullable` clearing the desired section.

The thing must have no shadow yet. Prints one line per check, `ok NAME detail` or
`fail NAME detail`, and exits 0 only if every check passed; exit 10 when awsiotsdk is
missing.
"""

import argparse
import queue
import sys
import threading
import time

try:
    from awscrt import mqtt, mqtt5, mqtt_request_response
    from awsiot import iotshadow, mqtt5_client_builder, mqtt_connection_builder
    import awsiot
except ImportError:
    print("fail import awsiotsdk is not installed: python3 -m pip install awsiotsdk")
    sys.exit(10)

from checks import check, run

TIMEOUT = 10.0


def expect_error(name, fut, code):
    """The future fails with a modeled V2 error of this code, carrying a clientToken."""
    try:
        res = fut.result(TIMEOUT)
        check(name, False, "accepted: " + str(res))
        return None
    except awsiot.V2ServiceException as e:
        err = e.modeled_error
        ok = err is not None and err.code == code and bool(err.client_token)
        check(name, ok, "code=%s message=%r token=%r inner=%r" % (
            getattr(err, "code", None), getattr(err, "message", None),
            getattr(err, "client_token", None), e.inner_error))
        return err


def stream(client, create, request, q):
    """Opens a streaming operation whose events go to q; waits until subscribed."""
    up = threading.Event()

    def status(ev):
        if ev.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            up.set()

    op = create(request, awsiot.ServiceStreamOptions(
        incoming_event_listener=q.put, subscription_status_listener=status))
    op.open()
    return op, up.wait(TIMEOUT)


def run_v2(a):
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.thing,
        on_lifecycle_connection_success=lambda _d: connected.set())
    client.start()
    check("v2.connect", connected.wait(TIMEOUT))
    shadow = iotshadow.IotShadowClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=int(TIMEOUT)))
    thing = a.thing

    deltas, docs = queue.Queue(), queue.Queue()
    d_op, up1 = stream(shadow, shadow.create_shadow_delta_updated_stream,
                       iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing), deltas)
    u_op, up2 = stream(shadow, shadow.create_shadow_updated_stream,
                       iotshadow.ShadowUpdatedSubscriptionRequest(thing_name=thing), docs)
    check("v2.streams_subscribed", up1 and up2)

    res = shadow.update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(desired={"color": "red", "fan": {"speed": 2}}))
    ).result(TIMEOUT)
    check("v2.update_desired", res.version == 1 and res.state.desired == {"color": "red", "fan": {"speed": 2}}
          and res.state.reported is None and res.timestamp is not None, "version=%s" % res.version)

    try:
        ev = deltas.get(timeout=TIMEOUT)
        check("v2.delta_stream", ev.version == 1 and ev.state == {"color": "red", "fan": {"speed": 2}}
              and ev.metadata["color"]["timestamp"] > 0, str(ev.state))
    except queue.Empty:
        check("v2.delta_stream", False, "no delta event")
    try:
        ev = docs.get(timeout=TIMEOUT)
        check("v2.documents_stream", ev.previous is None and ev.current.version == 1
              and ev.current.state.desired["color"] == "red", "current=%s" % ev.current.state.desired)
    except queue.Empty:
        check("v2.documents_stream", False, "no documents event")

    got = shadow.get_shadow(iotshadow.GetShadowRequest(thing_name=thing)).result(TIMEOUT)
    check("v2.get_with_delta", got.version == 1 and got.state.delta == {"color": "red", "fan": {"speed": 2}}
          and got.metadata.desired["fan"]["speed"]["timestamp"] > 0
          and abs(got.timestamp.timestamp() - time.time()) < 120, "delta=%s" % got.state.delta)

    res = shadow.update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"color": "red", "fan": {"speed": 1}}))
    ).result(TIMEOUT)
    check("v2.update_reported", res.version == 2, "version=%s" % res.version)
    try:
        ev = deltas.get(timeout=TIMEOUT)
        check("v2.delta_after_report", ev.version == 2 and ev.state == {"fan": {"speed": 2}}, str(ev.state))
    except queue.Empty:
        check("v2.delta_after_report", False, "no delta event")
    try:
        ev = docs.get(timeout=TIMEOUT)
        check("v2.documents_previous", ev.previous is not None and ev.previous.version == 1
              and ev.current.version == 2 and ev.current.state.reported["fan"]["speed"] == 1)
    except queue.Empty:
        check("v2.documents_previous", False, "no documents event")

    expect_error("v2.stale_version_409", shadow.update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, version=1, state=iotshadow.ShadowState(reported={"x": 1}))), 409)

    # Named shadow: independent of the classic one.
    n = "config"
    expect_error("v2.named_get_before_404", shadow.get_named_shadow(
        iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=n)), 404)
    res = shadow.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=thing, shadow_name=n, state=iotshadow.ShadowState(reported={"interval": 60}))
    ).result(TIMEOUT)
    check("v2.named_update", res.version == 1 and res.state.reported == {"interval": 60})
    got = shadow.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=n)).result(TIMEOUT)
    check("v2.named_get", got.version == 1 and got.state.reported == {"interval": 60} and got.state.delta is None)
    res = shadow.delete_named_shadow(iotshadow.DeleteNamedShadowRequest(
        thing_name=thing, shadow_name=n)).result(TIMEOUT)
    check("v2.named_delete", res.version == 1, "version=%s" % res.version)
    expect_error("v2.named_get_after_delete_404", shadow.get_named_shadow(
        iotshadow.GetNamedShadowRequest(thing_name=thing, shadow_name=n)), 404)

    res = shadow.delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing)).result(TIMEOUT)
    check("v2.delete", res.version == 2, "version=%s" % res.version)
    expect_error("v2.get_after_delete_404", shadow.get_shadow(iotshadow.GetShadowRequest(thing_name=thing)), 404)
    expect_error("v2.delete_again_404", shadow.delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing)), 404)
    # After a delete the version continues.
    res = shadow.update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"back": True}))).result(TIMEOUT)
    check("v2.recreate_continues_version", res.version == 3, "version=%s" % res.version)

    del d_op, u_op
    client.stop()


def run_v1(a):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.thing, clean_session=True, keep_alive_secs=30)
    conn.connect().result(TIMEOUT)
    check("v1.connect", True)
    shadow = iotshadow.IotShadowClient(conn)
    thing = a.thing
    got = {k: queue.Queue() for k in ["upd_ok", "upd_err", "get_ok", "get_err", "delta", "docs"]}
    q1 = mqtt.QoS.AT_LEAST_ONCE
    subs = [
        shadow.subscribe_to_update_shadow_accepted(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), q1, got["upd_ok"].put),
        shadow.subscribe_to_update_shadow_rejected(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), q1, got["upd_err"].put),
        shadow.subscribe_to_get_shadow_accepted(
            iotshadow.GetShadowSubscriptionRequest(thing_name=thing), q1, got["get_ok"].put),
        shadow.subscribe_to_get_shadow_rejected(
            iotshadow.GetShadowSubscriptionRequest(thing_name=thing), q1, got["get_err"].put),
        shadow.subscribe_to_shadow_delta_updated_events(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing), q1, got["delta"].put),
        shadow.subscribe_to_shadow_updated_events(
            iotshadow.ShadowUpdatedSubscriptionRequest(thing_name=thing), q1, got["docs"].put),
    ]
    granted = []
    for fut, topic in subs:
        granted.append((topic, fut.result(TIMEOUT)))
    check("v1.subscribe_exact_topics", all(q is not None for _, q in granted), str(granted))

    def take(name):
        try:
            return got[name].get(timeout=TIMEOUT)
        except queue.Empty:
            return None

    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, client_token="u1",
        state=iotshadow.ShadowState(desired={"mode": "eco"}, reported={"mode": "normal"})), q1).result(TIMEOUT)
    r = take("upd_ok")
    check("v1.update_accepted", r is not None and r.client_token == "u1" and r.version == 1, str(r and r.version))
    r = take("delta")
    check("v1.delta", r is not None and r.state == {"mode": "eco"}, str(r and r.state))
    r = take("docs")
    check("v1.documents", r is not None and r.current.version == 1)

    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, client_token="u2",
        state=iotshadow.ShadowState(desired=None, desired_is_nullable=True)), q1).result(TIMEOUT)
    r = take("upd_ok")
    check("v1.clear_desired_accepted", r is not None and r.client_token == "u2" and r.version == 2)
    take("docs")
    shadow.publish_get_shadow(iotshadow.GetShadowRequest(thing_name=thing, client_token="g1"), q1).result(TIMEOUT)
    r = take("get_ok")
    check("v1.get_after_clear", r is not None and r.client_token == "g1" and r.state.desired is None
          and r.state.reported == {"mode": "normal"} and r.state.delta is None, str(r and r.state.desired))

    shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
        thing_name=thing, client_token="u3", version=99,
        state=iotshadow.ShadowState(reported={"mode": "x"})), q1).result(TIMEOUT)
    r = take("upd_err")
    check("v1.rejected_409", r is not None and r.code == 409 and r.client_token == "u3"
          and r.message == "Version conflict", str(r and (r.code, r.message)))
    conn.disconnect().result(TIMEOUT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--thing", required=True)
    p.add_argument("--client", choices=["v1", "v2"], required=True)
    a = p.parse_args()
    run((run_v2 if a.client == "v2" else run_v1), a)


if __name__ == "__main__":
    main()
