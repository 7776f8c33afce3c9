#!/usr/bin/env bash
# Fleet provisioning by CSR against fleetcore alone (mosquitto has no provisioning), one
# run per fleet size, each from a fresh data directory.
#
#   loadtest/scripts/provision_run.sh [extra fleetcore-loadtest provision options...]
#   AGENTS="2000 500" loadtest/scripts/provision_run.sh
#
# Per run: writes a configuration (a mutual-TLS listener with the registry on
# 127.0.0.1:$PORT using the PKI fleetcore makes at first start, the admin API on
# 127.0.0.1:$ADMIN_PORT, log level warn, [provisioning] at its defaults), starts fleetcore
# (pinned to core $BROKER_CPU when set; unset, broker and tool share every core), waits
# for the admin token and the listener, runs `fleetcore-loadtest provision` (pinned to
# $LOADGEN_CPU when set) with --broker-pid and --json, stops the broker by its PID
# (SIGTERM) and prints the summary. Everything stays in $OUT (default
# loadtest/results/provision-STAMP, git-ignored).
#
# Environment: FLEETCORE, TOOL (binaries; default target/release/...), PORT (29883),
# ADMIN_PORT (29880), AGENTS ("2000"), BROKER_CPU, LOADGEN_CPU, PERF=1 (record the broker
# with `perf record $PERF_ARGS`, default `-F 999`, for the run; needs perf), EXTRA_TOML (appended to the
# configuration, e.g. $'[provisioning]\nmax_in_flight = 4096'), OUT.
# Build first: cargo build --release -p fleetcore -p fleetcore-loadtest
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
FLEETCORE=${FLEETCORE:-$REPO/target/release/fleetcore}
TOOL=${TOOL:-$REPO/target/release/fleetcore-loadtest}
PORT=${PORT:-29883}
ADMIN_PORT=${ADMIN_PORT:-29880}
AGENTS=${AGENTS:-2000}
OUT=${OUT:-$REPO/loadtest/results/provision-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" || true

pin() { # $1 = cpu list or empty
    if [[ -n $1 ]]; then echo taskset -c "$1"; fi
}

BROKER_PID=
PERF_PID=
stop_broker() {
    if [[ -n $PERF_PID ]]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=
    fi
    if [[ -n $BROKER_PID ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=
    fi
}
trap stop_broker EXIT

for n in $AGENTS; do
    d=$OUT/n$n
    rm -rf "$d"
    mkdir -p "$d"
    cat > "$d/fleetcore.toml" <<EOF
data_dir = "$d/data"
[log]
level = "warn"
[limits]
max_connections = 1000000
[admin]
enabled = true
bind = "127.0.0.1:$ADMIN_PORT"
[[listener]]
kind = "tls"
bind = "127.0.0.1:$PORT"
registry = true
${EXTRA_TOML:-}
EOF
    $(pin "${BROKER_CPU:-}") "$FLEETCORE" serve --config "$d/fleetcore.toml" > "$d/broker.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 200); do
        [[ -s $d/data/admin.token && -s $d/data/pki/ca.pem ]] \
            && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null \
            && (exec 3<>"/dev/tcp/127.0.0.1/$ADMIN_PORT") 2>/dev/null && break
        sleep 0.1
    done
    if [[ ${PERF:-} == 1 ]]; then
        perf record ${PERF_ARGS:--F 999} -p "$BROKER_PID" -o "$d/perf.data" > "$d/perf.log" 2>&1 &
        PERF_PID=$!
        sleep 0.5
    fi
    echo "== $n agents (broker PID $BROKER_PID, open files $(ulimit -n))" >&2
    if $(pin "${LOADGEN_CPU:-}") "$TOOL" provision --url "mqtts://127.0.0.1:$PORT" --ca "$d/data/pki/ca.pem" \
        --admin-url "http://127.0.0.1:$ADMIN_PORT" --admin-token-file "$d/data/admin.token" \
        -n "$n" --broker-pid "$BROKER_PID" --json --no-progress "$@" > "$d/result.json" 2> >(tee "$d/tool.log" >&2); then
        python3 - "$d/result.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["results"]
print(json.dumps({k: r[k] for k in ("agents", "provisioned_and_connected", "failed", "rejected_by_code",
      "throttled_429_retried", "wall_s_until_all_connected", "provisions_per_s",
      "broker_cpu_ms_per_provisioning", "provisions_per_broker_cpu_s") if k in r}, indent=1))
PY
    else
        echo "run failed: see $d/tool.log" >&2
    fi
    # The store's commit figures (fleetcore_store_commit_seconds, _commits_total, _ops_total).
    curl -s -m 5 -H "Authorization: Bearer $(cat "$d/data/admin.token")" \
        "http://127.0.0.1:$ADMIN_PORT/metrics" > "$d/metrics.txt" || true
    grep -E '^fleetcore_store_(commits|ops)_total|^fleetcore_store_commit_seconds_(sum|count)|^fleetcore_provisioning_requests_total' "$d/metrics.txt" >&2 || true
    stop_broker
done
echo "results in $OUT" >&2
