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
for tool in wrk redis-server redis-cli curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p tollgate-gateway --features redis \
  --bin gateway --bin loadgen --quiet
BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release")"
DIR="$(mktemp -d /tmp/tollgate-bench-redis.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RPORT="$(free_port)"; GW="$(free_port)"; GWM="$(free_port)"
ADMIN="admin-bench-0123456789"
BODY='{"model":"mock-small","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
ROUTE=/v1/chat/completions
R=(redis-cli -p "$RPORT")

redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no \
  > "$DIR/redis.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do "${R[@]}" ping >/dev/null 2>&1 && break; sleep 0.05; done

config() { # backend-lines port
  cat <<TOML
[server]
listen = "127.0.0.1:$2"
upstream = "mock"
journal_limit = $JOURNAL_LIMIT

[admin]
key = "$ADMIN"

[backend]
$1

[[plans]]
name = "big"
requests_per_minute = 100000000
burst = 10000000
tokens_per_minute = 2000000000

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1
TOML
  for i in 0 1 2 3 4 5 6 7; do
    cat <<TOML

[[accounts]]
id = "acct_$i"
plan = "big"
balance = 1000000000000

[[keys]]
id = "key_$i"
account = "acct_$i"
key = "sk-bench-redis-$i-0123456789abcdef"
TOML
  done
}
config "kind = \"redis\"
url = \"redis://127.0.0.1:$RPORT/\"" "$GW" > "$DIR/redis.toml"
config 'kind = "memory"' "$GWM" > "$DIR/memory.toml"
RUST_LOG=warn "$BIN/gateway" --config "$DIR/redis.toml" > "$DIR/gateway.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn "$BIN/gateway" --config "$DIR/memory.toml" > "$DIR/gateway-memory.log" 2>&1 & PIDS+=($!)
wait_up() { # port log
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/v1/models" && return
    sleep 0.1
  done
  echo "the gateway did not start" >&2; cat "$2" >&2; exit 1
}
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
memory() { info memory | field used_memory; }
loadgen() { # url rate seconds key
  "$BIN/loadgen" --url "$1$ROUTE" --rate "$2" --seconds "$3" --connections 8 \
    --header "Authorization: Bearer sk-bench-redis-$4-0123456789abcdef" --body "$BODY"
}

status="$(curl -s -o "$DIR/first.json" -w '%{http_code}' "http://127.0.0.1:$GW$ROUTE" \
  -H "Authorization: Bearer sk-bench-redis-0-0123456789abcdef" -H 'Content-Type: application/json' -d "$BODY")"
[ "$status" = 200 ] || { echo "the gateway answered $status:" >&2; cat "$DIR/first.json" >&2; exit 1; }

echo "== $(date -u +%FT%TZ) $(nproc) cores; load: $(uptime | sed 's/.*load average: //'); $(redis-server --version | cut -d' ' -f1-3)"
# 1. ~1k billed requests (one key per loadgen run, all 8 accounts).
for i in 0 1 2 3 4 5 6 7; do loadgen "http://127.0.0.1:$GW" 250 1 "$i" > /dev/null || true; done
sleep 0.5
echo "after $(billed) billed requests: used_memory $(memory) bytes"

# 2. wrk, 8 connections, one key each.
cat > "$DIR/chat.lua" <<LUA
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
local n = 0
function request()
  n = n + 1
  local key = (id * 4 + (n % 4)) % 8
  return wrk.format("POST", "$ROUTE", {
    ["Authorization"] = "Bearer sk-bench-redis-" .. key .. "-0123456789abcdef",
    ["Content-Type"] = "application/json",
  }, '$BODY')
