"""Client certificates that reach portcullis only through `x-forwarded-client-cert`, with their chain:
real Envoy terminates mTLS and sets XFCC (`SANITIZE_SET` with `Cert=` and `Chain=`), and sends no peer
certificate in the CheckRequest, as a front proxy that is not the ext_authz client would. portcullis
(`trust_forwarded_client_cert` + `trust`) must build the chain from the leaf and the intermediate it
finds in `Chain=` alone, up to the one root it is given.

A second listener forwards a client's own XFCC untouched (`ALWAYS_FORWARD_ONLY`, the misconfiguration
`trust` exists for): a forged certificate with the right names, issued by a made-up CA of the same
name, is refused there.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from harness import Backend, Envoy, Portcullis, assert_deny, client_tls_context, make_cert, request

BOOTSTRAP = """
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
static_resources:
  listeners:
    - name: https
      address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                tls_certificates:
                  - certificate_chain: { filename: ${SERVER_CERT} }
                    private_key: { filename: ${SERVER_KEY} }
                validation_context:
                  trusted_ca: { filename: ${ROOT_CA} }
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: https
                # The client's own XFCC is replaced by the verified certificate and its chain, before
                # any HTTP filter runs.
                forward_client_cert_details: SANITIZE_SET
                set_current_client_cert_details: { subject: true, cert: true, chain: true, uri: true, dns: true }
                route_config: &routes
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: / }
                          route: { cluster: backend }
                http_filters: &filters
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service: { envoy_grpc: { cluster_name: portcullis }, timeout: 5s }
                      failure_mode_allow: false
                      status_on_error: { code: ServiceUnavailable }
                      # No include_peer_certificate: portcullis sees the certificate only in XFCC.
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: forward
      address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: forward
                forward_client_cert_details: ALWAYS_FORWARD_ONLY
                route_config: *routes
                http_filters: *filters
  clusters:
    - name: portcullis
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { http2_protocol_options: {} }
      load_assignment:
        cluster_name: portcullis
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${PORTCULLIS_GRPC_PORT} } } }
    - name: backend
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: backend
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${BACKEND_PORT} } } }
"""


class Stack:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        root = make_cert("XFCC Root CA", ca=True, organization="Contoso")
        issuing = make_cert("XFCC Issuing CA", root, ca=True, organization="Contoso")
        self.partner = make_cert("partner", issuing, organization="Contoso")
        # The same names all the way up, under a root nobody configured.
        fake_root = make_cert("XFCC Root CA", ca=True, organization="Contoso")
        fake_issuing = make_cert("XFCC Issuing CA", fake_root, ca=True, organization="Contoso")
        self.forged = make_cert("partner", fake_issuing, organization="Contoso")
        self.issuing, self.fake_issuing = issuing, fake_issuing
        other_root = make_cert("Other Root CA", ca=True)
        server_ca = make_cert("XFCC Server CA", ca=True)
        server = make_cert("localhost", server_ca, server_names=["127.0.0.1", "localhost"])

        (workdir / "root.crt").write_bytes(root.cert_pem)
        (workdir / "other-root.crt").write_bytes(other_root.cert_pem)
        (workdir / "server-ca.crt").write_bytes(server_ca.cert_pem)
        server_files = server.write(workdir, "server")
        # What the client presents: its leaf and the intermediate (Envoy trusts only the root).
        leaf, key = self.partner.write(workdir, "partner")
        leaf.write_bytes(self.partner.cert_pem + issuing.cert_pem)
        self.client = (leaf, key)

        self.portcullis = Portcullis(f"""
listen: {{grpc: 127.0.0.1:0}}
apis:
  - name: trusted
    match: {{path_prefix: /trusted}}
    client_certificate:
      trust_forwarded_client_cert: true
      trust: {{ca_files: ["{workdir / 'root.crt'}"]}}
      identities: [{{subject: "O=Contoso, CN=partner"}}]
    on_allow:
      set_headers: {{x-client-thumbprint: "{{cert.thumbprint}}", x-api: "{{api}}"}}
  - name: other-root
    match: {{path_prefix: /other}}
    client_certificate:
      trust_forwarded_client_cert: true
      trust: {{ca_files: ["{workdir / 'other-root.crt'}"]}}
      identities: [{{subject: "O=Contoso, CN=partner"}}]
""", workdir)
        self.backend = Backend()
        template = workdir / "xfcc-envoy.template.yaml"
        template.write_text(BOOTSTRAP)
        self.envoy = Envoy(str(template), {
            "SERVER_CERT": server_files[0],
            "SERVER_KEY": server_files[1],
            "ROOT_CA": workdir / "root.crt",
            "PORTCULLIS_GRPC_PORT": self.portcullis.grpc_port,
            "BACKEND_PORT": self.backend.port,
        }, workdir, name="xfcc-envoy")

    def mtls(self, path: str, headers: dict | None = None):
        ctx = client_tls_context(self.workdir / "server-ca.crt", self.client)
        return request(self.envoy.url("https", path), headers=headers, ssl_context=ctx)

    def forward(self, path: str, headers: dict):
        return request(f"http://127.0.0.1:{self.envoy.ports['forward']}{path}", headers=headers)

    def stop(self):
        self.envoy.stop()
        self.portcullis.stop()
        self.backend.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("xfcc-chain"))
    yield s
    s.stop()


def xfcc(leaf, issuing) -> str:
    """An XFCC element as Envoy writes it: URL-encoded PEM, quoted."""
    cert = urllib.parse.quote(leaf.cert_pem.decode(), safe="")
    chain = urllib.parse.quote((leaf.cert_pem + issuing.cert_pem).decode(), safe="")
    return f'Hash=00;Cert="{cert}";Chain="{chain}";Subject="CN=partner,O=Contoso"'


def test_the_chain_from_xfcc_reaches_the_configured_root(stack):
    r = stack.mtls("/trusted/x")
    assert r.status == 200, r
    h = r.echo["headers"]
    assert h["x-api"] == ["trusted"], h
    assert h["x-client-thumbprint"] == [stack.partner.sha1], h
    # Envoy forwarded what it set, chain included: portcullis had no other source.
    assert "Chain=" in h["x-forwarded-client-cert"][0], h


def test_a_chain_to_another_root_is_not_trusted(stack):
    assert_deny(stack.mtls("/other/x"), 403, "ClientCertificateNotTrusted")


def test_a_clients_own_xfcc_is_replaced_by_envoy(stack):
    # The forged header is dropped before ext_authz; the verified certificate decides.
    r = stack.mtls("/trusted/x", {"x-forwarded-client-cert": xfcc(stack.forged, stack.fake_issuing)})
    assert r.status == 200, r
    assert r.echo["headers"]["x-client-thumbprint"] == [stack.partner.sha1]


def test_a_forged_certificate_with_the_right_names_is_refused_where_xfcc_passes_untouched(stack):
    r = stack.forward("/trusted/x", {"x-forwarded-client-cert": xfcc(stack.forged, stack.fake_issuing)})
    assert_deny(r, 403, "ClientCertificateNotTrusted")
