#!/usr/bin/env bash
# The gateway on a 3-master Redis Cluster under load: billed requests/s, Redis CPU per billed
# request summed over the masters, round trips per billed request, and the p50 the cluster path
# adds over the memory backend. The counterpart of scripts/bench_redis.sh (one Redis), sharing
# its config, wrk script and summaries (scripts/lib_redis_bench.sh).
#
# Starts its own cluster (6 `redis-server --cluster-enabled yes` on free ports, no persistence,
# `redis-cli --cluster create --cluster-replicas 1`: 3 masters, 3 replicas) and the gateway
# example (release, `[backend] kind = "redis"` with `cluster = [...]`, built-in mock upstream,
# 8 accounts with one key each, spread over the masters' slots), then:
#   1. `wrk` (2 threads, 8 connections) for SECONDS: billed requests/s, Redis CPU per billed
#      request (`INFO cpu` used_cpu_sys + used_cpu_user of every master, delta / billed),
#      scripts, commands and round trips per billed request (`INFO commandstats` of every
#      master, summed);
#   2. loadgen at a fixed RATE on the cluster gateway and on the same gateway with the memory
#      backend: the p50 (and p99) the cluster path adds.
# A billed request is one reserve and one settle: billed = (Σ journal sequence numbers) / 2.
#
#   scripts/bench_redis_cluster.sh [SECONDS=10] [RATE=1000]
#   BENCH_NO_BUILD=1 scripts/bench_redis_cluster.sh   # use the binaries already built
#
# Needs `wrk`, `redis-server`, `redis-cli`, `curl`. Run it alone on the machine (quote `uptime`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN="${1:-10}"
RATE="${2:-1000}"
JOURNAL_LIMIT="${BENCH_JOURNAL_LIMIT:-200}"
# shellcheck source=scripts/lib_redis_bench.sh
. scripts/lib_redis_bench.sh
bench_prepare cluster
ADMIN="admin-bench-0123456789"

# A node's port and its bus port (+10000) must both be free.
cluster_port() {
  local p
  while :; do
    p="$(free_port)"
    [ "$p" -lt 55000 ] && python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $p + 10000))" 2>/dev/null && { echo "$p"; return; }
  done
}
PORTS=()
for n in 1 2 3 4 5 6; do
  port="$(cluster_port)"
  mkdir -p "$DIR/node-$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --dir "$DIR/node-$port" > "$DIR/node-$port.log" 2>&1 & PIDS+=($!)
  PORTS+=("$port")
done
for port in "${PORTS[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 1 --cluster-yes \
  > "$DIR/create.log" 2>&1 || { cat "$DIR/create.log" >&2; exit 1; }
for _ in $(seq 300); do
  ok=1
  for port in "${PORTS[@]}"; do
    redis-cli -p "$port" cluster info | tr -d '\r' | grep -q '^cluster_state:ok' || ok=0
  done
  [ "$ok" = 1 ] && break
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "the cluster is not ok" >&2; exit 1; }
MASTERS=()
for port in "${PORTS[@]}"; do
  redis-cli -p "$port" info replication | tr -d '\r' | grep -q '^role:master' && MASTERS+=("$port")
done
[ "${#MASTERS[@]}" = 3 ] || { echo "expected 3 masters, got ${#MASTERS[@]}" >&2; exit 1; }

GW="$(free_port)"; GWM="$(free_port)"
nodes="$(printf '"redis://127.0.0.1:%s", ' "${MASTERS[@]}")"
config "kind = \"redis\"
cluster = [${nodes%, }]" "$GW" > "$DIR/cluster.toml"
config 'kind = "memory"' "$GWM" > "$DIR/memory.toml"
RUST_LOG=warn "$BIN/gateway" --config "$DIR/cluster.toml" > "$DIR/gateway.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/gateway" --config "$DIR/memory.toml" > "$DIR/gateway-memory.log" 2>&1 & PIDS+=($!)
wait_up "$GW" "$DIR/gateway.log"
wait_up "$GWM" "$DIR/gateway-memory.log"

RC=(redis-cli -c -p "${MASTERS[0]}")
billed() { # Σ seq / 2 over the 8 accounts (redis-cli -c follows MOVED)
  local total=0 seq
  for i in 0 1 2 3 4 5 6 7; do
    seq="$("${RC[@]}" hget "tollgate:{acct:acct_$i}" seq)"
    total=$((total + ${seq:-0}))
  done
  echo $((total / 2))
}
cpu_us() { # sys+user of every master, µs
  for port in "${MASTERS[@]}"; do redis-cli -p "$port" info cpu | tr -d '\r'; done \
    | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.0f", s * 1e6}'
}
spread="$(for i in 0 1 2 3 4 5 6 7; do
  slot="$("${RC[@]}" cluster keyslot "tollgate:{acct:acct_$i}")"
  for port in "${MASTERS[@]}"; do
    [ "$(redis-cli -p "$port" cluster nodes | tr -d '\r' | awk '/myself/ {for (i = 9; i <= NF; i++) print $i}' \
      | awk -F- -v s="$slot" '{lo = $1; hi = ($2 == "" ? $1 : $2); if (s >= lo && s <= hi) print "y"}')" = y ] && echo "$port"
  done
done | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')"

first_request "$GW"

echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(uptime | sed 's/.*load average: //'); $(redis-server --version | cut -d' ' -f1-3); cluster: 3 masters + 3 replicas; accounts per master (port:n) $spread"
write_wrk_script "$DIR/chat.lua"
wrk -t2 -c8 -d2s -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > /dev/null
sleep 0.5
for port in "${MASTERS[@]}"; do redis-cli -p "$port" config resetstat > /dev/null; done
b0="$(billed)"; c0="$(cpu_us)"
wrk -t2 -c8 -d"${SECONDS_RUN}s" --latency -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > "$DIR/wrk.txt"
# Requests cut by wrk's end settle or release in the background: let them land.
sleep 1
b1="$(billed)"; c1="$(cpu_us)"
files=()
for port in "${MASTERS[@]}"; do
  redis-cli -p "$port" info commandstats | tr -d '\r' > "$DIR/commandstats-$port"
  files+=("$DIR/commandstats-$port")
done
n=$((b1 - b0))
wrk_summary "$DIR/wrk.txt" "$n" "$SECONDS_RUN"
# The bench's own HGETs (billed) are in hget; `cluster|slots` and the like are the client's
# topology reads.
summarize_commandstats "$n" "$((c1 - c0))" "${files[@]}"

fixed_rate "$GW" "$GWM" "$RATE" "$SECONDS_RUN" redis-cluster
held=0
for i in 0 1 2 3 4 5 6 7; do held=$((held + $("${RC[@]}" hget "tollgate:{acct:acct_$i}" held))); done
echo "credits still held after the run: $held; load: $(uptime | sed 's/.*load average: //')"
