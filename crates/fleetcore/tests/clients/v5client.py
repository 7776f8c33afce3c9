#!/usr/bin/env python3
"""One MQTT 5 paho client, driven step by step by the test over a control socket.

The connection itself is set up from the command line (client id, clean start, CONNECT
properties, will). The script then listens on 127.0.0.1 (port 0), prints
`control port=N`, takes one control connection, connects to the broker, and from then on
runs each command line it reads, while pumping the paho network loop in between.

Commands use the event format of fcmqtt.py: `command key=value ...`, values
percent-encoded; a key may repeat.

    subscribe filter=F [filter=F2 ...] qos=Q [id=N] [no_local=1] [rap=1] [rh=0|1|2]
        one SUBSCRIBE; prints `suback mid= codes=` (codes comma-separated, decimal)
    publish topic=T [payload=P | size=N] [qos=Q] [retain=1] [alias=N] [expiry=S]
            [content_type=C] [response_topic=R] [correlation=HEX] [payload_format=0|1]
            [user=K:V ...]
        prints `published mid=`, then `ack mid= reason_code=` on PUBACK/PUBCOMP
    ack mid=N [qos=1]      acknowledge a message by hand (with --manual-ack)
    disconnect [reason=N] [session_expiry=S]
        a DISCONNECT packet, then waits until the socket is closed

Events besides those: `connack` (reason code, session present and the CONNACK
properties, empty when absent), `message` (the PUBLISH as received: the topic as sent,
empty when only a topic alias came, and its properties), `disconnected`, `error`.

The script exits when the control connection closes or at --timeout.
"""

import argparse
import binascii
import json
import select
import socket
import sys
import time
from urllib.parse import unquote

from fcmqtt import emit, mqtt, CallbackAPIVersion, PacketTypes, Properties

from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client-id", default="")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--no-clean-start", action="store_true")
    p.add_argument("--session-expiry", type=int, help="CONNECT Session Expiry Interval")
    p.add_argument("--receive-maximum", type=int)
    p.add_argument("--maximum-packet-size", type=int)
    p.add_argument("--topic-alias-maximum", type=int)
    p.add_argument("--manual-ack", action="store_true", help="QoS 1 messages are acked by `ack`")
    p.add_argument("--will-topic")
    p.add_argument("--will-payload", default="gone")
    p.add_argument("--will-qos", type=int, default=1)
    p.add_argument("--will-delay", type=int, help="Will Delay Interval")
    p.add_argument("--timeout", type=float, default=25.0, help="overall deadline, seconds")
    return p.parse_args()


def prop(props, name):
    """A property of a received packet, or '' when absent."""
    if props is None or not hasattr(props, name):
        return ""
    return getattr(props, name)


