#!/usr/bin/env bash
# The gateway on PostgreSQL under load, beside the pgbench floor of the same server, in one run.
#
# Starts a throwaway PostgreSQL (initdb into a temp dir, default durability: fsync and
# synchronous_commit on), measures `pgbench` with one conditional `UPDATE ... RETURNING` per
# transaction (1 and 8 clients), then the gateway example (bench profile, `kind = "postgres"`,
# built-in mock upstream) with `wrk` (8 threads of one connection each, one key and account per
# thread, so two requests in flight never wait on each other's account row), the statements per
# billed request from `pg_stat_statements`, and the CPU time per billed request of the gateway
# and of PostgreSQL (all its processes) from /proc, to tell which side is the bottleneck. Needs
# `wrk` and the PostgreSQL binaries.
#
#   scripts/bench_postgres.sh [SECONDS=10]
#   BENCH_NO_BUILD=1 scripts/bench_postgres.sh   # use the binary already built
#   BENCH_PG_WAITS=1 scripts/bench_postgres.sh   # also sample what the statements wait on
#   BENCH_PG_PROFILE=1 scripts/bench_postgres.sh # also time the statements inside the functions
#                                                # (pg_stat_statements.track = all; slows them)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-10}"
BIN_DIR="$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")"
AS=(); [ "$(id -u)" = 0 ] && AS=(runuser -u postgres --)
PG_PORT="${BENCH_PG_PORT:-15433}"
GW_PORT="${BENCH_GW_PORT:-18093}"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/gateway"

