"""Shared plumbing for the end-to-end test clients (subscribe.py, publish.py).

Output protocol, read by tests/common/mod.rs: one event per line,
    EVENT key=value key=value ...
with every value percent-encoded (urllib.parse.quote, nothing safe), so a line
splits on spaces and '='. Exit codes: 0 done as asked, 1 could not connect
(socket, TLS or CONNACK refusal), 2 connection lost or closed by the broker,
3 timed out, 10 paho-mqtt 2.x missing.
"""

import argparse
import sys
import time
from urllib.parse import quote

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as err:
    sys.stderr.write(
        f"paho-mqtt 2.x is not installed ({err}): run python3 -m pip install 'paho-mqtt>=2,<3'\n"
    )
    sys.exit(10)

if int(paho.mqtt.__version__.split(".")[0]) < 2:
    sys.stderr.write(
        f"paho-mqtt {paho.mqtt.__version__} is too old: run python3 -m pip install 'paho-mqtt>=2,<3'\n"
    )
    sys.exit(10)


def emit(event, **fields):
    parts = [event] + [f"{k}={quote(str(v), safe='')}" for k, v in fields.items()]
    print(" ".join(parts), flush=True)


def fail(code, message):
    emit("error", message=message)
    sys.exit(code)


def connection_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-ca", help="CA file; enables TLS")
    p.add_argument("--cert", help="client certificate (PEM)")
    p.add_argument("--key", help="client private key (PEM)")
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    p.add_argument("--client-id", default="")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--persistent", action="store_true",
                   help="3.1.1: clean_session=False; 5: clean_start=False with --session-expiry")
    p.add_argument("--session-expiry", type=int, default=3600)
    p.add_argument("--timeout", type=float, default=20.0, help="overall deadline, seconds")
    p.add_argument("--websocket", metavar="PATH",
                   help="MQTT over WebSocket at this HTTP path (wss with --tls-ca)")
    p.add_argument("--username")
    p.add_argument("--password", help="e.g. a fleetcore device token")
    p.add_argument("--http-proxy", metavar="HOST:PORT",
                   help="reach the broker through this HTTP proxy (CONNECT); needs PySocks")
    return p


class Conn:
    """One paho client driven by hand (client.loop), so it never reconnects on its own."""

    def __init__(self, args, will=None):
        self.args = args
        self.deadline = time.monotonic() + args.timeout
        self.connack = None
        self.disconnected = False
        self.subacked = False
        self.on_message = None
        self.on_ack = None
        v5 = args.protocol == "5"
        kwargs = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": args.client_id,
            "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        }
        if not v5:
            kwargs["clean_session"] = not args.persistent
        if args.websocket:
            kwargs["transport"] = "websockets"
        self.client = c = mqtt.Client(**kwargs)
        if args.websocket:
            c.ws_set_options(path=args.websocket)
        if args.username is not None:
            c.username_pw_set(args.username, args.password)
        if args.http_proxy:
            try:
                import socks
            except ImportError:
                fail(10, "PySocks is not installed: python3 -m pip install PySocks")
            host, port = args.http_proxy.rsplit(":", 1)
            c.proxy_set(proxy_type=socks.HTTP, proxy_addr=host, proxy_port=int(port))
        if args.tls_ca:
            c.tls_set(ca_certs=args.tls_ca, certfile=args.cert, keyfile=args.key)
        if will:
            topic, payload, qos = will
            c.will_set(topic, payload, qos=qos, retain=False)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_publish = self._on_publish

    def _on_connect(self, _c, _u, flags, reason_code, _props):
        self.connack = reason_code.value
        emit("connack", reason_code=reason_code.value, session_present=int(flags.session_present))

    def _on_disconnect(self, _c, _u, flags, reason_code, _props):
        self.disconnected = True
        emit("disconnected", reason_code=reason_code.value,
             from_broker=int(flags.is_disconnect_packet_from_server))

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _props):
        self.subacked = True
        emit("suback", codes=",".join(str(rc.value) for rc in reason_codes))

    def _on_message(self, _c, _u, msg):
        emit("message", topic=msg.topic, qos=msg.qos, retain=int(msg.retain), dup=int(msg.dup),
             payload=msg.payload.decode("utf-8", "replace"))
        if self.on_message:
            self.on_message(msg)

    def _on_publish(self, _c, _u, mid, reason_code, _props):
        if self.on_ack:
            self.on_ack(mid, reason_code.value)

    def pump(self, until, deadline=None):
        """Runs the network loop until until() is true (True), or the deadline passes or the
        connection is gone (False)."""
        deadline = deadline or self.deadline
        while not until():
            if self.disconnected or time.monotonic() >= deadline:
                return until()
            rc = self.client.loop(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            if rc != mqtt.MQTT_ERR_SUCCESS and not self.disconnected:
                # paho reports a lost socket through the return code; make it an event.
                self._on_disconnect(None, None, mqtt.DisconnectFlags(False),
                                    mqtt.ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)
        return True

    def connect(self):
        a = self.args
        try:
            if a.protocol == "5":
                props = None
                clean = not a.persistent
                if a.persistent:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = a.session_expiry
                self.client.connect(a.host, a.port, a.keepalive, clean_start=clean, properties=props)
            else:
                self.client.connect(a.host, a.port, a.keepalive)
        except Exception as err:  # socket, TLS handshake, DNS: all mean "could not connect"
            fail(1, f"connect failed: {type(err).__name__}: {err}")
        if not self.pump(lambda: self.connack is not None):
            fail(1, "no CONNACK (connection closed or timed out)")
        if self.connack >= 0x80 or (a.protocol == "3.1.1" and self.connack != 0):
            fail(1, f"CONNACK refused with reason code {self.connack}")

    def subscribe(self, filters, qos):
        self.client.subscribe([(f, qos) for f in filters])
        if not self.pump(lambda: self.subacked):
            fail(2 if self.disconnected else 3, "no SUBACK")

    def disconnect(self):
        """Clean DISCONNECT (no will), waiting until the socket is closed."""
        if not self.disconnected:
            self.client.disconnect()
            self.pump(lambda: self.disconnected, time.monotonic() + 5)
