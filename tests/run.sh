#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and integration tests, then the Python suites (real OpenID
# Provider, deploy manifests, wire compatibility, end-to-end with Envoy and nginx).
# Installs what it needs locally and idempotently: Python packages into ./.venv, npm packages into
# tests/idp/node_modules. Debian packages (nginx, redis-server, h2load) are installed by .ci/run; suites that need
# them skip with a message when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# Prerequisites, all checked before anything runs: one message lists whatever is missing (README.md,
# "Prerequisites", says how to install each).
missing=()
command -v cargo >/dev/null 2>&1 \
  || missing+=("cargo: Rust 1.95 through rustup (rust-toolchain.toml pins the version)")
if ! command -v python3 >/dev/null 2>&1; then
  missing+=("python3 with its venv module (Debian/Ubuntu: apt-get install python3 python3-venv)")
elif [ ! -x .venv/bin/pip ]; then
  # Debian's python3 has a venv module that fails without python3-venv: try it where it cannot harm.
  venv_check=$(mktemp -d)
  python3 -m venv "$venv_check/venv" >/dev/null 2>&1 \
    || missing+=("the python3 venv module (Debian/Ubuntu: apt-get install python3-venv)")
  rm -rf "$venv_check"
fi
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || true)
if [ -z "$node_major" ]; then
  missing+=("node 20 or later (the identity provider tests/idp runs on it)")
elif [ "$node_major" -lt 20 ]; then
  missing+=("node 20 or later (found $(node --version))")
fi
command -v npm >/dev/null 2>&1 || missing+=("npm (Debian/Ubuntu: apt-get install npm)")
if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "tests/run.sh: missing prerequisites (see README.md, Prerequisites):"
    printf '  - %s\n' "${missing[@]}"
  } >&2
  exit 2
fi
if [ -z "${NGINX_BIN:-}" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "tests/run.sh: warning: no nginx (apt-get install nginx): the nginx suites skip (and fail under CI=1)" >&2
fi
command -v redis-server >/dev/null 2>&1 \
  || echo "tests/run.sh: warning: no redis-server (apt-get install redis-server): the shared-store suites skip (and fail under CI=1)" >&2
command -v h2load >/dev/null 2>&1 \
  || echo "tests/run.sh: warning: no h2load (apt-get install nghttp2-client): needed only by loadtest/load.sh" >&2

echo "== cargo test (the service, crates/portcullis-core and crates/portcullis-envoy)"
cargo build --locked --bins
# The Envoy module (crates/portcullis-envoy, a cdylib) that tests/e2e/test_envoy_module.py loads into Envoy.
cargo build --locked -p portcullis-envoy
cargo test --locked --workspace --all-targets

echo "== rustfmt, clippy"
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The build without OTLP export (`--no-default-features`) keeps compiling and lint-clean.
cargo clippy --locked --no-default-features --bins -- -D warnings

echo "== Python venv"
if [ ! -x .venv/bin/pip ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt

echo "== npm (tests/idp)"
if [ ! -d tests/idp/node_modules ] || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
  npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
fi

echo "== pytest"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
export PORTCULLIS_BIN="$target_dir/debug/portcullis"
export PORTCULLIS_ENVOY_MODULE="$target_dir/debug/libportcullis_envoy.so"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
