"""Wire compatibility with code we did not write: the real `portcullis serve` called through Python
`grpcio` with Envoy's own generated messages (`xds-protos`: envoy.service.auth.v3), the stock
grpc.health.v1 client (grpcio-health-checking) and server reflection (grpcio-reflection).

portcullis compiles a hand-written subset of Envoy's protos; these tests prove that what it sends and
accepts is what Envoy's full messages mean, field by field.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from harness import Portcullis, key_hash, make_cert  # noqa: E402

KEY = "wire-key-0123456789"
SUSPENDED_KEY = "wire-key-suspended-0123456789"
SERVICE = "envoy.service.auth.v3.Authorization"

OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED = 0, 3, 7, 16


@pytest.fixture(scope="module")
def certs():
    ca = make_cert("Wire CA", ca=True, organization="Contoso")
    partner = make_cert("partner", ca, organization="Contoso")
    other = make_cert("intruder", ca, organization="Contoso")
    long_ago = datetime.now(timezone.utc) - timedelta(days=30)
    expired = make_cert("partner", ca, organization="Contoso", not_before=long_ago, not_after=long_ago + timedelta(days=1))
    soon = datetime.now(timezone.utc) + timedelta(days=30)
    future = make_cert("partner", ca, organization="Contoso", not_before=soon, not_after=soon + timedelta(days=1))
    return {"partner": partner, "other": other, "expired": expired, "future": future}


@pytest.fixture(scope="module")
def server(tmp_path_factory, certs):
    config = f"""
listen: {{grpc: 127.0.0.1:0}}
telemetry: {{log_format: json}}
client_ip: {{from: peer}}
subscriptions:
  keys:
    - {{id: team-a, scope: all, primary: "{key_hash(KEY)}"}}
    - {{id: paused, scope: all, state: suspended, primary: "{key_hash(SUSPENDED_KEY)}"}}
apis:
  - name: orders
    match: {{hosts: [api.example.com], path_prefix: /orders}}
    subscription_required: true
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}", x-api: "{{api}}"}}
  - name: internal
    match: {{path_prefix: /internal}}
    ip_filter: {{action: allow, addresses: [10.0.0.0/8]}}
  - name: blocklist
    match: {{path_prefix: /blocklist}}
    ip_filter: {{action: forbid, addresses: [198.51.100.0/24]}}
  - name: partners
    match: {{path_prefix: /partners}}
    client_certificate:
      identities:
        - thumbprint: "{certs['partner'].sha1}"
        - subject: "CN=partner, O=Contoso"
  - name: selected
    match: {{context_extensions: {{api: selected}}}}
    on_allow:
      set_headers: {{x-api: "{{api}}"}}
unmatched: deny
"""
    p = Portcullis(config, tmp_path_factory.mktemp("wire"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def check(channel):
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return lambda req: stub.Check(req, timeout=30)


def envoy_request(path: str, *, method: str = "GET", host: str = "api.example.com", headers: dict | None = None,
                  peer: str = "10.1.2.3", certificate: str = "", context_extensions: dict | None = None,
                  raw_headers: bool = False) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like Envoy's: pseudo-headers among the headers, lower-case names, the full
    target (with query) in `path`, the TCP peer in `source.address`."""
    all_headers = {":method": method, ":path": path, ":authority": host, ":scheme": "http", "x-request-id": "wire-1", **(headers or {})}
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1234", method=method, path=path, host=host, scheme="http", protocol="HTTP/1.1",
    )
    if raw_headers:
        # encode_raw_headers: true -> header_map with raw byte values, `headers` left empty.
        http.header_map.CopyFrom(base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in all_headers.items()]))
    else:
        http.headers.update(all_headers)
    attrs = attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=peer, port_value=40000)),
            certificate=certificate,
        ),
        destination=attribute_context_pb2.AttributeContext.Peer(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=10000)),
        ),
        request=attribute_context_pb2.AttributeContext.Request(http=http),
    )
    attrs.request.time.GetCurrentTime()
    if context_extensions:
        attrs.context_extensions.update(context_extensions)
    return external_auth_pb2.CheckRequest(attributes=attrs)


def envoy_certificate(cert) -> str:
    """The leaf PEM URL-encoded as Envoy puts it in `source.certificate` (include_peer_certificate)."""
    return urllib.parse.quote(cert.cert_pem.decode(), safe="")


def header_options(options) -> dict[str, str]:
    """HeaderValueOptions as a dict, after checking each one says `append: false` explicitly (and no
    append_action that could contradict it)."""
    out = {}
    for o in options:
        assert o.HasField("append"), f"{o.header.key}: append must be set explicitly"
        assert o.append.value is False, f"{o.header.key}: append must be false (overwrite)"
        assert o.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD, "append_action must stay unset next to append"
        assert o.header.key not in out, f"{o.header.key} sent twice"
        out[o.header.key] = o.header.value if o.header.value else o.header.raw_value.decode()
    return out


