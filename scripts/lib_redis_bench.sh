# Shared by scripts/bench_redis.sh (one Redis) and scripts/bench_redis_cluster.sh (a Redis
# Cluster): the gateway config, start-up checks, the wrk script, loadgen and the
# `INFO commandstats` summary. Sourced, not run; `bench_prepare` sets BIN and DIR, the
# functions after it expect those and ADMIN, JOURNAL_LIMIT.

# The tools needed, the release binaries (unless BENCH_NO_BUILD), BIN, a work DIR and a PIDS
# list that are cleaned up on exit (every process in PIDS killed).
bench_prepare() { # name (of the work dir)
  local tool
  for tool in wrk redis-server redis-cli curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
  done
  [ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p tollgate-gateway --features redis \
    --bin gateway --bin loadgen --quiet
  BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release")"
  DIR="$(mktemp -d "/tmp/tollgate-bench-$1.XXXXXX")"
  PIDS=()
  trap cleanup EXIT
}

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}

BODY='{"model":"mock-small","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
ROUTE=/v1/chat/completions

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The gateway config: [backend] lines, listen port; 8 accounts with one key each.
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

wait_up() { # port log
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/v1/models" && return
    sleep 0.1
  done
  echo "the gateway did not start" >&2; cat "$2" >&2; exit 1
}

# One billed request must answer 200 before measuring.
first_request() { # port
  local status
  status="$(curl -s -o "$DIR/first.json" -w '%{http_code}' "http://127.0.0.1:$1$ROUTE" \
    -H "Authorization: Bearer sk-bench-redis-0-0123456789abcdef" -H 'Content-Type: application/json' -d "$BODY")"
  [ "$status" = 200 ] || { echo "the gateway answered $status:" >&2; cat "$DIR/first.json" >&2; exit 1; }
}

loadgen() { # url rate seconds key
  "$BIN/loadgen" --url "$1$ROUTE" --rate "$2" --seconds "$3" --connections 8 \
    --header "Authorization: Bearer sk-bench-redis-$4-0123456789abcdef" --body "$BODY"
}

# wrk's script: 8 connections over 2 threads, each connection on 4 of the 8 keys in turn.
write_wrk_script() { # file
  cat > "$1" <<LUA
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
}

# The wrk line of a run.
wrk_summary() { # wrk-output billed seconds
  local rps non2xx
  rps="$(awk "BEGIN { printf \"%.0f\", $2 / $3 }")"
  non2xx="$(awk '/Non-2xx/ {print $NF}' "$1")"
  echo "wrk -t2 -c8 -d${3}s: $2 billed requests, $rps billed req/s; wrk p50 $(awk '/^ +50%/ {print $2}' "$1")${non2xx:+; non-2xx $non2xx}"
}

# Per billed request: Redis CPU, scripts, commands, round trips, from `INFO commandstats`
# files (one per server; summed).
summarize_commandstats() { # billed cpu-usec file...
  python3 - "$@" <<'PY'
import sys
billed, cpu, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
stats = {}
for path in files:
    for line in open(path):
        if not line.startswith("cmdstat_"):
            continue
        name, rest = line[len("cmdstat_"):].split(":", 1)
        kv = dict(p.split("=", 1) for p in rest.strip().split(","))
        calls, usec = stats.get(name, (0, 0))
        stats[name] = (calls + int(kv["calls"]), usec + int(kv["usec"]))
# Ours (the bench's own reads) aside.
for ours in ("info", "config", "config|resetstat", "hget|bench"):
    stats.pop(ours, None)
SCRIPTS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")
scripts = sum(c for n, (c, _) in stats.items() if n in SCRIPTS)
script_usec = sum(u for n, (_, u) in stats.items() if n in SCRIPTS)
inner = {n: v for n, v in stats.items() if n not in SCRIPTS}
commands = sum(c for c, _ in inner.values())
where = "summed over the masters" if len(files) > 1 else "sys+user"
print(f"Redis CPU (INFO cpu, {where}): {cpu / billed:.1f} µs per billed request")
# A script's or function's usec includes the commands it runs: the total is the outer calls'.
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
}

# The p50 the Redis path adds at a fixed rate: loadgen on the memory gateway and on the Redis
# one, two rounds each, medians.
fixed_rate() { # redis-port memory-port rate seconds label
  local round kind port
  : > "$DIR/fixed"
  for round in 1 2; do
    for kind in memory redis; do
      port="$1"; [ "$kind" = memory ] && port="$2"
      echo "$kind $(loadgen "http://127.0.0.1:$port" "$3" "$4" 1 || true)" >> "$DIR/fixed"
    done
  done
  python3 - "$DIR/fixed" "$3" "$5" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, *parts = line.split()
    rows.setdefault(kind, []).append(dict(p.split("=", 1) for p in parts if "=" in p))
med = lambda k, f: statistics.median(float(r[f]) for r in rows[k])
label = sys.argv[3]
print(f"fixed rate {sys.argv[2]} req/s (loadgen, 8 connections, medians of 2): "
      f"memory p50 {med('memory', 'p50_us'):.0f} µs p99 {med('memory', 'p99_us'):.0f} µs; "
      f"{label} p50 {med('redis', 'p50_us'):.0f} µs p99 {med('redis', 'p99_us'):.0f} µs; "
      f"{label} adds p50 +{med('redis', 'p50_us') - med('memory', 'p50_us'):.0f} µs")
PY
}