[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --profile bench -p tollgate-gateway --bin gateway --features postgres --quiet

WORK="$(mktemp -d /tmp/tollgate-bench-pg.XXXXXX)"
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres: "$WORK"
GW_PID=""
cleanup() {
  [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null || true
  "${AS[@]}" "$BIN_DIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"${AS[@]}" "$BIN_DIR/initdb" -D "$WORK/data" -U postgres -A trust -E UTF8 >/dev/null
"${AS[@]}" "$BIN_DIR/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w -o \
  "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_preload_libraries=pg_stat_statements${BENCH_PG_PROFILE:+ -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on}" \
  start >/dev/null
PSQL=("$BIN_DIR/psql" -X -q -A -t -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
"${PSQL[@]}" -c "CREATE EXTENSION pg_stat_statements"

echo "== pgbench: one conditional UPDATE ... RETURNING per transaction"
"${PSQL[@]}" -c "CREATE TABLE bench_balances (id int PRIMARY KEY, balance bigint NOT NULL)"
"${PSQL[@]}" -c "INSERT INTO bench_balances SELECT g, 1000000000 FROM generate_series(1, 1000) g"
cat > "$WORK/update.sql" <<'SQL'
\set id random(1, 1000)
UPDATE bench_balances SET balance = balance - 1 WHERE id = :id AND balance >= 1 RETURNING balance;
SQL
for clients in 1 8; do
  tps=$("$BIN_DIR/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "$clients" -j "$clients" \
    -T "$SECONDS_EACH" -f "$WORK/update.sql" postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  echo "pgbench clients=$clients: $tps tps"
done

echo "== gateway on PostgreSQL: wrk, 8 connections (8 threads), one key per thread"
CONFIG="$WORK/gateway.toml"
{
  cat <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
upstream = "mock"

[admin]
key = "admin-bench-0123456789"

[backend]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:$PG_PORT/postgres"

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
key = "sk-bench-pg-$i-0123456789abcdef"
TOML
  done
} > "$CONFIG"
"$BIN" --config "$CONFIG" > "$WORK/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 1 100); do
  grep -q "listening" "$WORK/gateway.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "listening" "$WORK/gateway.log" || { cat "$WORK/gateway.log"; exit 1; }

echo "== the books alone: reserve (with a rate limit) + settle, one statement each, pgbench 8 clients"
cat > "$WORK/billed.sql" <<'SQL'
\set acct random(0, 7)
\set id random(1, 9000000000000000000)
SELECT status FROM tollgate.reserve('acct_' || :acct, :id, 1, 600000, 86400000, NULL, NULL, NULL, NULL, ARRAY['bench|0|account:acct_' || :acct], ARRAY[600000::bigint], ARRAY[10000000::bigint], ARRAY[1::bigint], NULL);
SELECT charged FROM tollgate.close('acct_' || :acct, :id, 'settle', 1, 0, 'always', '{}', '{}', '{}', '{}', NULL);
SQL
tps=$("$BIN_DIR/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c 8 -j 8 \
  -T "$SECONDS_EACH" -f "$WORK/billed.sql" postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
echo "pgbench reserve+settle clients=8: $tps billed requests/s (2 commits each)"

cat > "$WORK/chat.lua" <<'LUA'
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function request()
  -- One connection per thread, one key (and account) per thread: 8 threads = 8 keys.
  local key = id % 8
  return wrk.format("POST", "/v1/chat/completions", {
    ["Authorization"] = "Bearer sk-bench-pg-" .. key .. "-0123456789abcdef",
    ["Content-Type"] = "application/json",
  }, '{"model":"mock-small","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}')
end
function done(summary, latency, requests)
  io.write(string.format("non-2xx or errors: %d\n", summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
# Warm the key caches and the prepared statements.
wrk -t8 -c8 -d2s -s "$WORK/chat.lua" "http://127.0.0.1:$GW_PORT" >/dev/null
sleep 0.5
"${PSQL[@]}" -c "SELECT pg_stat_statements_reset()" >/dev/null
settles() { "${PSQL[@]}" -c "SELECT count(*) FROM tollgate.journal WHERE kind = 'settle'"; }
settled_before=$(settles)
# CPU time (utime + stime, clock ticks) of the gateway, and of the postmaster and its children.
PG_PID=$(head -1 "$WORK/data/postmaster.pid")
ticks() { awk '{ t += $14 + $15 } END { print t }' "$@" 2>/dev/null; }
pg_ticks() { ticks /proc/"$PG_PID"/stat $(for c in $(pgrep -P "$PG_PID"); do echo /proc/"$c"/stat; done); }
# The whole machine's busy and idle (iowait counted idle) ticks, from /proc/stat.
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $5 + $6 }' /proc/stat; }
gw_before=$(ticks /proc/"$GW_PID"/stat); pg_before=$(pg_ticks); read -r busy_before idle_before < <(machine)
SAMPLER=""
if [ -n "${BENCH_PG_WAITS:-}" ]; then
  # What the gateway's connections are doing, sampled every 5 ms: running, or waiting on what.
  ( end=$(( $(date +%s) + SECONDS_EACH ))
    while [ "$(date +%s)" -lt "$end" ]; do
      "${PSQL[@]}" -c "SELECT coalesce(wait_event_type || ':' || wait_event, 'running') FROM pg_stat_activity WHERE application_name <> 'psql' AND backend_type = 'client backend' AND state = 'active' AND query LIKE '%tollgate%'"
      sleep 0.005
    done ) > "$WORK/waits.txt" &
  SAMPLER=$!
fi
wrk -t8 -c8 -d"${SECONDS_EACH}s" --latency -s "$WORK/chat.lua" "http://127.0.0.1:$GW_PORT" | tee "$WORK/wrk.txt"
if [ -n "$SAMPLER" ]; then
  wait "$SAMPLER" || true
  echo "== the gateway's statements, sampled: state (count)"
  sort "$WORK/waits.txt" | uniq -c | sort -rn
fi
gw_cpu=$(( $(ticks /proc/"$GW_PID"/stat) - gw_before )); pg_cpu=$(( $(pg_ticks) - pg_before ))
read -r busy_after idle_after < <(machine)
# Requests cut by wrk's end release their holds in the background: give them a moment.
sleep 3
billed=$(( $(settles) - settled_before ))
statements=$("${PSQL[@]}" -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE toplevel AND query LIKE '%\"tollgate\".%'")
if [ -n "${BENCH_PG_PROFILE:-}" ]; then
  echo "== statements: exec µs, calls and planning µs per billed request (nested ones included in their callers' time)"
  "${PSQL[@]}" -F ' | ' -c "SELECT round((total_exec_time * 1000 / greatest($billed, 1))::numeric, 1) AS us_per_billed, round((calls::numeric / greatest($billed, 1)), 2) AS calls_per_billed, round((total_plan_time * 1000 / greatest($billed, 1))::numeric, 1) AS plan_us_per_billed, regexp_replace(left(query, 110), '\s+', ' ', 'g') FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%' ORDER BY total_exec_time DESC LIMIT 30"
fi
held=$("${PSQL[@]}" -c "SELECT coalesce(sum(held), 0) FROM tollgate.balances")
echo "billed requests (settles journaled): $billed; statements on the books: $statements; per billed request: $(awk "BEGIN { printf \"%.2f\", $statements / $billed }")"
echo "credits still held after the run: $held"
HZ=$(getconf CLK_TCK)
echo "machine busy during the run: $(awk "BEGIN { printf \"%.0f\", 100 * ($busy_after - $busy_before) / ($busy_after - $busy_before + $idle_after - $idle_before) }")% of $(nproc) cores"
echo "CPU per billed request: gateway $(awk "BEGIN { printf \"%.0f\", $gw_cpu * 1000000 / $HZ / $billed }") µs, PostgreSQL $(awk "BEGIN { printf \"%.0f\", $pg_cpu * 1000000 / $HZ / $billed }") µs (of $(nproc) cores x ${SECONDS_EACH} s)"
