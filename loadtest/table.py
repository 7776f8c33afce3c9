#!/usr/bin/env python3
"""Markdown table of compare.sh results: one column per broker, ratio fleetcore / tuned.

usage: table.py SCENARIO TRANSPORT WORKDIR "ARGS" RUN...   (RUN = broker or broker@rate)
"""
import json
import sys

ROWS = {
    "idle": [
        ("connections ready", "results.connections.ready", "higher", "{:.0f}"),
        ("connect rate achieved (/s)", "results.connections.rate_per_s", "higher", "{:.0f}"),
        ("connect latency p99 (ms)", "results.connections.latency.p99_ms", "lower", "{:.1f}"),
        ("handshake failures", "results.handshake_failures", "lower", "{:.0f}"),
        ("broker CPU per connection (µs)", "results.connect_cpu.broker_cpu_us_per_connection", "lower", "{:.0f}"),
        ("connections per broker CPU-second (mTLS: handshakes/s per core)", "results.connect_cpu.connections_per_broker_cpu_s", "higher", "{:.0f}"),
        ("broker RSS before (MiB)", "results.broker_rss_before_kib", "lower", "mib"),
        ("broker RSS after (MiB)", "results.broker_rss_after_kib", "lower", "mib"),
        ("broker RSS per connection (bytes)", "results.broker_rss_per_connection_bytes", "lower", "{:.0f}"),
        ("dropped while held", "results.dropped_while_held", "lower", "{:.0f}"),
    ],
    "push": [
        ("devices ready", "results.connections.ready", "higher", "{:.0f}"),
        ("orders/s achieved (target)", "results.achieved_rate_per_s", "higher", "{:.0f}"),
        ("latency p50 (ms)", "results.latency.p50_ms", "lower", "{:.2f}"),
        ("latency p99 (ms)", "results.latency.p99_ms", "lower", "{:.2f}"),
        ("latency p99.9 (ms)", "results.latency.p999_ms", "lower", "{:.2f}"),
        ("latency max (ms)", "results.latency.max_ms", "lower", "{:.2f}"),
        ("lost", "results.lost", "lower", "{:.0f}"),
        ("duplicated", "results.duplicated", "lower", "{:.0f}"),
        ("broker CPU per delivered message (µs)", "results.push_cpu.broker_cpu_us_per_message", "lower", "{:.1f}"),
        ("broker CPU (% of its core)", "results.push_cpu.broker_cpu_percent", "lower", "{:.0f}"),
        ("generator CPU (% of its core)", "results.push_cpu.generator_cpu_percent", "lower", "{:.0f}"),
        ("broker RSS per connection (bytes)", "results.broker_rss_per_connection_bytes", "lower", "{:.0f}"),
        ("broker RSS peak (MiB)", "results.broker_rss_peak_kib", "lower", "mib"),
    ],
    "fanin": [
        ("devices ready", "results.connections.ready", "higher", "{:.0f}"),
        ("delivered/s", "results.delivered_per_s", "higher", "{:.0f}"),
        ("latency p50 (ms)", "results.latency.p50_ms", "lower", "{:.2f}"),
        ("latency p99 (ms)", "results.latency.p99_ms", "lower", "{:.2f}"),
        ("latency p99.9 (ms)", "results.latency.p999_ms", "lower", "{:.2f}"),
        ("latency QoS 1 p99 (ms)", "results.latency_qos1.p99_ms", "lower", "{:.2f}"),
        ("QoS 1 lost", "results.lost_qos1", "lower", "{:.0f}"),
        ("QoS 0 undelivered", "results.undelivered_qos0", "lower", "{:.0f}"),
        ("broker CPU per delivered message (µs)", "results.fanin_cpu.broker_cpu_us_per_message", "lower", "{:.1f}"),
        ("broker CPU (% of its core)", "results.fanin_cpu.broker_cpu_percent", "lower", "{:.0f}"),
        ("generator CPU (% of its core)", "results.fanin_cpu.generator_cpu_percent", "lower", "{:.0f}"),
        ("broker RSS peak (MiB)", "results.broker_rss_peak_kib", "lower", "mib"),
    ],
    "storm": [
        ("sessions made", "results.sessions.ready", "higher", "{:.0f}"),
        ("orders queued (acked)", "results.orders_acked", "higher", "{:.0f}"),
        ("broker restart (s)", "results.restart_seconds", "lower", "{:.2f}"),
        ("all reconnected + resubscribed after (s)", "results.seconds_to_all_reconnected_and_subscribed", "lower", "{:.2f}"),
        ("every queued order delivered after (s)", "results.seconds_to_all_orders_delivered", "lower", "{:.2f}"),
        ("lost (must be 0)", "results.lost", "lower", "{:.0f}"),
        ("duplicated", "results.duplicated", "lower", "{:.0f}"),
        ("session present", "results.session_present", "higher", "{:.0f}"),
        ("reconnect p99 (ms)", "results.reconnect.latency.p99_ms", "lower", "{:.0f}"),
        ("reconnections with a resumed TLS session", "results.reconnect.tls_handshakes.resumed", "higher", "{:.0f}"),
        ("reconnections with a full TLS handshake", "results.reconnect.tls_handshakes.full", "lower", "{:.0f}"),
        ("broker CPU per reconnection (µs)", "results.storm_cpu.broker_cpu_us_per_connection", "lower", "{:.0f}"),
        ("broker RSS with queued orders (MiB)", "results.broker_rss_with_queued_kib", "lower", "mib"),
    ],
    "retained": [
        ("configs published (acked)", "results.configs_acked", "higher", "{:.0f}"),
        ("devices with their config", "results.devices_with_config", "higher", "{:.0f}"),
        ("every device has its config after (s)", "results.seconds_to_all_configs", "lower", "{:.2f}"),
        ("all subscribed after (s)", "results.seconds_to_all_subscribed", "lower", "{:.2f}"),
        ("missing", "results.missing", "lower", "{:.0f}"),
        ("broker CPU per resubscribe (µs)", "results.resubscribe_cpu.broker_cpu_us_per_connection", "lower", "{:.0f}"),
    ],
}


