#!/usr/bin/env python3
"""Offline fan-out: one QoS 1 message to N offline persistent sessions.

Starts the given fleetcore binary on a fresh data directory (plain TCP on 127.0.0.1),
makes N persistent sessions subscribed to one topic (MQTT 3.1.1, clean_session=0) and
disconnects them, then publishes one QoS 1 message of --size bytes to that topic and
reports: the time until its PUBACK (every copy is on disk by then), the bytes the broker
wrote to the disk meanwhile (/proc/PID/io write_bytes), and the store file's growth.
Repeats --repeat times (a new message each time, sessions still offline).

  python3 loadtest/scripts/offline_fanout.py --fleetcore target/release/fleetcore -n 2000

Needs paho-mqtt 2.x. Stops the broker it started.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import paho.mqtt.client as mqtt


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def client(cid, port, clean):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean,
                    protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port, keepalive=60)
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleetcore", required=True, help="the fleetcore binary")
    p.add_argument("-n", type=int, default=2000, help="offline persistent sessions")
    p.add_argument("--size", type=int, default=64 * 1024, help="payload bytes")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="fanout-")
    port = free_port()
    cfg = os.path.join(work, "fleetcore.toml")
    with open(cfg, "w") as f:
        f.write(f'data_dir = "{work}/data"\n[admin]\nenabled = false\n'
                f'[limits]\nmax_connections = {args.n + 100}\n'
                f'[[listener]]\nkind = "tcp"\nbind = "127.0.0.1:{port}"\nallow_anonymous = true\n')
    log = open(os.path.join(work, "broker.log"), "w")
    broker = subprocess.Popen([args.fleetcore, "serve", "--config", cfg], stdout=log, stderr=log)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or broker.poll() is not None:
                    sys.exit("broker did not start; see " + log.name)
                time.sleep(0.1)

        t0 = time.time()
        for i in range(args.n):
            c = client(f"fan-{i}", port, False)
            done = []
            c.on_subscribe = lambda *a: done.append(1)
            c.loop_start()
            c.subscribe("fan/all", qos=1)
            end = time.time() + 10
            while not done and time.time() < end:
                time.sleep(0.0005)
            c.disconnect()
            c.loop_stop()
            if (i + 1) % 500 == 0:
                print(f"  {i + 1}/{args.n} sessions made", file=sys.stderr)
        print(f"{args.n} offline sessions in {time.time() - t0:.1f} s", file=sys.stderr)

        store = os.path.join(work, "data", "fleetcore.redb")
        pub = client("fan-publisher", port, True)
        pub.loop_start()
        payload = b"x" * args.size
        rows = []
        for r in range(args.repeat):
            time.sleep(1.0)  # let earlier writes settle
            w0, s0 = write_bytes(broker.pid), os.path.getsize(store)
            t = time.perf_counter()
            info = pub.publish("fan/all", payload, qos=1)
            info.wait_for_publish(timeout=120)
            dt = time.perf_counter() - t
            time.sleep(0.2)
            w1, s1 = write_bytes(broker.pid), os.path.getsize(store)
            rows.append((dt, w1 - w0, s1 - s0))
            print(f"run {r + 1}: PUBACK after {dt * 1000:.1f} ms, broker wrote {(w1 - w0) / 1e6:.1f} MB, "
                  f"store grew {(s1 - s0) / 1e6:.1f} MB")
        pub.loop_stop()
        pub.disconnect()
        best = min(rows)
        print(f"best: {best[0] * 1000:.1f} ms to PUBACK, {best[1] / 1e6:.1f} MB written "
              f"({args.n} sessions x {args.size} B = {args.n * args.size / 1e6:.1f} MB of payload)")
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


if __name__ == "__main__":
    main()
