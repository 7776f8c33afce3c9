#!/usr/bin/env bash
# Runs one fleetcore-loadtest scenario against fleetcore, mosquitto with its defaults,
# and mosquitto tuned, one after the other on this machine with the same parameters;
# the broker pinned to core 0 and the load generator to core 1. Writes a markdown
# table (fleetcore | mosquitto defaults | mosquitto tuned | ratio) to stdout and to
# loadtest/results/.
#
#   loadtest/compare.sh SCENARIO [fleetcore-loadtest options...]
#   loadtest/compare.sh idle -n 2000 --rate 500 --duration 10
#   TRANSPORT=tcp loadtest/compare.sh idle -n 2000
#   RATES="1000 2000 4000" loadtest/compare.sh push -n 1000 --duration 10
#
# SCENARIO: idle | push | fanin | storm | retained
# Environment:
#   TRANSPORT   mtls (default: mutual TLS, device policy / ACL), tcp (plain, anonymous),
#               wss (WebSocket over TLS with client certificates, path /mqtt)
#   BROKERS     which to run (default "fleetcore mosquitto-defaults mosquitto-tuned");
#               add rustls-null (idle only, mtls or tcp): a null broker that only accepts,
#               handshakes and answers CONNECT/SUBSCRIBE, the ceiling for idle's figures
#   RATES       push/fanin only: run once per --msg-rate value (a sweep)
#   NO_BUILD=1  use the release binaries already built
#   BROKER_CPU, LOADGEN_CPU   cores to pin to (default 0 and 1)
#   SOURCE_ADDRS  client source addresses (default 127.0.0.2-127.0.0.9)
#   BROKER_CGROUP a cgroup directory the broker is put in (e.g. one with a CPU quota,
#               to overload a broker that the one-core generator cannot overload)
#   MOSQUITTO   the mosquitto binary (default: mosquitto on PATH)
#   FLEETCORE   the fleetcore binary (default: target/release/fleetcore), e.g. a build of
#               an older commit for a before/after
#   DEV_PORT, BACKEND_PORT  the brokers' ports (default 28883, 28884; below 32768,
#               where Linux picks ephemeral ports)
#   TLS_RESUME=1  devices keep the session tickets they are given and offer them when
#               they reconnect (fleetcore-loadtest --tls-resume), for every broker;
#               fleetcore runs with its default [tls_resumption] (on). Unset: devices
#               never resume and fleetcore runs with [tls_resumption] enabled = false,
#               as every figure before resumption existed was measured.
#
# Needs: taskset, python3, mosquitto (Debian: apt-get install mosquitto).
set -euo pipefail

SCENARIO=${1:?usage: loadtest/compare.sh idle|push|fanin|storm|retained [options]}
shift
case $SCENARIO in idle | push | fanin | storm | retained) ;;
shadow)
    echo "mosquitto has no Device Shadow service, so there is nothing to compare: run loadtest/scripts/shadow_sweep.sh (fleetcore alone)" >&2
    exit 2
    ;;
*)
    echo "unknown scenario $SCENARIO" >&2
    exit 2
    ;;
