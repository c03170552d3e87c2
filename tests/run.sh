#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and integration tests, then the Python suites (real OpenID
# Provider, deploy manifests, wire compatibility, end-to-end with Envoy and nginx).
# Installs what it needs locally and idempotently: Python packages into ./.venv, npm packages into
# tests/idp/node_modules. Debian packages (nginx, h2load) are installed by .ci/run; suites that need
# them skip with a message when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

echo "== cargo test"
cargo build --locked --bins
cargo test --locked --all-targets

echo "== Python venv"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt

echo "== npm (tests/idp)"
if [ ! -d tests/idp/node_modules ] || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
  npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
fi

echo "== pytest"
export PORTCULLIS_BIN="$root/target/debug/portcullis"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
