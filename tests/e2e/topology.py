"""The topology the end-to-end suites share: subscription keys, client addresses, certificates, the
portcullis policy behind the shared stack, the placeholders of the deploy/envoy bootstraps, and the
denies every proxy must deliver alike. (Fixtures are in conftest.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Backend, Cert, Envoy, Portcullis, key_hash

# Subscription keys the suites use (stored hashed in the configs, as users do).
KEY_TEAM_A = "e2e-key-team-a-0123456789"
KEY_PAUSED = "e2e-key-paused-0123456789"

# The client as the trusted load balancer in front of Envoy saw it (TEST-NET-3), one that is not
# allowed, and one in a forbidden range (TEST-NET-2).
ALLOWED_CLIENT = "203.0.113.10"
OTHER_CLIENT = "203.0.113.99"
BLOCKED_CLIENT = "198.51.100.7"


@dataclass
class Pki:
    dir: Path
    server_ca: Path
    server: tuple[Path, Path]
    client_ca: Path
    partner: tuple[Path, Path]        # CN=partner,O=Contoso, issued by the client CA
    partner_cert: Cert
    intruder: tuple[Path, Path]       # CN=intruder,O=Contoso, issued by the same client CA
    intruder_cert: Cert
    foreign: tuple[Path, Path]        # CN=partner,O=Contoso, issued by a CA Envoy does not trust


def grpc_envoy_params(portcullis: Portcullis | int, backend: Backend, pki: Pki) -> dict:
    """Placeholders of deploy/envoy/ext-authz-grpc.yaml."""
    port = portcullis if isinstance(portcullis, int) else portcullis.grpc_port
    return {
        "ENVOY_ADMIN_PORT": 0,
        "ENVOY_HTTP_PORT": 0,
        "ENVOY_HTTPS_PORT": 0,
        "PORTCULLIS_GRPC_PORT": port,
        "BACKEND_PORT": backend.port,
        # Far above a real check's cost: a loaded CI machine must not turn slowness into 503s.
        "EXT_AUTHZ_TIMEOUT": "5s",
        "TLS_CERT_FILE": pki.server[0],
        "TLS_KEY_FILE": pki.server[1],
        "CLIENT_CA_FILE": pki.client_ca,
    }


def pem_sha1(path: Path) -> str:
    """SHA-1 thumbprint of the certificate in a PEM file (APIM's form: upper-case hex)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA1()).hex().upper()


def shared_subscriptions() -> str:
    """The subscriptions of main_config, which the module suite (test_envoy_module.py) uses too:
    keys team-a and paused."""
    return f"""subscriptions:
  keys:
    - {{id: team-a, scope: all, primary: "{key_hash(KEY_TEAM_A)}"}}
    - {{id: paused, scope: all, state: suspended, primary: "{key_hash(KEY_PAUSED)}"}}
"""


def shared_apis() -> str:
    """The first APIs of main_config, which the module suite decides too: orders, public, readonly,
    ip, blocked, alpha and beta (each line indented as under `apis:`)."""
    return f"""  - name: orders
    match: {{path_prefix: /orders}}
    subscription_required: true
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}", x-client-ip: "{{client_ip}}", x-api: "{{api}}"}}
  - name: public
    match: {{path_prefix: /public}}
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
  - name: readonly
    match: {{path_prefix: /readonly, methods: [GET, HEAD]}}
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
  - name: ip
    match: {{path_prefix: /ip}}
    ip_filter: {{action: allow, addresses: ["{ALLOWED_CLIENT}"]}}
    on_allow:
      set_headers: {{x-client-ip: "{{client_ip}}"}}
  - name: blocked
    match: {{path_prefix: /blocked}}
    ip_filter: {{action: forbid, addresses: [198.51.100.0/24]}}
  - name: alpha
    match: {{context_extensions: {{api: alpha}}}}
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
  - name: beta
    match: {{context_extensions: {{api: beta}}}}
    subscription_required: true
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
"""


def main_config(pki: Pki) -> str:
    """The portcullis policy behind the shared gRPC stack (routes: deploy/envoy/ext-authz-grpc.yaml)."""
    return f"""
listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}
telemetry: {{log_format: json, log_level: info, decision_log: true}}
# Envoy: use_remote_address + xff_num_trusted_hops: 1 (one load balancer in front of it).
client_ip: {{from: x-forwarded-for, trusted_hops: 1}}
{shared_subscriptions()}apis:
{shared_apis()}  - name: mtls-thumbprint
    match: {{path_prefix: /mtls/thumbprint}}
    client_certificate:
      identities:
        - thumbprint: "{pki.partner_cert.sha1}"
    on_allow:
      set_headers: {{x-client-thumbprint: "{{cert.thumbprint}}", x-api: "{{api}}"}}
  - name: mtls-subject
    match: {{path_prefix: /mtls/subject}}
    client_certificate:
      identities:
        - subject: "O=Contoso, CN=partner"
          issuer_subject: "CN=E2E Client CA, O=Contoso"
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
  # Envoy verified the chain already; portcullis verifies it again against the same CA (as it must
  # behind a proxy that does not), and names the issuer by thumbprint.
  - name: mtls-trusted
    match: {{path_prefix: /mtls/trusted}}
    client_certificate:
      trust: {{ca_files: ["{pki.client_ca}"]}}
      identities:
        - {{issuer_thumbprint: "{pem_sha1(pki.client_ca)}", common_name: partner}}
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
  - name: mtls-orders
    match: {{path_prefix: /mtls/orders}}
    subscription_required: true
    client_certificate:
      identities:
        - thumbprint: "{pki.partner_cert.sha256}"
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}", x-api: "{{api}}"}}
unmatched: deny
"""


def lb(client_ip: str = ALLOWED_CLIENT, **headers) -> dict:
    """Headers as the trusted load balancer in front of the proxy forwards them."""
    return {"x-forwarded-for": client_ip, **headers}


# Denies every proxy must deliver the same way: (id, path, headers, status, reason, challenge).
DENIES = [
    ("no-matching-api", "/nowhere", lb(), 403, "NoMatchingApi", None),
    ("key-missing", "/orders/1", lb(), 401, "SubscriptionKeyNotFound", "AzureApiManagementKey"),
    ("key-wrong", "/orders/1", lb(**{"ocp-apim-subscription-key": "not-a-key"}), 401, "SubscriptionKeyInvalid", "AzureApiManagementKey"),
    ("key-suspended", "/orders/1", lb(**{"ocp-apim-subscription-key": KEY_PAUSED}), 401, "SubscriptionKeyInvalid", "AzureApiManagementKey"),
    ("key-wrong-in-query", "/orders/1?subscription-key=nope", lb(), 401, "SubscriptionKeyInvalid", None),
    ("ip-not-allowed", "/ip/x", lb(OTHER_CLIENT), 403, "CallerIpNotAllowed", None),
    ("ip-blocked", "/blocked/x", lb(BLOCKED_CLIENT), 403, "CallerIpBlocked", None),
    ("cert-missing", "/mtls/thumbprint/x", lb(), 401, "ClientCertificateMissing", None),
]


def deny_params():
    return pytest.mark.parametrize("path,headers,status,reason,challenge", [d[1:] for d in DENIES], ids=[d[0] for d in DENIES])


@dataclass
class GrpcStack:
    portcullis: Portcullis
    envoy: Envoy
    backend: Backend
    pki: Pki


def http_envoy_params(portcullis: Portcullis | int, backend: Backend) -> dict:
    """Placeholders of deploy/envoy/ext-authz-http.yaml."""
    port = portcullis if isinstance(portcullis, int) else portcullis.http_port
    return {
        "ENVOY_ADMIN_PORT": 0,
        "ENVOY_HTTP_PORT": 0,
        "PORTCULLIS_HTTP_PORT": port,
        "BACKEND_PORT": backend.port,
        "EXT_AUTHZ_TIMEOUT": "5s",
    }


def jwt_orders_config(issuer: str, on_allow: str) -> str:
    """portcullis behind Envoy with one JWT API, `/orders`, for tokens of the test IdP at `issuer`
    (audience api://orders, scope orders:read); `on_allow` is the API's on_allow mapping, inline."""
    return f"""
listen: {{grpc: 127.0.0.1:0}}
telemetry: {{log_format: json}}
client_ip: {{from: x-forwarded-for, trusted_hops: 1}}
identity_providers:
  - name: test-idp
    issuer: {issuer}
    algorithms: [RS256]
apis:
  - name: orders
    match: {{path_prefix: /orders}}
    jwt:
      providers: [test-idp]
      audiences: [api://orders]
      scopes: {{any: [orders:read]}}
    on_allow: {on_allow}
unmatched: deny
"""