end
LUA
wrk -t2 -c8 -d2s -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > /dev/null
sleep 0.5
"${R[@]}" config resetstat > /dev/null
b0="$(billed)"; c0="$(cpu_us)"
wrk -t2 -c8 -d"${SECONDS_RUN}s" --latency -s "$DIR/chat.lua" "http://127.0.0.1:$GW" > "$DIR/wrk.txt"
# Requests cut by wrk's end settle or release in the background: let them land.
sleep 1
b1="$(billed)"; c1="$(cpu_us)"
info commandstats > "$DIR/commandstats"
n=$((b1 - b0))
rps="$(awk "BEGIN { printf \"%.0f\", $n / $SECONDS_RUN }")"
non2xx="$(awk '/Non-2xx/ {print $NF}' "$DIR/wrk.txt")"
echo "wrk -t2 -c8 -d${SECONDS_RUN}s: $n billed requests, $rps billed req/s; wrk p50 $(awk '/^ +50%/ {print $2}' "$DIR/wrk.txt")${non2xx:+; non-2xx $non2xx}"
python3 - "$DIR/commandstats" "$n" "$((c1 - c0))" <<'PY'
import sys
stats, billed, cpu = {}, int(sys.argv[2]), int(sys.argv[3])
for line in open(sys.argv[1]):
    if not line.startswith("cmdstat_"):
        continue
    name, rest = line[len("cmdstat_"):].split(":", 1)
    kv = dict(p.split("=", 1) for p in rest.strip().split(","))
    stats[name] = (int(kv["calls"]), int(kv["usec"]))
# Ours (the bench's own reads) aside.
for ours in ("info", "config", "hget|bench"):
    stats.pop(ours, None)
CALLS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")
scripts = sum(c for n, (c, _) in stats.items() if n in CALLS)
script_usec = sum(u for n, (_, u) in stats.items() if n in CALLS)
inner = {n: v for n, v in stats.items() if n not in CALLS}
commands = sum(c for c, _ in inner.values())
# A script's or function's usec includes the commands it runs: the total is the outer calls'.
print(f"Redis CPU (INFO cpu, sys+user): {cpu / billed:.1f} µs per billed request")
print(f"Redis CPU (Σ commandstats usec of the calls clients made): {script_usec / billed:.1f} µs per billed request")
print(f"scripts/functions: {scripts / billed:.2f} per billed request, {script_usec / max(scripts, 1):.1f} µs each "
      f"(commandstats, inner commands included)")
print(f"commands inside scripts (and any sent alone): {commands / billed:.2f} per billed request")
print(f"round trips: {scripts / billed:.2f} script calls per billed request, plus commands sent alone "
      f"(the key store's cache is warm: none expected)")
print("per billed request, by command (calls, µs; usec_per_call):")
for n, (c, u) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
    print(f"  {n:12} {c / billed:6.2f} calls  {u / billed:6.2f} µs  {u / max(c, 1):6.2f} µs/call")
PY
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
for round in 1 2; do
  for kind in memory redis; do
    port="$GW"; [ "$kind" = memory ] && port="$GWM"
    echo "$kind $(loadgen "http://127.0.0.1:$port" "$RATE" "$SECONDS_RUN" 1 || true)" >> "$DIR/fixed"
  done
done
python3 - "$DIR/fixed" "$RATE" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, *parts = line.split()
    rows.setdefault(kind, []).append(dict(p.split("=", 1) for p in parts if "=" in p))
med = lambda k, f: statistics.median(float(r[f]) for r in rows[k])
print(f"fixed rate {sys.argv[2]} req/s (loadgen, 8 connections, medians of 2): "
      f"memory p50 {med('memory', 'p50_us'):.0f} µs p99 {med('memory', 'p99_us'):.0f} µs; "
      f"redis p50 {med('redis', 'p50_us'):.0f} µs p99 {med('redis', 'p99_us'):.0f} µs; "
      f"Redis adds p50 +{med('redis', 'p50_us') - med('memory', 'p50_us'):.0f} µs")
PY
held=0
for i in 0 1 2 3 4 5 6 7; do held=$((held + $("${R[@]}" hget "tollgate:{acct:acct_$i}" held))); done
echo "credits still held after the run: $held; load: $(uptime | sed 's/.*load average: //')"
