#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints executions and coverage per target.
#   bash fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer needs a few nightly-only rustc flags;
# on the stable toolchain they are enabled with RUSTC_BOOTSTRAP=1 and no sanitizer
# (`--sanitizer none`): coverage-guided, without AddressSanitizer (the crate forbids unsafe code).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build --sanitizer none $targets >/dev/null 2>&1 || cargo fuzz build --sanitizer none
for t in $targets; do
  mkdir -p corpus/$t artifacts/$t
  [ -d seeds/$t ] && cp -n seeds/$t/* corpus/$t/ 2>/dev/null || true
  log=$(mktemp)
  if cargo fuzz run --sanitizer none $t corpus/$t -- -max_total_time=$secs -print_final_stats=1 -artifact_prefix=artifacts/$t/ >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
  fi
  execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  cov=$(grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1 | sed -E 's/.*cov: ([0-9]+).*/\1/')
  printf '%-16s %-6s executions=%s coverage(edges)=%s\n' "$t" "$status" "${execs:-?}" "${cov:-?}"
  [ $status = ok ] || { tail -30 "$log"; }
  rm -f "$log"
done
