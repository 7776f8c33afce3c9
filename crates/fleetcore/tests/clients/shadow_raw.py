#!/usr/bin/env python3
"""The shadow topics spoken raw, with paho-mqtt 2 (MQTT 5) and, for the in-flight
burst, a hand-written MQTT 5 byte stream over TLS.

Modes:
  checks  bad input: each gets its documented error, and the connection (and another
          device's) keeps working. Prints `ok NAME detail` / `fail NAME detail`;
          exit 0 only if every check passed.
  stream  sends --count updates of reported.i = 1.. one after another (QoS 1), printing
          `accepted version=V i=I` for every update/accepted; runs until killed or done.
  get     prints `state version=V i=I` of the classic shadow (or `missing code=C`).

Exit 10 when paho-mqtt 2.x is missing.
"""

import argparse
import json
import queue
import socket
import ssl
import struct
import sys
import time

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError:
    print("fail import paho-mqtt 2.x is not installed")
    sys.exit(10)

from checks import check, run

TIMEOUT = 10.0


class Device:
    """One MQTT 5 connection as the thing of its certificate, subscribed to its shadow."""

    def __init__(self, a, cert, key, thing):
        self.thing = thing
        self.msgs = queue.Queue()
        self.acks = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=thing, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=a.ca, certfile=cert, keyfile=key)
        self.c.on_message = lambda _c, _u, m: self.msgs.put((m.topic, m.payload))
        self.c.on_publish = self._on_publish
        subscribed = queue.Queue()
        self.c.on_subscribe = lambda _c, _u, _mid, codes, _p: subscribed.put(codes)
        self.c.connect(a.host, a.port)
        self.c.loop_start()
        self.c.subscribe("$aws/things/%s/shadow/#" % thing, qos=1)
        codes = subscribed.get(timeout=TIMEOUT)
        if any(c.is_failure for c in codes):
            raise RuntimeError("subscription refused: %s" % codes)

    def _on_publish(self, _c, _u, mid, rc, _props):
        self.acks[mid] = rc

    def publish(self, topic, payload, qos=1):
        info = self.c.publish(topic, payload, qos=qos)
        if qos == 0:
            return None
        deadline = time.time() + TIMEOUT
        while info.mid not in self.acks and time.time() < deadline:
            time.sleep(0.01)
        return self.acks.get(info.mid)

    def answer(self, suffix, timeout=TIMEOUT):
        """The next message on <prefix>/<suffix>, skipping others."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                topic, payload = self.msgs.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if topic.endswith("/" + suffix):
                return topic, json.loads(payload)
        return None, None

    def drain(self):
        while not self.msgs.empty():
            self.msgs.get()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def rejected(d, name, topic, payload, code, message=None, token=None):
    d.drain()
    d.publish(topic, payload)
    suffix = topic.rsplit("/", 1)[1] + "/rejected"
    _t, body = d.answer(suffix)
    ok = body is not None and body.get("code") == code
    if message is not None:
        ok = ok and body.get("message") == message
    if token is not None:
        ok = ok and body.get("clientToken") == token
    check(name, ok, str(body))


# ----- a raw MQTT 5 byte stream (for the burst) -------------------------------------

def varint(n):
    out = b""
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def utf8(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def read_packet(sock):
    head = sock.recv(1)
    if not head:
        return None, None
    n, mult = 0, 1
    while True:
        b = sock.recv(1)[0]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            return None, None
        body += chunk
    return head[0], body


def burst(a, thing, n):
    """Sends CONNECT, SUBSCRIBE and n QoS 0 shadow gets in one write; returns the codes
    of the get answers that arrive."""
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.load_cert_chain(a.cert, a.key)
    raw = socket.create_connection((a.host, a.port), timeout=TIMEOUT)
    sock = ctx.wrap_socket(raw, server_hostname=a.host)
    connect = utf8("MQTT") + bytes([5, 0x02]) + struct.pack(">H", 30) + varint(0) + utf8(thing)
    sub = struct.pack(">H", 1) + varint(0) + utf8("$aws/things/%s/shadow/get/+" % thing) + bytes([1])
    sock.sendall(packet(0x10, connect) + packet(0x82, sub))
    kinds = []
    while 0x90 not in kinds:
        kind, _ = read_packet(sock)
        if kind is None:
            raise RuntimeError("connection closed before SUBACK")
        kinds.append(kind & 0xF0)
    topic = "$aws/things/%s/shadow/get" % thing
    pubs = b"".join(
        packet(0x30, utf8(topic) + varint(0) + json.dumps({"clientToken": "b%d" % i}).encode())
        for i in range(n))
    sock.sendall(pubs)
    codes = []
    while len(codes) < n:
        kind, body = read_packet(sock)
        if kind is None:
            break
        if kind & 0xF0 != 0x30:
            continue
        tlen = struct.unpack(">H", body[:2])[0]
        rest = body[2 + tlen:]
        if kind & 0x06:
            rest = rest[2:]  # packet id
        plen, i = 0, 0
        mult = 1
        while True:
            b = rest[i]
            plen += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        payload = json.loads(rest[i + plen:])
        codes.append(payload.get("code", 200))
    sock.close()
    return codes


def run_checks(a):
    d = Device(a, a.cert, a.key, a.thing)
    p = "$aws/things/%s/shadow" % a.thing
    rejected(d, "invalid_json", p + "/update", b"{not json", 400, "Invalid JSON")
    rejected(d, "not_utf8", p + "/update", b"\xff\xfe{}", 415)
    rejected(d, "missing_state", p + "/update", json.dumps({"clientToken": "m"}), 400,
             "Missing required node: state", "m")
    rejected(d, "wrong_type", p + "/update", json.dumps({"state": {"desired": 5}, "clientToken": "w"}),
             400, "Desired node must be an object", "w")
    rejected(d, "invalid_node", p + "/update", json.dumps({"state": {"delta": {}}, "clientToken": "n"}),
             400, "State contains an invalid node: 'delta'", "n")
    deep = 1
    for _ in range(7):
        deep = {"k": deep}
    rejected(d, "too_deep", p + "/update", json.dumps({"state": {"reported": deep}, "clientToken": "d"}),
             400, "JSON contains too many levels of nesting; maximum is 6", "d")
    rejected(d, "oversized", p + "/update",
             json.dumps({"state": {"reported": {"blob": "x" * 9000}}, "clientToken": "o"}),
             413, "The payload exceeds the maximum size allowed", "o")
    rejected(d, "array_with_null", p + "/update",
             json.dumps({"state": {"desired": {"colors": [None, "RED"]}}, "clientToken": "a"}), 400, None, "a")
    rejected(d, "long_token", p + "/update", json.dumps({"state": {}, "clientToken": "t" * 65}), 400,
             "Invalid clientToken")
    rejected(d, "get_missing_404", p + "/get", json.dumps({"clientToken": "g"}), 404, None, "g")

    # Topics the service refuses outright: a name outside IoT Core's pattern (0x90),
    # an answer topic (0x87), and by policy another device's shadow (0x87).
    rc = d.publish("$aws/things/bad.name/shadow/get", b"")
    check("bad_thing_name_0x90", rc == 0x90, str(rc))
    rc = d.publish(p + "/name/%s/get" % ("n" * 65), b"")
    check("long_shadow_name_0x90", rc == 0x90, str(rc))
    rc = d.publish(p + "/name/a/b/get", b"")
    check("unknown_operation_0x90", rc == 0x90, str(rc))
    d.drain()
    rc = d.publish(p + "/update/accepted", json.dumps({"state": {}, "version": 99}))
    check("answer_topic_0x87", rc == 0x87, str(rc))
    t, body = d.answer("update/accepted", timeout=1.0)
    check("answer_topic_not_delivered", body is None, str(body))
    rc = d.publish("$aws/things/forbidden/shadow/update", json.dumps({"state": {"reported": {"x": 1}}}))
    check("policy_denied_0x87", rc == 0x87, str(rc))

    # After all that, the connection still works.
    d.drain()
    rc = d.publish(p + "/update", json.dumps({"state": {"reported": {"ok": True}}, "clientToken": "fine"}))
    _t, body = d.answer("update/accepted")
    check("still_works", rc == 0 and body is not None and body.get("clientToken") == "fine"
          and body.get("version") == 1, "%s %s" % (rc, body))
    d.close()

    # Eleven requests in flight on one connection: the eleventh (at least) gets 429,
    # the rest are answered.
    codes = burst(a, a.thing, 11)
    check("burst_429", len(codes) == 11 and 429 in codes and 200 in codes
          and all(c in (200, 429) for c in codes), str(codes))

    # Another device was not affected.
    if a.other_cert:
        o = Device(a, a.other_cert, a.other_key, "thing-2")
        o.publish("$aws/things/thing-2/shadow/update", json.dumps({"state": {"reported": {"x": 2}}, "clientToken": "o"}))
        _t, body = o.answer("update/accepted")
        check("other_device_unaffected", body is not None and body.get("version") == 1, str(body))
        o.close()


def run_stream(a):
    d = Device(a, a.cert, a.key, a.thing)
    p = "$aws/things/%s/shadow" % a.thing
    for i in range(1, a.count + 1):
        d.c.publish(p + "/update", json.dumps({"state": {"reported": {"i": i}}, "clientToken": str(i)}), qos=1)
        _t, body = d.answer("update/accepted")
        if body is None:
            print("timeout i=%d" % i, flush=True)
            sys.exit(3)
        print("accepted version=%d i=%s" % (body["version"], body["clientToken"]), flush=True)
    d.close()


def run_get(a):
    d = Device(a, a.cert, a.key, a.thing)
    p = "$aws/things/%s/shadow" % a.thing
    d.publish(p + "/get", json.dumps({"clientToken": "g"}))
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        try:
            topic, payload = d.msgs.get(timeout=TIMEOUT)
        except queue.Empty:
            break
        body = json.loads(payload)
        if topic.endswith("/get/accepted"):
            print("state version=%d i=%s" % (body["version"], body["state"]["reported"]["i"]), flush=True)
            break
        if topic.endswith("/get/rejected"):
            print("missing code=%s" % body["code"], flush=True)
            break
    d.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["checks", "stream", "get"])
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--thing", required=True)
    p.add_argument("--other-cert")
    p.add_argument("--other-key")
    p.add_argument("--count", type=int, default=1000)
    a = p.parse_args()
    run({"checks": run_checks, "stream": run_stream, "get": run_get}[a.mode], a)


if __name__ == "__main__":
    main()
