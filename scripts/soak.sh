#!/usr/bin/env bash
# Soak test (not in CI: it runs for minutes). The gateway example (release build, in-memory
# backend, built-in mock upstream) under sustained load on loopback; RSS sampled and required
# flat after warm-up, no hold left open, the balance exact to the credit. See README "Soak test".
#
#   scripts/soak.sh [SECONDS=300] [CONNECTIONS=32]
#   SOAK_SCRAPE=15 scripts/soak.sh ...   # also scrape /metrics every 15 s, as Prometheus would
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-300}"
CONNECTIONS="${2:-32}"
PORT="${SOAK_PORT:-18089}"
INITIAL=1000000000
KEY="sk-soak-0123456789abcdefghijklmnop"
SMALL_KEY="sk-soak-small-0123456789abcdefgh"
ADMIN="admin-soak-0123456789"

# SOAK_NO_BUILD=1: use the binary already built.
[ -n "${SOAK_NO_BUILD:-}" ] || cargo build --release -p tollgate-gateway --bin gateway --quiet
CONFIG="$(mktemp --suffix .toml)"
LOG="$(mktemp --suffix .log)"
cat > "$CONFIG" <<TOML
[server]
listen = "127.0.0.1:$PORT"
metrics_listen = "127.0.0.1:$((PORT + 1))"   # /metrics is served there only
trusted_proxies = ["127.0.0.0/8"]
upstream = "mock"

[admin]
key = "$ADMIN"

[[plans]]
name = "big"
requests_per_minute = 10000000
burst = 1000000
tokens_per_minute = 2000000000

[[plans]]
name = "small"                      # bursts of this plan are refused (429)
requests_per_minute = 60
burst = 5

[[models]]
id = "mock-small"
credits_per_request = 1
credits_per_1k_tokens = 1000        # cost = 1 + total_tokens: the load generator checks it

[[accounts]]
id = "acct_soak"
plan = "big"
balance = $INITIAL

[[accounts]]
id = "acct_small"
plan = "small"
balance = 1000

[[keys]]
id = "key_soak"
account = "acct_soak"
key = "$KEY"

[[keys]]
id = "key_small"
account = "acct_small"
key = "$SMALL_KEY"
TOML

RUST_LOG=warn target/release/gateway --config "$CONFIG" >"$LOG" 2>&1 &
GATEWAY=$!
cleanup() { kill "$GATEWAY" 2>/dev/null || true; wait "$GATEWAY" 2>/dev/null || true; rm -f "$CONFIG"; }
trap cleanup EXIT
for _ in $(seq 100); do
  if grep -q "listening" "$LOG"; then break; fi
  sleep 0.1
done
grep -q "listening" "$LOG" || { cat "$LOG"; exit 1; }

python3 scripts/soak_load.py --port "$PORT" --pid "$GATEWAY" --duration "$DURATION" \
  --connections "$CONNECTIONS" --key "$KEY" --small-key "$SMALL_KEY" --admin "$ADMIN" \
  --account acct_soak --initial "$INITIAL" --metrics-port "$((PORT + 1))" ${SOAK_SCRAPE:+--scrape "$SOAK_SCRAPE"}
