#!/usr/bin/env bash
# The gateway example (release, built-in mock upstream) on the memory and the SQLite backend,
# side by side in one run: wrk with 16 connections, short runs, alternating, then the longest a
# settlement waited to be durable (the gateway logs it at shutdown). See README "The SQLite
# backend".
#
#   scripts/bench_sqlite.sh [SECONDS=5] [ROUNDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-5}"
ROUNDS="${2:-2}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release -p tollgate-gateway --bin gateway --features sqlite --quiet
BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release/gateway")"
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
KEY="sk-bench-0123456789abcdefghijklmn"

config() { # kind port
  cat <<TOML
[server]
listen = "127.0.0.1:$2"
upstream = "mock"

[admin]
key = "admin-bench-0123456789"

[backend]
kind = "$1"
$( [ "$1" = sqlite ] && echo 'path = "bench.db"' )

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
}

cat > "$DIR/chat.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock-small","max_tokens":16,"messages":[{"role":"user","content":"Hello"}]}'
LUA

start() { # kind port
  mkdir -p "$DIR/$1"
  config "$1" "$2" > "$DIR/$1/gateway.toml"
  (cd "$DIR/$1" && RUST_LOG=warn,tollgate::durability=info exec "$BIN" --config gateway.toml > stdout.log 2> stderr.log) &
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$2/v1/models" && return
    sleep 0.1
  done
  echo "the $1 gateway did not start" >&2; cat "$DIR/$1/stderr.log" >&2; exit 1
}

rps() { # port
  wrk -t2 -c16 -d"${SECONDS_PER_RUN}s" -s "$DIR/chat.lua" "http://127.0.0.1:$1/v1/chat/completions" \
    | awk '/Requests\/sec/ {print $2} /Non-2xx/ {print "NON2XX " $0 > "/dev/stderr"}'
}

start memory 18191
start sqlite 18192
# Warm up both.
wrk -t1 -c4 -d1s -s "$DIR/chat.lua" http://127.0.0.1:18191/v1/chat/completions > /dev/null
wrk -t1 -c4 -d1s -s "$DIR/chat.lua" http://127.0.0.1:18192/v1/chat/completions > /dev/null
for round in $(seq "$ROUNDS"); do
  m="$(rps 18191)"; s="$(rps 18192)"
  echo "round $round: memory $m req/s, sqlite $s req/s"
done
# SIGTERM: in-flight requests settle, the sqlite gateway logs its group commit figures.
kill -TERM $(jobs -p)
wait || true
grep -h "sqlite group commit" "$DIR/sqlite/stderr.log" | sed 's/\x1b\[[0-9;]*m//g' || true
echo "sqlite file: $(du -h "$DIR/sqlite/bench.db" | cut -f1)"
