"""Fixtures of the end-to-end suite: certificates, the echo backend, and stacks of
client -> Envoy (or nginx) -> backend, with the real portcullis binary deciding. The shared topology
(keys, addresses, policies, bootstrap placeholders) is in topology.py."""

from __future__ import annotations

import pytest

from harness import Backend, Envoy, Portcullis, make_cert
from topology import GrpcStack, Pki, grpc_envoy_params, http_envoy_params, main_config


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    server_ca = make_cert("E2E Server CA", ca=True)
    server = make_cert("localhost", server_ca, server_names=["127.0.0.1", "localhost"])
    client_ca = make_cert("E2E Client CA", ca=True, organization="Contoso")
    partner = make_cert("partner", client_ca, organization="Contoso")
    intruder = make_cert("intruder", client_ca, organization="Contoso")
    other_ca = make_cert("E2E Client CA", ca=True, organization="Contoso")
    foreign = make_cert("partner", other_ca, organization="Contoso")
    (d / "server-ca.crt").write_bytes(server_ca.cert_pem)
    (d / "client-ca.crt").write_bytes(client_ca.cert_pem)
    return Pki(
        dir=d,
        server_ca=d / "server-ca.crt",
        server=server.write(d, "server"),
        client_ca=d / "client-ca.crt",
        partner=partner.write(d, "partner"),
        partner_cert=partner,
        intruder=intruder.write(d, "intruder"),
        intruder_cert=intruder,
        foreign=foreign.write(d, "foreign"),
    )


@pytest.fixture(scope="session")
def backend():
    b = Backend()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def grpc_stack(tmp_path_factory, backend, pki):
    """client -> Envoy (deploy/envoy/ext-authz-grpc.yaml) -> echo backend; Envoy asks portcullis."""
    workdir = tmp_path_factory.mktemp("grpc-stack")
    portcullis = Portcullis(main_config(pki), workdir)
    envoy = None
    try:
        envoy = Envoy("ext-authz-grpc.yaml", grpc_envoy_params(portcullis, backend, pki), workdir)
        envoy.wait_healthy("portcullis")
        yield GrpcStack(portcullis, envoy, backend, pki)
    finally:
        if envoy:
            envoy.stop()
        portcullis.stop()


@pytest.fixture
def stacks(tmp_path, backend, pki):
    """Starts dedicated portcullis and Envoy processes for one test (which may stop or reconfigure
    them) and stops whatever is left at the end."""
    started: list = []

    class Factory:
        def portcullis(self, config_text: str, name: str = "portcullis") -> Portcullis:
            p = Portcullis(config_text, tmp_path, name)
            started.append(p)
            return p

        def envoy(self, portcullis: Portcullis, template: str = "ext-authz-grpc.yaml", params: dict | None = None, name: str = "envoy") -> Envoy:
            e = Envoy(template, params or grpc_envoy_params(portcullis, backend, pki), tmp_path, name)
            started.append(e)
            return e

    yield Factory()
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def http_service_envoy(tmp_path_factory, grpc_stack, backend):
    """client -> Envoy (deploy/envoy/ext-authz-http.yaml) -> echo backend; Envoy asks the same
    portcullis as `grpc_stack`, over HTTP forward-auth."""
    workdir = tmp_path_factory.mktemp("http-service")
    envoy = Envoy("ext-authz-http.yaml", http_envoy_params(grpc_stack.portcullis, backend), workdir)
    try:
        envoy.wait_healthy("portcullis_http")
        yield envoy
    finally:
        envoy.stop()
