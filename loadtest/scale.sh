#!/usr/bin/env bash
# Scaling run (issue 8 item 2): decision time as the policy grows, and memory, start-up and reload at
# the largest policy with the checks served during reloads. Results: target/scale/results.{md,json}.
#
#   loadtest/scale.sh                 # everything (about 5 minutes on 2 cores, after the builds)
#   SKIP_CRITERION=1 loadtest/scale.sh   # only the server run
#   SKIP_SERVER=1 loadtest/scale.sh      # only the criterion bench
#
# Knobs: KEYS CIDRS APIS PROVIDERS CREDENTIALS JWKS=inline|file KEYS_IN=yaml|file (keys inline, or in
# `subscriptions.keys_file`, which adds a phase of key-file-only reloads) RATE (checks/s)
# SECONDS (per phase) RELOADS. `KEYS_IN=file` is the issue-19 run; OUT then defaults to
# target/scale-keys-file so both runs can be kept side by side. CREDENTIALS=N adds N backend
# credentials (client_credentials, on as many APIs, never fetched) for start-up time and memory:
# `PROVIDERS=10 CREDENTIALS=100 SKIP_CRITERION=1 OUT=target/scale-credentials loadtest/scale.sh`.
# Needs python3 with grpcio, xds-protos and cryptography (tests/wire/requirements.txt); uses
# .venv/bin/python when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/scale}
[ "${KEYS_IN:-yaml}" = file ] && [ "$OUT" = target/scale ] && OUT=target/scale-keys-file
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

if [ -z "${SKIP_CRITERION:-}" ]; then
  cargo bench --bench scaling -- --noplot 2>&1 | tee "$OUT/criterion.log"
fi

if [ -z "${SKIP_SERVER:-}" ]; then
  cargo build --release --bin portcullis
  BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-target}/release/portcullis}
  rm -rf "$OUT/config"
  "$PY" loadtest/scale/gen.py "$OUT/config" --keys "${KEYS:-100000}" --cidrs "${CIDRS:-10000}" \
    --apis "${APIS:-1000}" --providers "${PROVIDERS:-50}" --jwks "${JWKS:-inline}" \
    --keys-in "${KEYS_IN:-yaml}" --credentials "${CREDENTIALS:-0}" > "$OUT/generated.json"
  # The generated credentials read their (never used) secret from here.
  export SCALE_CLIENT_SECRET=${SCALE_CLIENT_SECRET:-scale-secret-never-sent}
  run() {
    "$PY" loadtest/scale/drive.py "$OUT/config" --bin "$BIN" --rate "${RATE:-300}" \
      --seconds "${SECONDS_PER_PHASE:-10}" --reloads "${RELOADS:-10}" --out "$1" > /dev/null
  }
  # As shipped (glibc malloc defaults) ...
  run "$OUT/server.json"
  # ... and with glibc's malloc told to give freed memory back: one arena, big blocks mmap'd (a
  # reload's transient copy of the file's data is freed as a whole instead of staying in the heap).
  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 run "$OUT/server-malloc-tuned.json"
fi

"$PY" loadtest/scale/report.py "$OUT"
