#!/usr/bin/env python3
"""Publishes --count messages and prints one `ack` line per acknowledged QoS 1/2 message
(PUBACK, or PUBCOMP for QoS 2) as it arrives, so a test can act mid-stream.

Message i goes to --topic with payload --payload, both formatted with {i}; with
--retain-every K every K-th message (i % K == 0) is retained and goes to
--retained-topic instead. Exit 0 when every message is acknowledged (or sent, QoS 0),
2 when the connection is lost first, 3 on timeout.
"""

import sys
import time

from fcmqtt import Conn, connection_args, emit, fail


def main():
    p = connection_args(__doc__)
    p.add_argument("--topic", required=True)
    p.add_argument("--payload", default="m-{i}")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--retain", action="store_true", help="retain every message")
    p.add_argument("--retain-every", type=int, default=0)
    p.add_argument("--retained-topic")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between publishes")
    p.add_argument("--max-inflight", type=int, default=20)
    args = p.parse_args()

    conn = Conn(args)
    sent = {}  # mid -> (seq, topic, retained)
    done = [0]

    def on_ack(mid, reason_code):
        if mid not in sent:
            return
        seq, topic, retained = sent.pop(mid)
        done[0] += 1
        event = "ack" if reason_code < 0x80 else "nack"
        emit(event, seq=seq, topic=topic, retain=int(retained), reason_code=reason_code)

    conn.on_ack = on_ack
    conn.client.max_inflight_messages_set(args.max_inflight)
    conn.connect()

    for i in range(args.count):
        retained = args.retain or (args.retain_every > 0 and i % args.retain_every == 0)
        topic = (args.retained_topic if retained and args.retained_topic else args.topic).format(i=i)
        info = conn.client.publish(topic, args.payload.format(i=i), qos=args.qos, retain=retained)
        if args.qos == 0:
            emit("sent", seq=i, topic=topic)
            done[0] += 1
        else:
            sent[info.mid] = (i, topic, retained)
        pause_end = time.monotonic() + args.interval_ms / 1000.0
        conn.pump(lambda: time.monotonic() >= pause_end)
        if conn.disconnected:
            fail(2, f"connection lost after {done[0]} of {args.count} acknowledgements")

    conn.pump(lambda: done[0] >= args.count)
    if done[0] >= args.count:
        emit("done", count=done[0])
        conn.disconnect()
        return 0
    if conn.disconnected:
        fail(2, f"connection lost after {done[0]} of {args.count} acknowledgements")
    fail(3, f"timeout: {done[0]} of {args.count} acknowledgements")


if __name__ == "__main__":
    sys.exit(main())
