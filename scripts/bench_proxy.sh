#!/usr/bin/env bash
# The latency the gateway adds over a bare hyper proxy, side by side in one run (release builds).
#
# One mock upstream (the gateway's mock model server, `mock_upstream`), and three ways to reach
# it on loopback:
#   upstream  the mock itself, directly (the floor of the loopback round trip);
#   bare      `bare_proxy`: hyper-util's server and pooled client, no policy at all;
#   gateway   the gateway (memory backend, `upstream = "http://..."`): every request a billed
#             chat completion (authenticate, IP allowlist, rate limit, credits reserve + settle).
# For each, alternating, ROUNDS times:
#   - `loadgen` at a fixed RATE (open loop, 16 keep-alive connections): p50 / p99 in µs;
#   - `wrk` (2 threads, 16 connections): the most requests/s.
# Then the gateway's books: credits charged, nothing left held.
#
#   scripts/bench_proxy.sh [RATE=1000] [SECONDS=10] [ROUNDS=2]
#
# Everything (servers, load generators) shares the machine: on a small one the load generator's
# own CPU is part of what is measured, for the three alike. Say what else the machine was doing
# (`uptime` is printed) when quoting the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE="${1:-1000}"
SECONDS_PER_RUN="${2:-10}"
ROUNDS="${3:-2}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is missing" >&2; exit 1; }
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p tollgate-gateway \
  --bin gateway --bin mock_upstream --bin bare_proxy --bin loadgen --quiet
BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release")"
DIR="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

UP=18300 BARE=18301 GW=18302
KEY="sk-bench-0123456789abcdefghijklmn"
ADMIN="admin-bench-0123456789"
BODY='{"model":"mock-small","max_tokens":16,"messages":[{"role":"user","content":"Hello"}]}'
ROUTE=/v1/chat/completions

cat > "$DIR/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GW"
upstream = "http://127.0.0.1:$UP"

[admin]
key = "$ADMIN"

[backend]
kind = "memory"

[[plans]]
name = "bench"
requests_per_minute = 100000000
burst = 1000000
tokens_per_minute = 1000000000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 2

[[accounts]]
id = "acct_bench"
plan = "bench"
balance = 1000000000000

[[keys]]
id = "key_bench"
account = "acct_bench"
key = "$KEY"
TOML

cat > "$DIR/chat.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'
LUA

wait_up() { # port name log
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/v1/models" && return
    sleep 0.1
  done
  echo "$2 did not start" >&2; cat "$3" >&2; exit 1
}

"$BIN/mock_upstream" "127.0.0.1:$UP" > "$DIR/upstream.log" 2>&1 & PIDS+=($!)
wait_up $UP upstream "$DIR/upstream.log"
"$BIN/bare_proxy" "127.0.0.1:$BARE" "http://127.0.0.1:$UP" > "$DIR/bare.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/gateway" --config "$DIR/gateway.toml" > "$DIR/gateway.log" 2>&1 & PIDS+=($!)
wait_up $BARE bare "$DIR/bare.log"
wait_up $GW gateway "$DIR/gateway.log"

balance() { # -> "balance held"
  curl -s "http://127.0.0.1:$GW/admin/accounts/acct_bench" -H "Authorization: Bearer $ADMIN" \
    | python3 -c 'import json,sys; a=json.load(sys.stdin); print(a["balance"], a.get("held", 0))'
}
read -r BALANCE_START _ <<< "$(balance)"
# The gateway answers a billed request (not a refusal) before anything is measured.
status="$(curl -s -o "$DIR/first.json" -w '%{http_code}' "http://127.0.0.1:$GW$ROUTE" \
  -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY")"
[ "$status" = 200 ] || { echo "the gateway answered $status:" >&2; cat "$DIR/first.json" >&2; exit 1; }

sleep 0.2
read -r BALANCE_BEFORE _ <<< "$(balance)"
COST=$((BALANCE_START - BALANCE_BEFORE))
[ "$COST" -gt 0 ] || { echo "the gateway's request was not charged" >&2; exit 1; }

