#!/usr/bin/env python3
"""An agent provisioning itself with the identity clients of the AWS IoT Device SDK v2
for Python (awsiotsdk), pointed at fleetcore with only the endpoint and the CA changed:
the SDK's fleet-provisioning sample flow.

It connects with the shared claim certificate (--cert/--key) as --client-id, gets its own
certificate (--flow keys: CreateKeysAndCertificate; --flow csr: a key and CSR made here
with openssl, CreateCertificateFromCsr), registers its thing with --template and the
parameters SerialNumber=--serial, Account=--account, checks that the claim certificate
may subscribe to nothing but provisioning and that the token works once, then
disconnects, reconnects with the new certificate as the thing and waits for the retained
order on --account/THING/orders (its payload must be --order).

--client v2: `IotIdentityClientV2` over MQTT 5. --client v1: `IotIdentityClient` over
MQTT 3.1.1, which also counts the answers it hears: it must hear its own only, however
many agents share the claim certificate (--expect-alone).

Writes the new certificate and key to --out-dir. Prints `ok NAME detail` /
`fail NAME detail`; exit 0 only if every check passed; exit 10 when awsiotsdk is missing.
"""

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

try:
    from awscrt import mqtt, mqtt5, mqtt_request_response
    from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder
    import awsiot
except ImportError:
    print("fail import awsiotsdk is not installed: python3 -m pip install awsiotsdk")
    sys.exit(10)

from checks import check, run

TIMEOUT = 15.0


def make_csr(a):
    key = os.path.join(a.out_dir, "device.key")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
                   check=True, capture_output=True)
    csr = subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=" + a.csr_cn],
                         check=True, capture_output=True, text=True).stdout
    with open(key) as f:
        return csr, f.read()


def save(a, cert_pem, key_pem):
    cert = os.path.join(a.out_dir, "device.cert.pem")
    key = os.path.join(a.out_dir, "device.private.key")
    with open(cert, "w") as f:
        f.write(cert_pem)
    with open(key, "w") as f:
        f.write(key_pem)
    return cert, key


def params(a):
    return {"SerialNumber": a.serial, "Account": a.account}


def described(e):
    if e is None:
        return "no error"
    return str({k: getattr(e, k, None) for k in ("status_code", "error_code", "error_message")}
               if hasattr(e, "status_code") else e)


def error_of(fut):
    try:
        fut.result(TIMEOUT)
        return None
    except awsiot.V2ServiceException as e:
        return e.modeled_error
    except Exception as e:  # noqa: BLE001 - reported as the check's detail
        return e


