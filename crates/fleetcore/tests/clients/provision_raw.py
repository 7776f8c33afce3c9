#!/usr/bin/env python3
"""Fleet provisioning spoken raw with paho-mqtt 2 (MQTT 5), for what the SDK sample does
not do: bad input, a pre-provisioning hook, tokens across claim certificates.

Modes:
  checks   bad input and the hook. Starts its own hook server on loopback and creates the
           templates it needs on the admin API (--admin-url, --token); the broker's
           provisioning.hook_timeout_ms must be below 2000 for the slow-hook check.
           Needs --cert/--key (a claim certificate of --template) and --other-cert/
           --other-key (a claim certificate of the same template).
  create   CreateKeysAndCertificate only: prints `token T`, `cert ID`, and writes the
           certificate and key to --out-dir (then exits: a later `register` uses T).
  register RegisterThing with --token-value and the parameters; prints `thing NAME` or
           `rejected CODE MESSAGE`.

Prints `ok NAME detail` / `fail NAME detail`; exit 0 only if every check passed; exit 10
when paho-mqtt 2.x is missing.
"""

import argparse
import http.server
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:
    print("fail import paho-mqtt 2.x is not installed")
    sys.exit(10)

from checks import check, run

TIMEOUT = 10.0


class Claim:
    """One MQTT 5 connection with a claim certificate, subscribed to every answer."""

    def __init__(self, a, cert, key, client_id, templates=("fleet",)):
        self.msgs = queue.Queue()
        self.acks = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=a.ca, certfile=cert, keyfile=key)
        self.c.on_message = lambda _c, _u, m: self.msgs.put((m.topic, m.payload))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        subscribed = queue.Queue()
        self.c.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.put(codes)
        self.c.connect(a.host, a.port)
        self.c.loop_start()
        self.c.subscribe([("$aws/certificates/create/json/+", 1),
                          ("$aws/certificates/create-from-csr/json/+", 1)]
                         + [("$aws/provisioning-templates/%s/provision/json/+" % t, 1) for t in templates])
        codes = subscribed.get(timeout=TIMEOUT)
        if any(c.is_failure for c in codes):
            raise RuntimeError("subscription refused: %s" % codes)

    def publish(self, topic, payload):
        info = self.c.publish(topic, payload, qos=1)
        deadline = time.time() + TIMEOUT
        while info.mid not in self.acks and time.time() < deadline:
            time.sleep(0.01)
        return self.acks.get(info.mid)

    def ask(self, topic, body, timeout=TIMEOUT):
        """Publishes body (a dict, or raw text) to topic; the answer (suffix, json)."""
        payload = body if isinstance(body, str) else json.dumps(body)
        self.publish(topic, payload)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                t, p = self.msgs.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if t.startswith(topic + "/"):
                return t.rsplit("/", 1)[1], json.loads(p)
        return None, None

    def create(self):
        return self.ask("$aws/certificates/create/json", {})

    def register(self, template, token, params):
        params = dict({"Account": "customer-a"}, **params) if "SerialNumber" in params else params
        return self.ask("$aws/provisioning-templates/%s/provision/json" % template,
                        {"certificateOwnershipToken": token, "parameters": params})

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def admin(a, method, path, body=None):
    req = urllib.request.Request(a.admin_url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + a.token,
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Hook(http.server.BaseHTTPRequestHandler):
    """Answers by path: /allow, /deny, /slow (3 s), /override (SerialNumber=HOOKED)."""
    seen = []

    def do_POST(self):  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Hook.seen.append((self.path, body))
        if self.path == "/slow":
            time.sleep(3)
        answer = {"allowProvisioning": self.path != "/deny"}
        if self.path == "/override":
            answer["parameterOverrides"] = {"SerialNumber": "HOOKED"}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:
            pass

    def log_message(self, *_args):
        pass


def template_body(prefix):
    return {
        "Parameters": {"SerialNumber": {"Type": "String"}, "Account": {"Type": "String", "Default": "customer-a"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["", [prefix, {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"account": {"Ref": "Account"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "agent"}},
        },
    }


def csr_of(a, cn, corrupt=False):
    key = os.path.join(a.out_dir, "csr.key")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key],
                   check=True, capture_output=True)
    pem = subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=" + cn],
                         check=True, capture_output=True, text=True).stdout
    if corrupt:
        # Flip a character of the base64 near the end (inside the signature).
        lines = pem.strip().split("\n")
        body = lines[-2]
        i = len(body) // 2
        lines[-2] = body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1:]
        pem = "\n".join(lines) + "\n"
    return pem