esac
TRANSPORT=${TRANSPORT:-mtls}
BROKERS=${BROKERS:-fleetcore mosquitto-defaults mosquitto-tuned}
BROKER_CPU=${BROKER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
MOSQUITTO=${MOSQUITTO:-mosquitto}

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
RESULTS=$REPO/loadtest/results
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$RESULTS/$SCENARIO-$TRANSPORT-$STAMP
mkdir -p "$WORK"
TOOL=$REPO/target/release/fleetcore-loadtest
FLEETCORE=${FLEETCORE:-$REPO/target/release/fleetcore}

if [[ -z ${NO_BUILD:-} ]]; then
    echo "building release binaries ..." >&2
    cargo build --release -p fleetcore -p fleetcore-loadtest >&2
fi
command -v "$MOSQUITTO" >/dev/null || { echo "no $MOSQUITTO on PATH (apt-get install mosquitto)" >&2; exit 1; }

# Test PKI, kept across runs so the minted fleet (cached by CA) is reused.
PKI=$RESULTS/pki
if [[ ! -f $PKI/ca.pem ]]; then
    "$TOOL" pki --out "$PKI" --names localhost,127.0.0.1
fi
# mosquitto drops root privileges to the mosquitto user: it must read these.
chmod 755 "$PKI" && chmod 644 "$PKI"/*
FLEET=$RESULTS/fleet

# File descriptors: as many as this shell may have, for brokers and the tool.
ulimit -n "$(ulimit -Hn)" || true
echo "open files per process: $(ulimit -n)" >&2

# Ports (127.0.0.1). Devices: DEV_PORT; the backend: BACKEND_PORT (no device policy).
DEV_PORT=${DEV_PORT:-28883}
BACKEND_PORT=${BACKEND_PORT:-28884}
case $TRANSPORT in
mtls)
    DEV_URL=mqtts://localhost:$DEV_PORT
    BACKEND_URL=mqtts://localhost:$BACKEND_PORT
    ;;
tcp)
    DEV_URL=mqtt://127.0.0.1:$DEV_PORT
    BACKEND_URL=mqtt://127.0.0.1:$BACKEND_PORT
    ;;
wss)
    DEV_URL=wss://localhost:$DEV_PORT/mqtt
    BACKEND_URL=mqtts://localhost:$BACKEND_PORT
    ;;
*)
    echo "TRANSPORT must be mtls, tcp or wss" >&2
    exit 2
    ;;
esac
# Client connections spread over several source addresses: ~19,000 connections
# from one address to one port make every connect() search the ephemeral port
# range (28,232 ports, shared with TIME_WAIT sockets and whatever else runs), which
# made the generator, not the broker, the limit of connect rates and storm times.
SOURCE_ADDRS=${SOURCE_ADDRS:-127.0.0.2-127.0.0.9}
TOOL_ARGS=(--source-addrs "$SOURCE_ADDRS")
[[ -n ${TLS_RESUME:-} && $TRANSPORT != tcp ]] && TOOL_ARGS+=(--tls-resume)
if [[ $TRANSPORT != tcp ]]; then
    TOOL_ARGS+=(--ca "$PKI/ca.pem" --client-ca-cert "$PKI/ca.pem" --client-ca-key "$PKI/ca.key" --fleet-dir "$FLEET")
fi

fleetcore_conf() { # $1 = dir
    local d=$1
    cat <<EOF
data_dir = "$d/data"
[log]
level = "warn"
[limits]
max_connections = 1000000
[admin]
enabled = false
EOF
    [[ -n ${TLS_RESUME:-} ]] || printf '[tls_resumption]\nenabled = false\n'
    local tls="cert_file = \"$PKI/server.pem\"
key_file = \"$PKI/server.key\"
client_ca_file = \"$PKI/ca.pem\"
registry = false"
    case $TRANSPORT in
    mtls)
        printf '[[listener]]\nkind = "tls"\nbind = "127.0.0.1:%s"\n%s\npolicy_file = "%s"\n' "$DEV_PORT" "$tls" "$REPO/config/examples/agent-policy.json"
        printf '[[listener]]\nkind = "tls"\nbind = "127.0.0.1:%s"\n%s\n' "$BACKEND_PORT" "$tls"
        ;;
    tcp)
        printf '[[listener]]\nkind = "tcp"\nbind = "127.0.0.1:%s"\nallow_anonymous = true\n' "$DEV_PORT"
        printf '[[listener]]\nkind = "tcp"\nbind = "127.0.0.1:%s"\nallow_anonymous = true\n' "$BACKEND_PORT"
        ;;
    wss)
        printf '[[listener]]\nkind = "tls"\nwebsocket = true\ntokens = false\nbind = "127.0.0.1:%s"\n%s\npolicy_file = "%s"\n' "$DEV_PORT" "$tls" "$REPO/config/examples/agent-policy.json"
        printf '[[listener]]\nkind = "tls"\nbind = "127.0.0.1:%s"\n%s\n' "$BACKEND_PORT" "$tls"
        ;;
    esac
}

mosquitto_conf() { # $1 = dir, $2 = defaults|tuned
    local d=$1
    cat <<EOF
per_listener_settings false
persistence true
persistence_location $d/data/
log_dest stderr
log_type error
log_type warning
EOF
    if [[ $2 == tuned ]]; then
        cat <<EOF
set_tcp_nodelay true
max_inflight_messages 100
max_queued_messages 10000
max_keepalive 1200
EOF
    fi
    if [[ $TRANSPORT == tcp ]]; then
        printf 'allow_anonymous true\nlistener %s 127.0.0.1\nlistener %s 127.0.0.1\n' "$DEV_PORT" "$BACKEND_PORT"
        return
    fi
    # The same rights as fleetcore's agent policy: a device reaches only */<its CN>/...;
    # the backend (CN loadtest-backend) everything.
    printf 'pattern readwrite +/%%u/#\nuser loadtest-backend\ntopic readwrite #\n' >"$d/acl"
    chmod 644 "$d/acl"
    printf 'allow_anonymous false\nacl_file %s\n' "$d/acl"
    # (use_identity_as_username is a per-listener setting.)
    local tls="cafile $PKI/ca.pem
certfile $PKI/server.pem
keyfile $PKI/server.key
require_certificate true
use_identity_as_username true"
    # Tuned: the same TLS 1.3 suite fleetcore's server picks (AES-128-GCM-SHA256;
    # clients list AES-256 first, and OpenSSL follows the client's order).
    [[ $2 == tuned ]] && tls+="
ciphers_tls1.3 TLS_AES_128_GCM_SHA256"
    printf 'listener %s 127.0.0.1\n' "$DEV_PORT"
    [[ $TRANSPORT == wss ]] && printf 'protocol websockets\n'
    printf '%s\nlistener %s 127.0.0.1\n%s\n' "$tls" "$BACKEND_PORT" "$tls"
}

