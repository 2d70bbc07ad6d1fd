#!/usr/bin/env bash
# The floor of Redis CPU per billed request on this machine: what two calls cost Redis when
# the functions do nothing (FCALL of an empty function; the same with one TIME; an empty
# EVALSHA for comparison), from `INFO cpu` (user+sys) and `INFO commandstats`, with
# redis-benchmark (8 connections, no pipelining: one round trip per call, as the gateway).
#
#   scripts/bench_redis_floor.sh [CALLS=200000]
#
# Starts its own redis-server on a free port. Run it alone on the machine.
set -euo pipefail
N="${1:-200000}"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no > /dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
R=(redis-cli -p "$PORT")
for _ in $(seq 100); do "${R[@]}" ping > /dev/null 2>&1 && break; sleep 0.05; done
"${R[@]}" function load "#!lua name=floor
redis.register_function('floor_noop', function(keys, args) return 1 end)
redis.register_function('floor_time', function(keys, args) redis.call('TIME') return 1 end)" > /dev/null
SHA="$("${R[@]}" script load "return 1")"
cpu_us() { "${R[@]}" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.0f", s * 1e6}'; }
echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(uptime | sed 's/.*load average: //'); $(redis-server --version | cut -d' ' -f1-3)"
for call in "FCALL floor_noop 0" "FCALL floor_time 0" "EVALSHA $SHA 0" "PING"; do
  "${R[@]}" config resetstat > /dev/null
  c0="$(cpu_us)"
  # shellcheck disable=SC2086
  redis-benchmark -p "$PORT" -c 8 -n "$N" -q $call > /dev/null
  c1="$(cpu_us)"
  name="$(echo "$call" | cut -d' ' -f1 | tr 'A-Z' 'a-z')"
  per="$("${R[@]}" info commandstats | tr -d '\r' | sed -n "s/^cmdstat_$name:.*usec_per_call=\([0-9.]*\).*/\1/p")"
  awk -v c="$call" -v n="$N" -v d="$((c1 - c0))" -v p="$per" 'BEGIN {
    printf "%-22s INFO cpu %.2f µs per call (%.2f per 2 calls); commandstats %.2f µs per call\n",
      (substr(c, 1, 7) == "EVALSHA" ? "EVALSHA <return 1>" : c), d / n, 2 * d / n, p }'
done
