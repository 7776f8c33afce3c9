#!/usr/bin/env python3
"""A job to N devices that all answer at once.

Starts the given fleetcore binary on a fresh data directory (plain TCP on 127.0.0.1,
anonymous clients, the admin API on a loopback port), registers N things, connects N
devices (MQTT 3.1.1, client id = thing name, a hand-written MQTT client on asyncio: one
process holds them all) subscribed to their `$aws/things/<thing>/jobs/notify-next`, then:

1. creates one job targeting every thing; each device answers the notify-next carrying
   its execution with `<jobId>/update {"status":"SUCCEEDED"}` (QoS 1) at once;
   reports the time until DescribeJob counts N SUCCEEDED, executions per second, and the
   broker CPU time per execution (so executions per broker CPU-second);
2. creates a second job to every thing that the devices leave QUEUED, and reports the
   broker RSS growth per pending execution.

  python3 loadtest/scripts/job_rollout.py --fleetcore target/release/fleetcore -n 10000

Needs only the Python standard library. Stops the broker it started; bounded by --timeout.
"""

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Admin:
    def __init__(self, port, token):
        self.port, self.token = port, token

    def call(self, method, path, body=None, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={
            "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
        r = c.getresponse()
        text = r.read()
        if conn is None:
            c.close()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {text[:200]!r}")
        return json.loads(text) if text else None


# ----- a minimal MQTT 3.1.1 client --------------------------------------------------

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


async def read_packet(reader):
    head = await reader.readexactly(1)
    n, mult = 0, 1
    while True:
        b = (await reader.readexactly(1))[0]
        n += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return head[0], await reader.readexactly(n)


class Fleet:
    def __init__(self):
        self.answering = True
        self.succeeded = 0
        self.tasks = []

    async def device(self, port, name, ready):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connect = utf8("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 600) + utf8(name)
        topic = f"$aws/things/{name}/jobs/notify-next"
        sub = struct.pack(">H", 1) + utf8(topic) + bytes([1])
        writer.write(packet(0x10, connect) + packet(0x82, sub))
        await writer.drain()
        pid = 2
        while True:
            kind, body = await read_packet(reader)
            t = kind & 0xF0
            if t == 0x90:
                ready.set_result(None) if not ready.done() else None
            elif t == 0x30:
                tl = struct.unpack(">H", body[:2])[0]
                rest = body[2 + tl:]
                if kind & 0x06:
                    in_pid = rest[:2]
                    rest = rest[2:]
                    writer.write(bytes([0x40, 2]) + in_pid)  # PUBACK
                msg = json.loads(rest)
                ex = msg.get("execution")
                if ex and self.answering and ex.get("status") == "QUEUED":
                    up = f"$aws/things/{name}/jobs/{ex['jobId']}/update"
                    writer.write(packet(0x32, utf8(up) + struct.pack(">H", pid)
                                        + b'{"status":"SUCCEEDED"}'))
                    pid = pid % 65535 + 1
                await writer.drain()
            elif t == 0x40:
                self.succeeded += 1


async def connect_all(port, names, fleet):
    sem = asyncio.Semaphore(200)
    loop = asyncio.get_running_loop()

    async def one(name):
        async with sem:
            ready = loop.create_future()
            fleet.tasks.append(asyncio.create_task(fleet.device(port, name, ready)))
            await asyncio.wait_for(ready, 30)

    t0 = time.time()
    await asyncio.gather(*(one(n) for n in names))
    return time.time() - t0


async def run(args):
    work = tempfile.mkdtemp(prefix="jobs-")
    port, admin_port = free_port(), free_port()
    cfg = os.path.join(work, "fleetcore.toml")
    with open(cfg, "w") as f:
        f.write(f'data_dir = "{work}/data"\n[admin]\nenabled = true\nbind = "127.0.0.1:{admin_port}"\n'
                f'[limits]\nmax_connections = {args.n + 100}\n'
                f'[[listener]]\nkind = "tcp"\nbind = "127.0.0.1:{port}"\nallow_anonymous = true\n')
    log = open(os.path.join(work, "broker.log"), "w")
    broker = subprocess.Popen([args.fleetcore, "serve", "--config", cfg], stdout=log, stderr=log)
    deadline = time.time() + args.timeout
    try:
        token_path = os.path.join(work, "data", "admin.token")
        while not os.path.exists(token_path) or os.path.getsize(token_path) == 0:
            if time.time() > deadline or broker.poll() is not None:
                sys.exit("broker did not start; see " + log.name)
            time.sleep(0.1)
        time.sleep(0.3)
        admin = Admin(admin_port, open(token_path).read().strip())
        names = [f"dev-{i}" for i in range(args.n)]

        t0 = time.time()

        def register(chunk):
            c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=60)
            for n in chunk:
                admin.call("POST", "/things", {"name": n}, conn=c)
            c.close()

        chunks = [names[i::16] for i in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(register, chunks))
        print(f"{args.n} things registered in {time.time() - t0:.1f} s", flush=True)

        fleet = Fleet()
        took = await connect_all(port, names, fleet)
        print(f"{args.n} devices connected and subscribed in {took:.1f} s", flush=True)
        rss0, cpu0 = proc_rss(broker.pid), proc_cpu_secs(broker.pid)

        t0 = time.time()
        await asyncio.to_thread(admin.call, "PUT", "/jobs/bench",
                                {"targets": names, "document": {"operation": "reboot"}})
        created = time.time() - t0
        while True:
            j = (await asyncio.to_thread(admin.call, "GET", "/jobs/bench"))["job"]
            d = j["jobProcessDetails"]
            if d["numberOfSucceededThings"] == args.n:
                break
            if time.time() > deadline:
                sys.exit(f"timeout: {d}")
            await asyncio.sleep(0.2)
        took = time.time() - t0
        cpu1 = proc_cpu_secs(broker.pid)
        per = (cpu1 - cpu0) / args.n * 1e6
        print(f"job to {args.n}: CreateJob answered in {created * 1000:.0f} ms; all SUCCEEDED after "
              f"{took:.2f} s = {args.n / took:.0f} executions/s; broker CPU {cpu1 - cpu0:.2f} s = "
              f"{per:.0f} µs per execution ({1e6 / per:.0f} executions per broker CPU-second); "
              f"status {j['status']}", flush=True)

        fleet.answering = False
        rss1 = proc_rss(broker.pid)
        await asyncio.to_thread(admin.call, "PUT", "/jobs/pending",
                                {"targets": names, "document": {"operation": "wait"}})
        while True:
            d = (await asyncio.to_thread(admin.call, "GET", "/jobs/pending"))["job"]["jobProcessDetails"]
            if d["numberOfQueuedThings"] == args.n:
                break
            if time.time() > deadline:
                sys.exit(f"timeout: {d}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        rss2 = proc_rss(broker.pid)
        print(f"{args.n} pending executions: broker RSS {rss1 / 2**20:.1f} -> {rss2 / 2**20:.1f} MiB "
              f"= {(rss2 - rss1) / args.n:.0f} B per pending execution (RSS before the first job "
              f"{rss0 / 2**20:.1f} MiB)", flush=True)
        for t in fleet.tasks:
            t.cancel()
    finally:
        broker.terminate()
        try:
            broker.wait(15)
        except subprocess.TimeoutExpired:
            broker.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleetcore", required=True, help="the fleetcore binary")
    p.add_argument("-n", type=int, default=10000, help="devices")
    p.add_argument("--timeout", type=float, default=600, help="bound on the whole run, seconds")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