class Driven:
    def __init__(self, args):
        self.args = args
        self.disconnected = False
        self.connack = False
        self.client = c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=args.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=args.manual_ack,
        )
        if args.will_topic:
            wp = None
            if args.will_delay is not None:
                wp = Properties(PacketTypes.WILLMESSAGE)
                wp.WillDelayInterval = args.will_delay
            c.will_set(args.will_topic, args.will_payload, qos=args.will_qos, retain=False,
                       properties=wp)
        c.on_connect = self.on_connect
        c.on_disconnect = self.on_disconnect
        c.on_subscribe = self.on_subscribe
        c.on_message = self.on_message
        c.on_publish = self.on_publish

    # ---- paho callbacks ----

    def on_connect(self, _c, _u, flags, reason_code, props):
        self.connack = True
        emit("connack", reason_code=reason_code.value,
             session_present=int(flags.session_present),
             assigned_client_id=prop(props, "AssignedClientIdentifier"),
             topic_alias_max=prop(props, "TopicAliasMaximum"),
             receive_max=prop(props, "ReceiveMaximum"),
             server_keep_alive=prop(props, "ServerKeepAlive"),
             max_packet_size=prop(props, "MaximumPacketSize"),
             session_expiry=prop(props, "SessionExpiryInterval"))

    def on_disconnect(self, _c, _u, flags, reason_code, _props):
        if self.disconnected:
            return
        self.disconnected = True
        emit("disconnected", reason_code=reason_code.value,
             from_broker=int(flags.is_disconnect_packet_from_server))

    def on_subscribe(self, _c, _u, mid, reason_codes, _props):
        emit("suback", mid=mid, codes=",".join(str(rc.value) for rc in reason_codes))

    def on_message(self, _c, _u, msg):
        p = msg.properties
        ids = prop(p, "SubscriptionIdentifier")
        corr = prop(p, "CorrelationData")
        users = prop(p, "UserProperty")
        emit("message", topic=msg.topic, qos=msg.qos, retain=int(msg.retain), dup=int(msg.dup),
             mid=msg.mid, payload=msg.payload.decode("utf-8", "replace"),
             size=len(msg.payload),
             sub_ids=",".join(str(i) for i in ids) if ids != "" else "",
             topic_alias=prop(p, "TopicAlias"),
             expiry=prop(p, "MessageExpiryInterval"),
             content_type=prop(p, "ContentType"),
             response_topic=prop(p, "ResponseTopic"),
             correlation=binascii.hexlify(corr).decode() if corr != "" else "",
             payload_format=prop(p, "PayloadFormatIndicator"),
             user=json.dumps([list(kv) for kv in users]) if users != "" else "")

    def on_publish(self, _c, _u, mid, reason_code, _props):
        emit("ack", mid=mid, reason_code=reason_code.value)

    # ---- network ----

    def loop(self, seconds):
        if self.disconnected:
            time.sleep(seconds)
            return
        rc = self.client.loop(timeout=seconds)
        if rc != mqtt.MQTT_ERR_SUCCESS and not self.disconnected:
            # paho reports a lost socket through the return code; make it an event.
            self.on_disconnect(None, None, mqtt.DisconnectFlags(False),
                               ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)

    def connect(self, deadline):
        a = self.args
        props = Properties(PacketTypes.CONNECT)
        for attr, value in [("SessionExpiryInterval", a.session_expiry),
                            ("ReceiveMaximum", a.receive_maximum),
                            ("MaximumPacketSize", a.maximum_packet_size),
                            ("TopicAliasMaximum", a.topic_alias_maximum)]:
            if value is not None:
                setattr(props, attr, value)
        try:
            self.client.connect(a.host, a.port, a.keepalive, clean_start=not a.no_clean_start,
                                properties=props)
        except Exception as err:
            emit("error", message=f"connect failed: {type(err).__name__}: {err}")
            self.disconnected = True
            return
        while not self.connack and not self.disconnected and time.monotonic() < deadline:
            self.loop(0.02)

    # ---- commands ----

    def run(self, name, fields):
        one = {k: v for k, v in fields}
        if name == "subscribe":
            props = None
            if "id" in one:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = int(one["id"])
            opts = SubscribeOptions(qos=int(one.get("qos", "1")),
                                    noLocal=one.get("no_local") == "1",
                                    retainAsPublished=one.get("rap") == "1",
                                    retainHandling=int(one.get("rh", "0")))
            topics = [(v, opts) for k, v in fields if k == "filter"]
            self.client.subscribe(topics, properties=props)
        elif name == "publish":
            props = Properties(PacketTypes.PUBLISH)
            if "alias" in one:
                props.TopicAlias = int(one["alias"])
            if "expiry" in one:
                props.MessageExpiryInterval = int(one["expiry"])
            if "content_type" in one:
                props.ContentType = one["content_type"]
            if "response_topic" in one:
                props.ResponseTopic = one["response_topic"]
            if "correlation" in one:
                props.CorrelationData = binascii.unhexlify(one["correlation"])
            if "payload_format" in one:
                props.PayloadFormatIndicator = int(one["payload_format"])
            users = [tuple(v.split(":", 1)) for k, v in fields if k == "user"]
            if users:
                props.UserProperty = users
            payload = one.get("payload", "")
            if "size" in one:
                payload = "x" * int(one["size"])
            info = self.client.publish(one["topic"], payload, qos=int(one.get("qos", "1")),
                                       retain=one.get("retain") == "1", properties=props)
            emit("published", mid=info.mid, topic=one["topic"])
        elif name == "ack":
            self.client.ack(int(one["mid"]), int(one.get("qos", "1")))
        elif name == "disconnect":
            props = None
            if "session_expiry" in one:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = int(one["session_expiry"])
            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=int(one.get("reason", "0")))
            self.client.disconnect(reasoncode=rc, properties=props)
            end = time.monotonic() + 5
            while not self.disconnected and time.monotonic() < end:
                self.loop(0.02)
        else:
            emit("error", message=f"unknown command {name!r}")


def parse_command(line):
    words = line.split(" ")
    fields = []
    for w in words[1:]:
        if w:
            k, _, v = w.partition("=")
            fields.append((k, unquote(v)))
    return words[0], fields


def main():
    args = parse_args()
    deadline = time.monotonic() + args.timeout
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    emit("control", port=listener.getsockname()[1])
    listener.settimeout(10)
    try:
        ctl, _ = listener.accept()
    except socket.timeout:
        emit("error", message="no control connection")
        return 3
    listener.close()
    ctl.setblocking(False)

    driven = Driven(args)
    driven.connect(deadline)
    pending = b""
    while time.monotonic() < deadline:
        driven.loop(0.01)
        readable, _, _ = select.select([ctl], [], [], 0.01)
        if not readable:
            continue
        try:
            data = ctl.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        if not data:
            break  # the test is done with this client
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            line = line.decode().strip()
            if line:
                try:
                    driven.run(*parse_command(line))
                except Exception as err:  # a bad command is the test's bug: say so
                    emit("error", message=f"{line}: {type(err).__name__}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