def run_v2(a):
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.client_id,
        on_lifecycle_connection_success=lambda _d: connected.set())
    client.start()
    check("v2.claim_connect", connected.wait(TIMEOUT))
    identity = iotidentity.IotIdentityClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=1,
        operation_timeout_in_seconds=int(TIMEOUT)))

    if a.flow == "keys":
        r = identity.create_keys_and_certificate(
            iotidentity.CreateKeysAndCertificateRequest()).result(TIMEOUT)
        check("v2.create_keys", bool(r.certificate_id and r.certificate_pem and r.private_key
                                     and r.certificate_ownership_token), r.certificate_id)
        key_pem = r.private_key
    else:
        csr, key_pem = make_csr(a)
        r = identity.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr)).result(TIMEOUT)
        check("v2.create_from_csr", bool(r.certificate_id and r.certificate_pem
                                         and r.certificate_ownership_token), r.certificate_id)
        bad = error_of(identity.create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request="not a csr")))
        check("v2.bad_csr_rejected", getattr(bad, "status_code", None) == 400, described(bad))
    token = r.certificate_ownership_token
    cert_file, key_file = save(a, r.certificate_pem, key_pem)

    missing = error_of(identity.register_thing(iotidentity.RegisterThingRequest(
        template_name=a.template, certificate_ownership_token=token, parameters={"Account": a.account})))
    check("v2.missing_parameter_rejected", getattr(missing, "status_code", None) == 400,
          described(missing))

    reg = identity.register_thing(iotidentity.RegisterThingRequest(
        template_name=a.template, certificate_ownership_token=token, parameters=params(a))).result(TIMEOUT)
    check("v2.register_thing", reg.thing_name == a.thing, "%s %s" % (reg.thing_name, reg.device_configuration))
    check("v2.device_configuration", (reg.device_configuration or {}).get("account") == a.account,
          str(reg.device_configuration))

    again = error_of(identity.register_thing(iotidentity.RegisterThingRequest(
        template_name=a.template, certificate_ownership_token=token, parameters=params(a))))
    check("v2.token_used_once", getattr(again, "error_code", None) == "InvalidCertificateOwnershipToken",
          described(again))

    # The claim certificate's policy allows the provisioning topics only.
    sub = client.subscribe(mqtt5.SubscribePacket(subscriptions=[
        mqtt5.Subscription(topic_filter=a.account + "/#", qos=mqtt5.QoS.AT_LEAST_ONCE)])).result(TIMEOUT)
    codes = [int(c) for c in sub.reason_codes]
    check("v2.claim_cannot_subscribe_elsewhere", codes == [0x87], str(codes))

    client.stop()
    time.sleep(0.2)

    orders = queue.Queue()
    connected2 = threading.Event()
    client2 = mqtt5_client_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=cert_file, pri_key_filepath=key_file,
        ca_filepath=a.ca, client_id=a.thing,
        on_lifecycle_connection_success=lambda _d: connected2.set(),
        on_publish_received=lambda d: orders.put((d.publish_packet.topic, bytes(d.publish_packet.payload))))
    client2.start()
    check("v2.own_cert_connect", connected2.wait(TIMEOUT))
    sub = client2.subscribe(mqtt5.SubscribePacket(subscriptions=[
        mqtt5.Subscription(topic_filter="%s/%s/#" % (a.account, a.thing), qos=mqtt5.QoS.AT_LEAST_ONCE)])).result(TIMEOUT)
    check("v2.own_topics_subscribed", [int(c) for c in sub.reason_codes] == [1], str(list(sub.reason_codes)))
    topic, payload = orders.get(timeout=TIMEOUT)
    check("v2.order_received", topic == "%s/%s/orders" % (a.account, a.thing) and payload.decode() == a.order,
          "%s %r" % (topic, payload))
    client2.stop()