port_of() { case "$1" in upstream) echo $UP ;; bare) echo $BARE ;; gateway) echo $GW ;; esac; }

# Warm up all three (connection pools, allocator, branch predictors).
GW_WARM=0
for t in upstream bare gateway; do
  warm="$(wrk -t1 -c4 -d1s -s "$DIR/chat.lua" "http://127.0.0.1:$(port_of $t)$ROUTE" | awk '/requests in/ {print $1}')"
  [ "$t" = gateway ] && GW_WARM="${warm:-0}"
done

echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(uptime | sed 's/.*load average: //')"
echo "== fixed rate $RATE req/s for ${SECONDS_PER_RUN}s (loadgen, 16 connections); max req/s (wrk -t2 -c16 -d${SECONDS_PER_RUN}s)"
GW_OK=0
for round in $(seq "$ROUNDS"); do
  for t in upstream bare gateway; do
    line="$("$BIN/loadgen" --url "http://127.0.0.1:$(port_of $t)$ROUTE" --rate "$RATE" \
      --seconds "$SECONDS_PER_RUN" --connections 16 --header "Authorization: Bearer $KEY" \
      --body "$BODY" || true)"
    wrk_out="$(wrk -t2 -c16 -d"${SECONDS_PER_RUN}s" -s "$DIR/chat.lua" "http://127.0.0.1:$(port_of $t)$ROUTE")"
    rps="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<< "$wrk_out")"
    non2xx="$(awk '/Non-2xx/ {print $NF}' <<< "$wrk_out")"
    echo "round $round $t $line max_rps=$rps${non2xx:+ wrk_non2xx=$non2xx}" | tee -a "$DIR/results"
    if [ "$t" = gateway ]; then
      ok="$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' <<< "$line")"
      done_wrk="$(awk '/requests in/ {print $1}' <<< "$wrk_out")"
      GW_OK=$((GW_OK + ${ok:-0} + ${done_wrk:-0}))
    fi
  done
done

echo "== medians over the rounds (µs; max in req/s)"
python3 - "$DIR/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    fields = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
    rows.setdefault(parts[2], []).append(fields)
def med(t, k):
    return statistics.median(float(r[k]) for r in rows[t])
for t in ("upstream", "bare", "gateway"):
    late = sum(int(r.get("late", 0)) for r in rows[t])
    errors = sum(int(r.get("errors", 0)) for r in rows[t])
    print(f"{t:9} p50 {med(t,'p50_us'):7.0f}  p99 {med(t,'p99_us'):7.0f}  max {med(t,'max_rps'):7.0f} req/s  (late {late}, errors {errors})")
print(f"gateway over bare: p50 +{med('gateway','p50_us') - med('bare','p50_us'):.0f} µs, "
      f"p99 +{med('gateway','p99_us') - med('bare','p99_us'):.0f} µs, "
      f"max req/s {med('gateway','max_rps') / med('bare','max_rps'):.2f}x of bare")
print(f"bare over upstream: p50 +{med('bare','p50_us') - med('upstream','p50_us'):.0f} µs, "
      f"p99 +{med('bare','p99_us') - med('upstream','p99_us'):.0f} µs")
PY

# The gateway's requests were billed: credits charged, no hold left open once they settled.
sleep 0.5
read -r BALANCE_AFTER HELD <<< "$(balance)"
CHARGED=$((BALANCE_BEFORE - BALANCE_AFTER))
# Every request the gateway answered was charged, loadgen's warm-up second included (it sends
# ROUNDS * RATE more than it counts); wrk may leave a few in flight when it stops (charged too).
echo "== gateway books: $COST credits per request; $CHARGED charged = $((CHARGED / COST)) requests;" \
  "answered and counted: $((GW_OK + GW_WARM + 1)) + loadgen warm-ups $((ROUNDS * RATE)); $HELD held after"
