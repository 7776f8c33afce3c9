#!/usr/bin/env python3
"""Connects, optionally subscribes, and prints every event (see fcmqtt.py).

Ends with exit 0 after --count messages, right after SUBACK with --exit-after-subscribe,
or at --timeout when no --count is given (a "hold the connection" client); exit 2 when
the broker closes the connection (the DISCONNECT reason is printed first); exit 3 when
--count messages did not arrive in time.
"""

import sys

from fcmqtt import Conn, connection_args, emit, fail


def main():
    p = connection_args(__doc__)
    p.add_argument("--filter", action="append", default=[], help="topic filter (repeatable)")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--no-subscribe", action="store_true",
                   help="resume a persistent session without subscribing again")
    p.add_argument("--exit-after-subscribe", action="store_true")
    p.add_argument("--count", type=int, help="exit 0 after this many messages")
    p.add_argument("--will-topic")
    p.add_argument("--will-payload", default="gone")
    p.add_argument("--will-qos", type=int, default=1)
    args = p.parse_args()

    will = (args.will_topic, args.will_payload, args.will_qos) if args.will_topic else None
    conn = Conn(args, will=will)
    received = [0]
    conn.on_message = lambda _msg: received.__setitem__(0, received[0] + 1)
    conn.connect()
    if args.filter and not args.no_subscribe:
        conn.subscribe(args.filter, args.qos)
    if args.exit_after_subscribe:
        conn.disconnect()
        return 0

    if args.count is not None:
        conn.pump(lambda: received[0] >= args.count)
        if received[0] >= args.count:
            conn.disconnect()
            return 0
        if conn.disconnected:
            fail(2, f"connection lost after {received[0]} of {args.count} messages")
        fail(3, f"timeout: {received[0]} of {args.count} messages")

    conn.pump(lambda: False)
    if conn.disconnected:
        return 2
    conn.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