def assert_denied(resp, grpc_code: int, http_status: int, reason: str, challenge: str | None = None) -> dict:
    assert resp.status.code == grpc_code, resp
    assert resp.WhichOneof("http_response") == "denied_response", resp
    denied = resp.denied_response
    assert denied.status.code == http_status  # envoy.type.v3.StatusCode values are the HTTP codes
    headers = header_options(denied.headers)
    assert headers["content-type"] == "application/json"
    body = json.loads(denied.body)
    assert body["statusCode"] == http_status and body["reason"] == reason and body["message"], body
    assert re.fullmatch(r"[0-9a-f]{32}", body["decisionId"]) and headers["x-portcullis-decision-id"] == body["decisionId"]
    meta = dict(resp.dynamic_metadata)
    assert meta.get("decision_id") == body["decisionId"] and meta.get("reason") == reason, meta
    if challenge:
        assert challenge in headers["www-authenticate"], headers
    else:
        assert "www-authenticate" not in headers or reason.startswith("SubscriptionKey"), headers
    return body


# ---------------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------------


def test_allow_with_headers_to_set_remove_and_query_parameters_to_remove(check):
    resp = check(envoy_request("/orders/1?x=1&subscription-key=" + KEY, headers={"ocp-apim-subscription-key": KEY}))
    assert resp.status.code == OK, resp
    assert resp.WhichOneof("http_response") == "ok_response"
    ok = resp.ok_response
    headers = header_options(ok.headers)
    assert headers["x-subscription"] == "team-a"
    assert headers["x-api"] == "orders"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-portcullis-decision-id"])
    assert list(ok.headers_to_remove) == ["ocp-apim-subscription-key"]
    assert list(ok.query_parameters_to_remove) == ["subscription-key"]
    assert not ok.response_headers_to_add and not ok.query_parameters_to_set
    # The facts for the rest of Envoy, decoded by Envoy's own generated google.protobuf.Struct.
    meta = resp.dynamic_metadata
    assert dict(meta) == {
        "api": "orders",
        "decision_id": headers["x-portcullis-decision-id"],
        "subscription_id": "team-a",
    }, meta
    assert not ok.HasField("dynamic_metadata"), "only the top-level field (ok_response's is deprecated)"


def test_allow_with_the_key_only_in_the_query(check):
    ok = check(envoy_request("/orders/1?subscription-key=" + KEY)).ok_response
    assert list(ok.query_parameters_to_remove) == ["subscription-key"]
    assert list(ok.headers_to_remove) == []


@pytest.mark.parametrize(
    "kwargs,grpc_code,http_status,reason,challenge",
    [
        (dict(path="/elsewhere"), PERMISSION_DENIED, 403, "NoMatchingApi", None),
        (dict(path="/orders/1", host="other.example.com"), PERMISSION_DENIED, 403, "NoMatchingApi", None),
        (dict(path="/orders/1"), UNAUTHENTICATED, 401, "SubscriptionKeyNotFound", "AzureApiManagementKey"),
        (dict(path="/orders/1", headers={"ocp-apim-subscription-key": "nope"}), UNAUTHENTICATED, 401, "SubscriptionKeyInvalid", "AzureApiManagementKey"),
        (dict(path="/orders/1", headers={"ocp-apim-subscription-key": SUSPENDED_KEY}), UNAUTHENTICATED, 401, "SubscriptionKeyInvalid", None),
        (dict(path="/internal/x", peer="192.168.1.1"), PERMISSION_DENIED, 403, "CallerIpNotAllowed", None),
        (dict(path="/blocklist/x", peer="198.51.100.7"), PERMISSION_DENIED, 403, "CallerIpBlocked", None),
        (dict(path="/orders/1", headers={"x-padding": "a" * 100_000}), INVALID_ARGUMENT, 431, "RequestHeadersTooLarge", None),
        (dict(path="/partners/x"), UNAUTHENTICATED, 401, "ClientCertificateMissing", None),
    ],
    ids=["no-api", "wrong-host", "key-missing", "key-invalid", "key-suspended", "ip-not-allowed", "ip-blocked", "headers-too-large", "cert-missing"],
)
def test_denies(check, kwargs, grpc_code, http_status, reason, challenge):
    assert_denied(check(envoy_request(**kwargs)), grpc_code, http_status, reason, challenge)


