#!/usr/bin/env python3
"""An agent written with the AWS IoT Device SDK v2 for Python (awsiotsdk), pointed at
fleetcore with only the endpoint and the CA changed.

Connects with mutual TLS (the SDK's defaults otherwise: its `?SDK=...` username, 3.1.1
clean_session=False), subscribes to --allowed, publishes one message to --allowed-topic
and expects it back, then tries --denied (subscribe) and --denied-topic (publish, MQTT 5
only: MQTT 3.1.1 cannot refuse a publish without disconnecting).

Prints one line per check, `ok NAME detail` or `fail NAME detail`, and exits 0 only if
every check passed; exit 10 when awsiotsdk is missing.
"""

import argparse
import sys
import threading

try:
    from awscrt import mqtt, mqtt5
    from awsiot import mqtt_connection_builder, mqtt5_client_builder
except ImportError:
    print("fail import awsiotsdk is not installed: python3 -m pip install awsiotsdk")
    sys.exit(10)

TIMEOUT = 10.0
failures = []


def check(name, ok, detail=""):
    print(("ok" if ok else "fail"), name, detail, flush=True)
    if not ok:
        failures.append(name)


def run_v311(a):
    got = threading.Event()
    received = []

    def on_message(topic, payload, **_kw):
        received.append((topic, payload))
        got.set()

    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.client_id, keep_alive_secs=30)
    conn.connect().result(TIMEOUT)
    check("v311.connect", True)
    fut, _ = conn.subscribe(a.allowed, mqtt.QoS.AT_LEAST_ONCE, callback=on_message)
    res = fut.result(TIMEOUT)
    check("v311.subscribe_allowed", res.get("qos") is not None, str(res.get("qos")))
    fut, _ = conn.publish(a.allowed_topic, b"hello from the sdk", mqtt.QoS.AT_LEAST_ONCE)
    fut.result(TIMEOUT)
    check("v311.receive_own", got.wait(TIMEOUT), str(received[:1]))
    fut, _ = conn.subscribe(a.denied, mqtt.QoS.AT_LEAST_ONCE, callback=on_message)
    try:
        res = fut.result(TIMEOUT)
        check("v311.subscribe_denied", res.get("qos") is None, "granted " + str(res.get("qos")))
    except Exception as e:  # the CRT reports a 0x80 return code as an error
        check("v311.subscribe_denied", True, type(e).__name__)
    conn.disconnect().result(TIMEOUT)


def run_v5(a):
    connected = threading.Event()
    got = threading.Event()
    received = []

    def on_publish(data):
        received.append(data.publish_packet.topic)
        got.set()

    client = mqtt5_client_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.client_id,
        on_publish_received=on_publish,
        on_lifecycle_connection_success=lambda _d: connected.set())
    client.start()
    check("v5.connect", connected.wait(TIMEOUT))
    suback = client.subscribe(mqtt5.SubscribePacket(subscriptions=[
        mqtt5.Subscription(topic_filter=a.allowed, qos=mqtt5.QoS.AT_LEAST_ONCE)])).result(TIMEOUT)
    code = suback.reason_codes[0]
    check("v5.subscribe_allowed", int(code) < 0x80, str(code))
    puback = client.publish(mqtt5.PublishPacket(
        topic=a.allowed_topic, payload=b"hello v5", qos=mqtt5.QoS.AT_LEAST_ONCE)).result(TIMEOUT)
    check("v5.publish_allowed", int(puback.puback.reason_code) < 0x80, str(puback.puback.reason_code))
    check("v5.receive_own", got.wait(TIMEOUT), str(received[:1]))
    suback = client.subscribe(mqtt5.SubscribePacket(subscriptions=[
        mqtt5.Subscription(topic_filter=a.denied, qos=mqtt5.QoS.AT_LEAST_ONCE)])).result(TIMEOUT)
    code = suback.reason_codes[0]
    check("v5.subscribe_denied", int(code) == 0x87, str(code))
    puback = client.publish(mqtt5.PublishPacket(
        topic=a.denied_topic, payload=b"nope", qos=mqtt5.QoS.AT_LEAST_ONCE)).result(TIMEOUT)
    check("v5.publish_denied", int(puback.puback.reason_code) == 0x87, str(puback.puback.reason_code))
    client.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    p.add_argument("--allowed", required=True, help="a filter the policy allows")
    p.add_argument("--allowed-topic", required=True, help="a topic under --allowed")
    p.add_argument("--denied", required=True, help="a filter the policy denies")
    p.add_argument("--denied-topic", required=True, help="a topic the policy denies")
    a = p.parse_args()
    try:
        (run_v5 if a.protocol == "5" else run_v311)(a)
    except Exception as e:
        check("exception", False, f"{type(e).__name__}: {e}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
