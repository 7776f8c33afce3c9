#!/usr/bin/env bash
# Device Shadow updates against fleetcore alone, over a sweep of fleet sizes and rates.
# mosquitto has no shadow service, so compare.sh cannot run the `shadow` scenario; this
# script starts fleetcore itself, once per run, from a fresh data directory.
#
#   loadtest/scripts/shadow_sweep.sh [extra fleetcore-loadtest shadow options...]
#   DEVICES="1000 5000" RATES="500 1000 2000 4000" loadtest/scripts/shadow_sweep.sh --duration 20
#
# Per run: writes a configuration (one plain-TCP listener on 127.0.0.1:$PORT, anonymous
# allowed, no policy, admin API off, log level warn, [shadow] on by default), starts
# fleetcore pinned to core $BROKER_CPU, runs `fleetcore-loadtest shadow` pinned to core
# $LOADGEN_CPU with --broker-pid and --json, stops the broker by its PID (SIGTERM), and
# prints one markdown table row. Everything stays in $OUT (default
# loadtest/results/shadow-STAMP, git-ignored).
#
# Environment: FLEETCORE, TOOL (binaries; default target/release/...), PORT (29561),
# DEVICES ("1000 5000"), RATES ("500 1000 2000 4000"), BROKER_CPU (0), LOADGEN_CPU (1),
# OUT. Build first: cargo build --release -p fleetcore -p fleetcore-loadtest
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
FLEETCORE=${FLEETCORE:-$REPO/target/release/fleetcore}
TOOL=${TOOL:-$REPO/target/release/fleetcore-loadtest}
PORT=${PORT:-29561}
DEVICES=${DEVICES:-1000 5000}
RATES=${RATES:-500 1000 2000 4000}
BROKER_CPU=${BROKER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
OUT=${OUT:-$REPO/loadtest/results/shadow-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" || true

BROKER_PID=
stop_broker() {
    if [[ -n $BROKER_PID ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=
    fi
}
trap stop_broker EXIT

row() { # $1 = result JSON
    python3 - "$1" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
p, r = d["params"], d["results"]
lat, cpu, v = r["latency"], r.get("shadow_cpu", {}), r["versions"]
codes = ", ".join(f"{k}: {n}" for k, n in r["rejected_by_code"].items()) or "0"
f = lambda x, fmt="{:.0f}": "–" if x is None else fmt.format(x)
print("| {} | {:.0f} | {:.0f} | {:.0f}{} | {} / {} / {} / {} | {} | {} | {} / {} | {} | {} | {} | {} |".format(
    p["devices"], r["target_rate_per_s"], r["sent_rate_per_s"], r["achieved_rate_per_s"],
    "" if r["rate_sustained"] else " (NOT sustained)",
    f(lat.get("p50_ms"), "{:.2f}"), f(lat.get("p99_ms"), "{:.2f}"), f(lat.get("p999_ms"), "{:.2f}"), f(lat.get("max_ms"), "{:.1f}"),
    codes, r["lost"], v["gaps"], v["out_of_order"],
    f(cpu.get("broker_cpu_percent")), f(cpu.get("broker_cpu_us_per_update"), "{:.0f}"),
    f(cpu.get("generator_cpu_percent")), f(r["broker_rss_peak_kib"] / 1024, "{:.1f}")))
EOF
}

HEADER='| devices | target/s | sent/s | accepted/s | latency p50 / p99 / p99.9 / max (ms) | rejected | lost | version gaps / out of order | broker CPU % | broker µs per update | generator CPU % | broker RSS peak (MiB) |
|---|---|---|---|---|---|---|---|---|---|---|---|'
echo "$HEADER" > "$OUT/table.md"
echo "$HEADER"
for n in $DEVICES; do
    for rate in $RATES; do
        d=$OUT/n$n-r$rate
        mkdir -p "$d"
        cat > "$d/fleetcore.toml" <<EOF
data_dir = "$d/data"
[log]
level = "warn"
[limits]
max_connections = 1000000
[admin]
enabled = false
[[listener]]
kind = "tcp"
bind = "127.0.0.1:$PORT"
allow_anonymous = true
EOF
        taskset -c "$BROKER_CPU" "$FLEETCORE" serve --config "$d/fleetcore.toml" > "$d/broker.log" 2>&1 &
        BROKER_PID=$!
        for _ in $(seq 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
            sleep 0.1
        done
        echo "== $n devices, $rate updates/s (broker PID $BROKER_PID)" >&2
        if taskset -c "$LOADGEN_CPU" "$TOOL" shadow --url "mqtt://127.0.0.1:$PORT" -n "$n" --msg-rate "$rate" \
            --broker-pid "$BROKER_PID" --json --no-progress "$@" > "$d/result.json" 2> "$d/tool.log"; then
            row "$d/result.json" | tee -a "$OUT/table.md"
        else
            echo "| $n | $rate | run failed: see $d/tool.log |" | tee -a "$OUT/table.md"
        fi
        stop_broker
    done
done
echo "results in $OUT" >&2
