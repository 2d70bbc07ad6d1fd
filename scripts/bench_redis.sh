#!/usr/bin/env bash
# The gateway on one Redis under load: what each billed request costs Redis.
#
# Starts its own `redis-server` (a free port, no persistence) and the gateway example (release,
# `[backend] kind = "redis"`, built-in mock upstream, 8 accounts with one key each), then:
#   1. loadgen, ~1k billed requests: Redis memory (`used_memory`) after them;
#   2. `wrk` (2 threads, 8 connections, one key per connection) for SECONDS: billed requests/s,
#      Redis CPU per billed request (`INFO cpu` used_cpu_sys + used_cpu_user, delta / billed; and
#      Σ `commandstats` usec of the calls clients made: FCALL/EVALSHA, inner commands included),
#      commands and scripts per billed request (`INFO commandstats`, the commands inside
#      scripts counted too), round trips per billed request (calls made by clients: FCALL, EVALSHA and
#      any command sent on its own), and where the time went (usec per command);
#   3. loadgen until ~20k billed requests in all: Redis memory again (flat: bounded);
#   4. loadgen at a fixed RATE on the Redis gateway and on the same gateway with the memory
#      backend: the p50 (and p99) the Redis path adds.
# A billed request is one reserve and one settle: billed = (Σ journal sequence numbers) / 2,
# read with HGET (no script counted). The journal limit is small (BENCH_JOURNAL_LIMIT, 200) so
# that the lists reach it early: memory after 1k and 20k requests is then the steady state.
#
#   scripts/bench_redis.sh [SECONDS=10] [RATE=1000]
#   BENCH_NO_BUILD=1 scripts/bench_redis.sh   # use the binaries already built
#
# Needs `wrk`, `redis-server`, `redis-cli`, `curl`. Run it alone on the machine (quote `uptime`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN="${1:-10}"
RATE="${2:-1000}"
JOURNAL_LIMIT="${BENCH_JOURNAL_LIMIT:-200}"
# shellcheck source=scripts/lib_redis_bench.sh
. scripts/lib_redis_bench.sh
bench_prepare redis
RPORT="$(free_port)"; GW="$(free_port)"; GWM="$(free_port)"
ADMIN="admin-bench-0123456789"
R=(redis-cli -p "$RPORT")

redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no \
  > "$DIR/redis.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do "${R[@]}" ping >/dev/null 2>&1 && break; sleep 0.05; done

config "kind = \"redis\"
url = \"redis://127.0.0.1:$RPORT/\"" "$GW" > "$DIR/redis.toml"
config 'kind = "memory"' "$GWM" > "$DIR/memory.toml"
RUST_LOG=warn "$BIN/gateway" --config "$DIR/redis.toml" > "$DIR/gateway.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/gateway" --config "$DIR/memory.toml" > "$DIR/gateway-memory.log" 2>&1 & PIDS+=($!)
wait_up "$GW" "$DIR/gateway.log"
wait_up "$GWM" "$DIR/gateway-memory.log"

billed() { # Σ seq / 2 over the 8 accounts
  local total=0 seq
  for i in 0 1 2 3 4 5 6 7; do
    seq="$("${R[@]}" hget "tollgate:{acct:acct_$i}" seq)"
    total=$((total + ${seq:-0}))
  done
  echo $((total / 2))
}
info() { "${R[@]}" info "$1" | tr -d '\r'; }
field() { sed -n "s/^$1:\(.*\)/\1/p"; }
cpu_us() { info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.0f", s * 1e6}'; }
reads() { info stats | field total_reads_processed; }
memory() { info memory | field used_memory; }

first_request "$GW"

echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(uptime | sed 's/.*load average: //'); $(redis-server --version | cut -d' ' -f1-3)"
# 1. ~1k billed requests (one key per loadgen run, all 8 accounts).
for i in 0 1 2 3 4 5 6 7; do loadgen "http://127.0.0.1:$GW" 250 1 "$i" > /dev/null || true; done
sleep 0.5
echo "after $(billed) billed requests: used_memory $(memory) bytes"

# 2. wrk, 8 connections, one key each.
write_wrk_script "$DIR/chat.lua"
wrk -t2 -c8 -d2s -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > /dev/null
sleep 0.5
"${R[@]}" config resetstat > /dev/null
b0="$(billed)"; c0="$(cpu_us)"; r0="$(reads)"
wrk -t2 -c8 -d"${SECONDS_RUN}s" --latency -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > "$DIR/wrk.txt"
# Requests cut by wrk's end settle or release in the background: let them land.
sleep 1
b1="$(billed)"; c1="$(cpu_us)"; r1="$(reads)"
info commandstats > "$DIR/commandstats"
n=$((b1 - b0))
wrk_summary "$DIR/wrk.txt" "$n" "$SECONDS_RUN"
summarize_commandstats "$n" "$((c1 - c0))" "$DIR/commandstats"
# Whether the gateway's one multiplexed connection batches concurrent calls: socket reads Redis
# made (INFO total_reads_processed; the bench's own few redis-cli calls included) per FCALL.
fcalls="$(sed -n 's/^cmdstat_fcall:calls=\([0-9]*\).*/\1/p' "$DIR/commandstats")"
awk -v r="$((r1 - r0))" -v f="${fcalls:-0}" 'BEGIN { if (f > 0) printf "socket reads by Redis: %d for %d FCALLs (%.2f per FCALL)\n", r, f, r / f }'
# Only the bench's own HGETs are sent alone; commandstats above counts them in hget: the
# script-only commands are what the scripts run.

# 3. up to ~20k billed requests in all.
total="$(billed)"
if [ "$total" -lt 20000 ]; then
  per_key=$(( (20000 - total) / 8 / 2 + 1 ))
  for i in 0 1 2 3 4 5 6 7; do loadgen "http://127.0.0.1:$GW" 1000 "$(( (per_key + 999) / 1000 ))" "$i" > /dev/null || true; done
  sleep 0.5
fi
echo "after $(billed) billed requests: used_memory $(memory) bytes (journal limit $JOURNAL_LIMIT per account)"
for i in 0; do
  echo "account acct_$i: hash $("${R[@]}" memory usage "tollgate:{acct:acct_$i}") bytes ($("${R[@]}" hlen "tollgate:{acct:acct_$i}") fields)," \
    "journal $("${R[@]}" memory usage "tollgate:{acct:acct_$i}:log" samples 0) bytes ($("${R[@]}" llen "tollgate:{acct:acct_$i}:log") entries)"
done

# 4. The p50 the Redis path adds at a fixed rate.
fixed_rate "$GW" "$GWM" "$RATE" "$SECONDS_RUN" redis
held=0
for i in 0 1 2 3 4 5 6 7; do held=$((held + $("${R[@]}" hget "tollgate:{acct:acct_$i}" held))); done
echo "credits still held after the run: $held; load: $(uptime | sed 's/.*load average: //')"
