#!/usr/bin/env bash
# Instructions per request of every `benches/overhead.rs` case, under callgrind (repeatable,
# whatever else the machine does), with `bare` subtracted.
#
# Each case runs alone (`TOLLGATE_PROFILE=case:N`, no criterion) twice, with N = LOW and
# N = HIGH requests; instructions per request = (Ir(HIGH) − Ir(LOW)) / (HIGH − LOW), so the
# setup (1000 keys digested, the ledger topped up, the runtime) cancels out. Each figure is the
# median of REPEAT (default 5) such pairs.
#
#   scripts/callgrind.sh [CASE...]            # default: every overhead case
#   LOW=2000 HIGH=12000 REPEAT=7 scripts/callgrind.sh full_stack rate_limit
#
# Builds the bench first (`cargo bench --bench overhead --no-run`) unless BENCH_NO_BUILD (or
# BENCH_BIN, a binary to measure instead) is set.
# On a shared machine run it as `flock -x -w 900 /work/cpu.lock scripts/callgrind.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
LOW="${LOW:-1000}"
HIGH="${HIGH:-6000}"
REPEAT="${REPEAT:-5}"
CASES=("$@")
if [ ${#CASES[@]} -eq 0 ]; then
  CASES=(normalize auth ip_allow rate_limit credits full_stack full_stack_rejected
         tower_governor tower_governor_headers tower_http_bearer peers_combined)
fi
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }
if [ -z "${BENCH_NO_BUILD:-}${BENCH_BIN:-}" ]; then
  cargo bench --bench overhead --no-run --quiet 2>/dev/null || cargo bench --bench overhead --no-run
fi
# The newest overhead bench binary (not its .d file).
# BENCH_BIN: another build of it (a copy kept from before a change, to compare).
BIN="${BENCH_BIN:-$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/overhead-* | grep -v '\.d$' | grep -v '\.o$' | head -n 1)}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# Total instructions of one run of CASE with N requests.
instructions() {
  local case="$1" n="$2"
  rm -f "$OUT"/cg.out*
  TOLLGATE_PROFILE="$case:$n" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" \
    "$BIN" --bench >/dev/null 2>"$OUT/cg.err" || { cat "$OUT/cg.err" >&2; exit 1; }
  # The largest count: criterion forks a child (its gnuplot probe) that callgrind reports too.
  local total calibration
  total="$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/cg.err" | sort -n | tail -n 1)"
  # Minus quanta's clock calibration (once per process, in setup): it loops a varying number
  # of times, millions of instructions that would not cancel out between the two runs.
  calibration="$(callgrind_annotate --inclusive=yes "$(ls -S "$OUT"/cg.out* | head -n 1)" 2>/dev/null |
    sed -n 's/^ *\([0-9,]*\) .*<quanta::Clock as core::default::Default>::default \[.*/\1/p' |
    tr -d , | head -n 1)"
  echo $((total - ${calibration:-0}))
}

# The median over REPEAT pairs of runs: the count of one run is not repeatable to the
# instruction (hash seeds, allocator state: the same binary moves by up to ~1 % of its total,
# a few hundred instructions per request), the median of several is.
per_request() {
  local case="$1" low high i results=()
  for ((i = 0; i < REPEAT; i++)); do
    low="$(instructions "$case" "$LOW")"
    high="$(instructions "$case" "$HIGH")"
    results+=($(((high - low) / (HIGH - LOW))))
  done
  printf '%s\n' "${results[@]}" | sort -n | sed -n "$(((REPEAT + 1) / 2))p"
}

echo "binary: $BIN ($LOW and $HIGH requests per case, median of $REPEAT)"
BARE="$(per_request bare)"
printf '%-24s %10s %12s\n' case "Ir/request" "over bare"
printf '%-24s %10d %12s\n' bare "$BARE" "—"
SUM=0
for case in "${CASES[@]}"; do
  n="$(per_request "$case")"
  added=$((n - BARE))
  case "$case" in normalize | auth | ip_allow | rate_limit | credits) SUM=$((SUM + added)) ;; esac
  printf '%-24s %10d %+12d\n' "$case" "$n" "$added"
done
echo "sum of the single layers (those measured here): +$SUM"