def get(doc, path):
    cur = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def fmt(v, f):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if f == "mib":
        return "{:.1f}".format(v / 1024)
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool):
        return "–"
    if b == 0:
        return "–" if a == 0 else "∞"
    return "{:.2f}".format(a / b)


def load(work, run):
    try:
        with open(f"{work}/{run}/result.json") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": str(e)}


def table(scenario, docs, names):
    bases = [b for b in ("mosquitto-tuned", "rustls-null") if b in names] or ["mosquitto-tuned"]
    heads = " | ".join(f"ratio fleetcore / {b}" for b in bases)
    out = ["| figure | " + " | ".join(names) + f" | {heads} | better |",
           "|---" * (len(names) + len(bases) + 2) + "|"]
    for label, path, better, f in ROWS[scenario]:
        vals = [get(d, path) for d in docs]
        if all(v is None for v in vals):
            continue
        rs = []
        for b in bases:
            r = "–"
            if "fleetcore" in names and b in names:
                r = ratio(vals[names.index("fleetcore")], vals[names.index(b)])
            rs.append(r)
        out.append(f"| {label} | " + " | ".join(fmt(v, f) for v in vals) + " | " + " | ".join(rs) + f" | {better} |")
    errors = [f"{n}: {d['error']}" for n, d in zip(names, docs) if "error" in d]
    if errors:
        out.append("")
        out.append("Errors: " + "; ".join(errors))
    return out


def main():
    scenario, transport, work, args = sys.argv[1:5]
    runs = sys.argv[5:]
    lines = [f"### {scenario} ({transport}) — `loadtest/compare.sh {scenario} {args}`", ""]
    first = next((load(work, r) for r in runs if "params" in load(work, r)), {})
    if "params" in first:
        p = first["params"]
        lines.append("Parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(p.items()) if k not in ("broker_pid",)))
        lines.append("")
    rates = sorted({r.split("@")[1] for r in runs if "@" in r}, key=float)
    if not rates:
        names = runs
        lines += table(scenario, [load(work, r) for r in runs], names)
    else:
        brokers = list(dict.fromkeys(r.split("@")[0] for r in runs))
        best = {b: None for b in brokers}
        for rate in rates:
            lines.append(f"#### --msg-rate {rate}")
            lines.append("")
            docs = [load(work, f"{b}@{rate}") for b in brokers]
            lines += table(scenario, docs, brokers)
            lines.append("")
            for b, d in zip(brokers, docs):
                lat = get(d, "results.latency.p99_ms")
                lost = get(d, "results.lost") if scenario == "push" else get(d, "results.lost_qos1")
                achieved = get(d, "results.achieved_rate_per_s") or get(d, "results.delivered_per_s") or 0
                if lat is not None and lat < 50 and lost == 0 and achieved >= 0.95 * float(rate):
                    best[b] = rate
        lines.append("Highest --msg-rate sustained (>= 95% achieved) with p99 < 50 ms and nothing lost: " +
                     ", ".join(f"{b} {best[b] or 'none'}" for b in brokers))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