def test_allowed_peer(check):
    assert check(envoy_request("/internal/x", peer="10.9.8.7")).status.code == OK
    assert check(envoy_request("/blocklist/x", peer="10.9.8.7")).status.code == OK
    # IPv6 peers as Envoy sends them.
    assert_denied(check(envoy_request("/internal/x", peer="2001:db8::1")), PERMISSION_DENIED, 403, "CallerIpNotAllowed")


def test_client_certificate_url_encoded_as_envoy_sends_it(check, certs):
    assert check(envoy_request("/partners/x", certificate=envoy_certificate(certs["partner"]))).status.code == OK
    assert_denied(check(envoy_request("/partners/x", certificate=envoy_certificate(certs["other"]))), PERMISSION_DENIED, 403, "ClientCertificateIdentityNotMatched")
    assert_denied(check(envoy_request("/partners/x", certificate=envoy_certificate(certs["expired"]))), PERMISSION_DENIED, 403, "ClientCertificateExpired")
    assert_denied(check(envoy_request("/partners/x", certificate=envoy_certificate(certs["future"]))), PERMISSION_DENIED, 403, "ClientCertificateNotYetValid")
    assert_denied(check(envoy_request("/partners/x", certificate="not%20a%20certificate")), UNAUTHENTICATED, 401, "ClientCertificateInvalid")


def test_context_extensions_select_the_api(check):
    resp = check(envoy_request("/anything", context_extensions={"api": "selected"}))
    assert resp.status.code == OK, resp
    assert header_options(resp.ok_response.headers)["x-api"] == "selected"
    assert_denied(check(envoy_request("/anything", context_extensions={"api": "other"})), PERMISSION_DENIED, 403, "NoMatchingApi")


def test_raw_header_map(check):
    resp = check(envoy_request("/orders/1", headers={"ocp-apim-subscription-key": KEY}, raw_headers=True))
    assert resp.status.code == OK, resp
    assert list(resp.ok_response.headers_to_remove) == ["ocp-apim-subscription-key"]
    assert_denied(check(envoy_request("/orders/1", raw_headers=True)), UNAUTHENTICATED, 401, "SubscriptionKeyNotFound")


def test_a_request_without_http_attributes_is_refused(check):
    assert_denied(check(external_auth_pb2.CheckRequest()), INVALID_ARGUMENT, 400, "InvalidRequest")


# ---------------------------------------------------------------------------------------------------
# health and reflection
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_is_serving(channel, service):
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service(channel):
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def list_services(channel, version: str) -> list[str]:
    # grpcio-reflection ships the v1alpha client; v1 has the same messages on another method path.
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert len(responses) == 1
    return [s.name for s in responses[0].list_services_response.service]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services(channel, version):
    services = list_services(channel, version)
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


def test_reflected_messages_match_envoys_field_by_field(channel):
    """The descriptors portcullis serves by reflection, resolved with grpcio-reflection's client,
    agree with Envoy's own (xds-protos) on every field number, name, type and cardinality."""
    reflected = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = reflected.FindServiceByName(SERVICE).FindMethodByName("Check")
    assert method.input_type.full_name == "envoy.service.auth.v3.CheckRequest"
    assert method.output_type.full_name == "envoy.service.auth.v3.CheckResponse"

    envoys = descriptor_pool.Default()
    seen: set[str] = set()
    compared = 0

    def compare(ours):
        nonlocal compared
        if ours.full_name in seen:
            return
        seen.add(ours.full_name)
        theirs = envoys.FindMessageTypeByName(ours.full_name)
        for f in ours.fields:
            t = theirs.fields_by_number.get(f.number)
            assert t is not None, f"{ours.full_name}.{f.name} = {f.number}: no such field number in Envoy's message"
            assert t.name == f.name, f"{ours.full_name} field {f.number}: {f.name} vs Envoy's {t.name}"
            # string and bytes are the same on the wire (portcullis reads bodies as bytes).
            same_type = t.type == f.type or {t.type, f.type} == {f.TYPE_STRING, f.TYPE_BYTES}
            assert same_type, f"{ours.full_name}.{f.name}: type {f.type} vs Envoy's {t.type}"
            assert t.is_repeated == f.is_repeated, f"{ours.full_name}.{f.name}: repeated {f.is_repeated} vs Envoy's {t.is_repeated}"
            compared += 1
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                compare(f.message_type)
        for e in ours.enum_types:
            theirs_enum = envoys.FindEnumTypeByName(e.full_name)
            for v in e.values:
                assert theirs_enum.values_by_number[v.number].name == v.name, f"{e.full_name}.{v.name}"

    compare(method.input_type)
    compare(method.output_type)
    print("compared fields:", compared, "messages:", len(seen))
    assert compared > 50, compared