wait_port() { # wait until 127.0.0.1:$1 accepts, at most 15 s
    for _ in $(seq 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

stop_pid() { # SIGTERM, then SIGKILL after 15 s
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

run_one() { # $1 = broker name, $2 = label suffix, rest = tool options
    local name=$1 label=$2
    shift 2
    local d=$WORK/$name$label
    mkdir -p "$d/data"
    chmod 777 "$d" "$d/data"
    local cmd
    case $name in
    fleetcore)
        fleetcore_conf "$d" >"$d/fleetcore.toml"
        cmd="$FLEETCORE serve --config $d/fleetcore.toml"
        ;;
    mosquitto-defaults)
        mosquitto_conf "$d" defaults >"$d/mosquitto.conf"
        cmd="$MOSQUITTO -c $d/mosquitto.conf"
        ;;
    mosquitto-tuned)
        mosquitto_conf "$d" tuned >"$d/mosquitto.conf"
        cmd="$MOSQUITTO -c $d/mosquitto.conf"
        ;;
    rustls-null)
        # Accept + handshake + CONNACK/SUBACK and nothing else: the ceiling for `idle`.
        cmd="$TOOL null-broker --bind 127.0.0.1:$DEV_PORT"
        [[ $TRANSPORT == mtls ]] && cmd+=" --cert $PKI/server.pem --key $PKI/server.key --client-ca $PKI/ca.pem"
        ;;
    *)
        echo "unknown broker $name" >&2
        exit 2
        ;;
    esac
    # The start command, also used by the storm's restart.
    cat >"$d/start.sh" <<EOF
#!/usr/bin/env bash
ulimit -n \$(ulimit -Hn) 2>/dev/null
taskset -c $BROKER_CPU $cmd >>$d/broker.log 2>&1 &
echo \$! >$d/broker.pid
${BROKER_CGROUP:+echo \$! >$BROKER_CGROUP/cgroup.procs}
for _ in \$(seq 150); do
    if (exec 3<>/dev/tcp/127.0.0.1/$DEV_PORT) 2>/dev/null; then break; fi
    sleep 0.1
done
cat $d/broker.pid
EOF
    cat >"$d/restart.sh" <<EOF
#!/usr/bin/env bash
P=\$(cat $d/broker.pid)
kill -TERM \$P
while kill -0 \$P 2>/dev/null; do sleep 0.05; done
exec $d/start.sh
EOF
    chmod +x "$d/start.sh" "$d/restart.sh"
    echo "== $name$label: starting ($cmd, core $BROKER_CPU)" >&2
    "$d/start.sh" >/dev/null
    local pid
    pid=$(cat "$d/broker.pid")
    if ! kill -0 "$pid" 2>/dev/null || ! wait_port "$DEV_PORT"; then
        echo "== $name$label: did not start; see $d/broker.log" >&2
        tail -5 "$d/broker.log" >&2 || true
        echo '{"error": "broker did not start"}' >"$d/result.json"
        stop_pid "$pid"
        return 0
    fi
    local extra=()
    [[ $SCENARIO == storm ]] && extra=(--restart-cmd "$d/restart.sh")
    echo "== $name$label: running $SCENARIO (load generator on core $LOADGEN_CPU)" >&2
    if ! taskset -c "$LOADGEN_CPU" "$TOOL" "$SCENARIO" --url "$DEV_URL" --backend-url "$BACKEND_URL" \
        "${TOOL_ARGS[@]}" --broker-pid "$pid" --json "${extra[@]}" "$@" >"$d/result.json" 2>"$d/loadtest.log"; then
        echo "== $name$label: the load test failed; see $d/loadtest.log" >&2
        tail -3 "$d/loadtest.log" >&2 || true
        [[ -s $d/result.json ]] || echo '{"error": "load test failed"}' >"$d/result.json"
    fi
    stop_pid "$(cat "$d/broker.pid")"
}

RUNS=()
if [[ -n ${RATES:-} && ($SCENARIO == push || $SCENARIO == fanin) ]]; then
    for rate in $RATES; do
        for b in $BROKERS; do
            run_one "$b" "@$rate" --msg-rate "$rate" "$@"
            RUNS+=("$b@$rate")
        done
    done
else
    for b in $BROKERS; do
        run_one "$b" "" "$@"
        RUNS+=("$b")
    done
fi

OUT=$RESULTS/$SCENARIO-$TRANSPORT-$STAMP.md
python3 "$REPO/loadtest/table.py" "$SCENARIO" "$TRANSPORT" "$WORK" "$*" "${RUNS[@]}" | tee "$OUT"
echo "results: $OUT (raw JSON and logs in $WORK)" >&2