def run_v1(a):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=a.cert, pri_key_filepath=a.key,
        ca_filepath=a.ca, client_id=a.client_id, clean_session=True, keep_alive_secs=30)
    conn.connect().result(TIMEOUT)
    check("v1.claim_connect", True)
    identity = iotidentity.IotIdentityClient(conn)
    heard = queue.Queue()
    rejected = queue.Queue()

    if a.flow == "keys":
        f1, _ = identity.subscribe_to_create_keys_and_certificate_accepted(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), mqtt.QoS.AT_LEAST_ONCE, heard.put)
        f2, _ = identity.subscribe_to_create_keys_and_certificate_rejected(
            iotidentity.CreateKeysAndCertificateSubscriptionRequest(), mqtt.QoS.AT_LEAST_ONCE, rejected.put)
        f1.result(TIMEOUT)
        f2.result(TIMEOUT)
        if a.start_at:
            time.sleep(max(0.0, a.start_at - time.time()))
        identity.publish_create_keys_and_certificate(
            iotidentity.CreateKeysAndCertificateRequest(), mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
        r = heard.get(timeout=TIMEOUT)
        check("v1.create_keys", bool(r.certificate_id and r.private_key and r.certificate_ownership_token),
              r.certificate_id)
        key_pem = r.private_key
    else:
        csr, key_pem = make_csr(a)
        f1, _ = identity.subscribe_to_create_certificate_from_csr_accepted(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), mqtt.QoS.AT_LEAST_ONCE, heard.put)
        f2, _ = identity.subscribe_to_create_certificate_from_csr_rejected(
            iotidentity.CreateCertificateFromCsrSubscriptionRequest(), mqtt.QoS.AT_LEAST_ONCE, rejected.put)
        f1.result(TIMEOUT)
        f2.result(TIMEOUT)
        if a.start_at:
            time.sleep(max(0.0, a.start_at - time.time()))
        identity.publish_create_certificate_from_csr(
            iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr),
            mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
        r = heard.get(timeout=TIMEOUT)
        check("v1.create_from_csr", bool(r.certificate_id and r.certificate_ownership_token), r.certificate_id)
    cert_file, key_file = save(a, r.certificate_pem, key_pem)
    if a.expect_alone:
        # Other agents provision with the same claim certificate now: none of their
        # answers (one holds a private key) may reach this connection.
        time.sleep(2.0)
        check("v1.only_own_answer", heard.empty() and rejected.empty(),
              "%d foreign answers" % (heard.qsize() + rejected.qsize()))

    reg_ok = queue.Queue()
    reg_bad = queue.Queue()
    sub = iotidentity.RegisterThingSubscriptionRequest(template_name=a.template)
    f1, _ = identity.subscribe_to_register_thing_accepted(sub, mqtt.QoS.AT_LEAST_ONCE, reg_ok.put)
    f2, _ = identity.subscribe_to_register_thing_rejected(sub, mqtt.QoS.AT_LEAST_ONCE, reg_bad.put)
    f1.result(TIMEOUT)
    f2.result(TIMEOUT)
    identity.publish_register_thing(iotidentity.RegisterThingRequest(
        template_name=a.template, certificate_ownership_token=r.certificate_ownership_token,
        parameters=params(a)), mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
    reg = reg_ok.get(timeout=TIMEOUT)
    check("v1.register_thing", reg.thing_name == a.thing, "%s %s" % (reg.thing_name, reg.device_configuration))
    conn.disconnect().result(TIMEOUT)

    orders = queue.Queue()
    conn2 = mqtt_connection_builder.mtls_from_path(
        endpoint=a.host, port=a.port, cert_filepath=cert_file, pri_key_filepath=key_file,
        ca_filepath=a.ca, client_id=a.thing, clean_session=True, keep_alive_secs=30)
    conn2.connect().result(TIMEOUT)
    check("v1.own_cert_connect", True)
    f, _ = conn2.subscribe("%s/%s/#" % (a.account, a.thing), mqtt.QoS.AT_LEAST_ONCE,
                           lambda topic, payload, **_kw: orders.put((topic, payload)))
    granted = f.result(TIMEOUT)
    check("v1.own_topics_subscribed", granted.get("qos") == mqtt.QoS.AT_LEAST_ONCE, str(granted))
    topic, payload = orders.get(timeout=TIMEOUT)
    check("v1.order_received", payload.decode() == a.order, "%s %r" % (topic, payload))
    conn2.disconnect().result(TIMEOUT)


def main():
    p = argparse.ArgumentParser()
    for name in ("--host", "--ca", "--cert", "--key", "--template", "--serial", "--account",
                 "--order", "--out-dir", "--client-id"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client", choices=["v1", "v2"], required=True)
    p.add_argument("--flow", choices=["keys", "csr"], required=True)
    p.add_argument("--csr-cn", default="agent-device")
    p.add_argument("--thing-prefix", default="agent-")
    p.add_argument("--expect-alone", action="store_true")
    p.add_argument("--start-at", type=float, default=0.0,
                   help="unix time to send the first request at (to overlap several agents)")
    a = p.parse_args()
    a.thing = a.thing_prefix + a.serial
    run(run_v2 if a.client == "v2" else run_v1, a)


if __name__ == "__main__":
    main()