def run_checks(a):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = "http://127.0.0.1:%d" % server.server_address[1]
    for name, path in [("hook-allow", "/allow"), ("hook-deny", "/deny"),
                       ("hook-slow", "/slow"), ("hook-override", "/override")]:
        status, body = admin(a, "POST", "/provisioning-templates", {
            "templateName": name, "templateBody": json.dumps(template_body(name + "-")),
            "preProvisioningHook": {"url": hook_url + path}})
        if status != 201:
            raise RuntimeError("creating template %s: %s %s" % (name, status, body))

    hooks = ["hook-allow", "hook-deny", "hook-slow", "hook-override"]
    c = Claim(a, a.cert, a.key, "claim-raw-1", [a.template])
    other = Claim(a, a.other_cert, a.other_key, "claim-raw-2", [a.template, "no-such-template"] + hooks)

    # Answer topics are the broker's; cbor is not served.
    rc = c.publish("$aws/certificates/create/json/accepted", "{}")
    check("answer_topic_refused", rc is not None and rc.value == 0x87, str(rc))
    rc = c.publish("$aws/certificates/create/cbor", "")
    check("cbor_refused", rc is not None and rc.value == 0x90, str(rc))

    suffix, created = c.create()
    check("create", suffix == "accepted" and created.get("certificateOwnershipToken"), str(created)[:200])
    token = created["certificateOwnershipToken"]

    suffix, r = other.register("no-such-template", token, {"SerialNumber": "1"})
    check("unknown_template", suffix == "rejected" and r["statusCode"] == 404, str(r))
    suffix, r = c.register(a.template, token, {})
    check("missing_parameter", suffix == "rejected" and r["statusCode"] == 400
          and "SerialNumber" in r["errorMessage"], str(r))
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    suffix, r = c.register(a.template, forged, {"SerialNumber": "1"})
    check("forged_token", suffix == "rejected" and r["errorCode"] == "InvalidCertificateOwnershipToken", str(r))
    suffix, r = c.register(a.template, "", {"SerialNumber": "1"})
    check("empty_token", suffix == "rejected" and r["errorCode"] == "InvalidCertificateOwnershipToken"
          and "empty" in r["errorMessage"], str(r))
    # Another claim certificate cannot use this one's token.
    suffix, r = other.register(a.template, token, {"SerialNumber": "1"})
    check("token_of_another_claim", suffix == "rejected"
          and r["errorCode"] == "InvalidCertificateOwnershipToken", str(r))
    suffix, r = c.register(a.template, token, {"SerialNumber": "raw-1"})
    check("register_after_refusals", suffix == "accepted" and r.get("thingName") == "agent-raw-1", str(r))

    # CSRs.
    suffix, r = c.ask("$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr_of(a, "dev-x", True)})
    check("csr_bad_signature", suffix == "rejected" and r["statusCode"] == 400, str(r))
    suffix, r = c.ask("$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr_of(a, "bad name")})
    check("csr_bad_cn", suffix == "rejected" and r["statusCode"] == 400 and "thing name" in r["errorMessage"], str(r))
    suffix, r = c.ask("$aws/certificates/create-from-csr/json", {"certificateSigningRequest": csr_of(a, "fleetcore-admin")})
    check("csr_admin_cn", suffix == "rejected" and "reserved" in r["errorMessage"], str(r))
    suffix, r = c.ask("$aws/certificates/create-from-csr/json", "not json")
    check("csr_not_json", suffix == "rejected" and r["statusCode"] == 400, str(r))

    # The hook (the claim policy of --template does not cover these templates: the
    # other claim certificate also has a policy for every template).
    def provision(tpl, serial):
        _, made = other.create()
        return other.register(tpl, made["certificateOwnershipToken"], {"SerialNumber": serial})

    suffix, r = provision("hook-allow", "h1")
    check("hook_allow", suffix == "accepted" and r.get("thingName") == "hook-allow-h1", str(r))
    seen = [b for p, b in Hook.seen if p == "/allow"]
    check("hook_request", len(seen) == 1 and seen[0]["parameters"].get("SerialNumber") == "h1"
          and seen[0]["certificateId"] and seen[0]["claimCertificateId"] and seen[0]["clientId"] == "claim-raw-2"
          and seen[0]["templateArn"].endswith("/hook-allow") and "BEGIN CERTIFICATE" in seen[0]["certificatePem"],
          str(seen)[:300])
    suffix, r = provision("hook-deny", "h2")
    check("hook_deny", suffix == "rejected" and r["errorCode"] == "ACCESS_DENIED", str(r))
    t0 = time.time()
    suffix, r = provision("hook-slow", "h3")
    check("hook_timeout_denies", suffix == "rejected" and r["errorCode"] == "ACCESS_DENIED"
          and time.time() - t0 < 2.9, "%s after %.1f s" % (r, time.time() - t0))
    suffix, r = provision("hook-override", "h4")
    check("hook_override", suffix == "accepted" and r.get("thingName") == "hook-override-HOOKED", str(r))
    status, t = admin(a, "GET", "/things/hook-deny-h2")
    check("denied_thing_not_made", status == 404, str(status))

    c.close()
    other.close()
    server.shutdown()


def run_create(a):
    c = Claim(a, a.cert, a.key, a.client_id, [a.template])
    suffix, r = c.create()
    if suffix != "accepted":
        print("rejected", r)
        sys.exit(1)
    with open(os.path.join(a.out_dir, "device.cert.pem"), "w") as f:
        f.write(r["certificatePem"])
    with open(os.path.join(a.out_dir, "device.private.key"), "w") as f:
        f.write(r["privateKey"])
    print("token", r["certificateOwnershipToken"], flush=True)
    print("cert", r["certificateId"], flush=True)
    c.close()


def run_register(a):
    c = Claim(a, a.cert, a.key, a.client_id, [a.template])
    suffix, r = c.register(a.template, a.token_value, {"SerialNumber": a.serial})
    if suffix == "accepted":
        print("thing", r.get("thingName"), flush=True)
    else:
        print("rejected", r and r.get("errorCode"), r and r.get("errorMessage"), flush=True)
    c.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["checks", "create", "register"])
    for name in ("--host", "--ca", "--cert", "--key"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--other-cert")
    p.add_argument("--other-key")
    p.add_argument("--template", default="fleet")
    p.add_argument("--admin-url")
    p.add_argument("--token")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--client-id", default="claim-raw")
    p.add_argument("--token-value")
    p.add_argument("--serial")
    a = p.parse_args()
    if a.mode == "checks":
        run(run_checks, a)
    elif a.mode == "create":
        run(run_create, a)
    else:
        run(run_register, a)


if __name__ == "__main__":
    main()
