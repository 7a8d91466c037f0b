"""TLS, mutual TLS and bearer tokens, against the real server.

The certificates are throwaway ones made by ``clients/scripts/test-certs.sh``
(the openssl CLI): a test CA, a server certificate for localhost / 127.0.0.1
and a client certificate, all signed by it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import REPO

from backstop import Backstop, ControlPlaneError, ControlPlaneUnavailable, TLSConfig, Unauthenticated
from backstop.testing import BackstopServer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

TOKEN = "fleet-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO / "clients" / "scripts" / "test-certs.sh"), str(d)], check=True)
    yield d


@pytest.fixture
def tls_server(start_server: Callable[..., BackstopServer], certs: Path) -> BackstopServer:
    return start_server(
        f"""
[server.tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
client_ca = "{certs}/ca.pem"
require_client_cert = true

[targets.a]
"""
    )


def test_mutual_tls_with_the_right_roots_and_client_certificate(
    tls_server: BackstopServer, certs: Path, make_client: Callable[..., Backstop]
) -> None:
    bs = make_client(
        tls_server.address,
        # Paths, bytes and PEM text are all accepted.
        tls=TLSConfig(
            root_certificates=certs / "ca.pem",
            certificate_chain=(certs / "client.pem").read_bytes(),
            private_key=(certs / "client.key").read_text(),
        ),
    )
    adm = bs.can_proceed("a")
    assert adm.allowed and not adm.local
    assert bs.call(["a"], lambda t, m, k: f"ok from {t}") == "ok from a"
    assert bs.queue_stats() == [] or isinstance(bs.queue_stats(), list)
    assert bs.mode == "remote"


def test_without_a_client_certificate_the_handshake_is_refused(
    tls_server: BackstopServer, certs: Path, make_client: Callable[..., Backstop]
) -> None:
    bs = make_client(
        tls_server.address, tls=TLSConfig(root_certificates=certs / "ca.pem"), queue_timeout=2.0, connect_timeout=0.5
    )
    with pytest.raises(ControlPlaneUnavailable) as e:
        bs.queue_stats()
    assert e.value.details, e.value
    # Decisions fall back to the local fail-safe, as for any unreachable server.
    assert bs.can_proceed("a").local


def test_a_server_certificate_from_another_ca_is_not_trusted(
    tls_server: BackstopServer, certs: Path, make_client: Callable[..., Backstop]
) -> None:
    bs = make_client(
        tls_server.address,
        tls=TLSConfig(
            root_certificates=certs / "other-ca.pem",
            certificate_chain=certs / "client.pem",
            private_key=certs / "client.key",
        ),
        queue_timeout=2.0,
        connect_timeout=0.5,
    )
    with pytest.raises(ControlPlaneUnavailable):
        bs.queue_stats()


def test_plaintext_to_a_tls_server_fails(tls_server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    bs = make_client(tls_server.address, queue_timeout=2.0, connect_timeout=0.5)
    with pytest.raises(ControlPlaneUnavailable):
        bs.queue_stats()


def test_tls_options_are_checked(certs: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        Backstop("127.0.0.1:1", tls=TLSConfig(certificate_chain=certs / "client.pem"))
    with pytest.raises(ValueError, match="cannot read"):
        Backstop("127.0.0.1:1", tls=TLSConfig(root_certificates=certs / "missing.pem"))
    import grpc

    with pytest.raises(ValueError, match="not both"):
        Backstop("127.0.0.1:1", tls=True, credentials=grpc.ssl_channel_credentials())


AUTH = f"""
[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"

[routes.chat]
targets = ["a"]
[targets.a]
"""


@pytest.mark.parametrize("stream", [True, False], ids=["decide-stream", "unary"])
def test_token(start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], stream: bool) -> None:
    server = start_server(AUTH)
    good = make_client(server.address, token=TOKEN, stream=stream)
    adm = good.can_proceed("a")
    assert adm.allowed and not adm.local
    assert good.call("chat", lambda t, m, k: "ok") == "ok"
    assert good.defer("chat", {"p": 1}).id

    for bad in (make_client(server.address, token="wrong-token-0000000000", stream=stream),
                make_client(server.address, stream=stream)):
        with pytest.raises(Unauthenticated) as e:
            bad.can_proceed("a")
        assert isinstance(e.value, ControlPlaneError)
        assert e.value.code.name == "UNAUTHENTICATED"
        with pytest.raises(Unauthenticated):
            bad.call("chat", lambda t, m, k: "never called")
        with pytest.raises(Unauthenticated):
            bad.defer("chat", {"p": 1})
        assert bad.mode == "remote", "a refused token is not an outage"


def test_token_over_mutual_tls(
    start_server: Callable[..., BackstopServer], certs: Path, make_client: Callable[..., Backstop]
) -> None:
    server = start_server(
        f"""
[server.tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
{AUTH}"""
    )
    tls = TLSConfig(root_certificates=certs / "ca.pem", server_name="localhost")
    assert make_client(server.address, tls=tls, token=TOKEN).can_proceed("a").allowed
    with pytest.raises(Unauthenticated):
        make_client(server.address, tls=tls, token="wrong-token-0000000000").can_proceed("a")
