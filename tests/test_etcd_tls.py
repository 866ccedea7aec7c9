"""The ECS's etcd client over https against a real etcd run with TLS and --client-cert-auth
(as etcd must be run beyond loopback: the state in it is the ring)."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request

import pytest
import pytest_twisted

from bench.peers import EtcdSystem
from chainstore import pki
from chainstore.tls import Credentials, TLSFiles
from ecs.etcd import EtcdClient, EtcdUnavailable, b64, http_post

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("etcd") is None,
                       reason="etcd is not installed (Debian: apt-get install etcd-server; "
                              ".ci/run installs it)"),
]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    system = EtcdSystem(tmp_path_factory.mktemp("etcd-tls"), members=1, tls=True)
    system.start()
    try:
        yield system
    finally:
        system.stop()


def client(etcd: EtcdSystem, files: TLSFiles) -> EtcdClient:
    from twisted.internet import reactor
    return EtcdClient(etcd.endpoints, http_post(reactor, timeout=5.0, tls=Credentials(files)))


@pytest_twisted.ensureDeferred
async def test_the_ecs_client_presents_its_certificate_and_reads_back_what_it_wrote(etcd):
    ecs = client(etcd, etcd.tls_files("ecs"))
    await ecs.txn([], [{"request_put": {"key": b64(b"/tls/k"), "value": b64(b"v")}}])
    found, _ = await ecs.get(b"/tls/k")
    assert found is not None and found.value == b"v"
    # The same etcd refuses whoever has no certificate of its CA.
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        context = ssl.create_default_context(cafile=etcd.tls_files().ca)
        urllib.request.urlopen(f"{etcd.endpoints[0]}/v3/kv/range", data=b"{}", timeout=5,
                               context=context)


@pytest_twisted.ensureDeferred
async def test_an_etcd_certificate_of_another_ca_is_refused(etcd, tmp_path):
    # A man in the middle with a certificate of another CA (here: the ECS trusting another CA
    # than etcd's) gets nothing: the client refuses the handshake, every member fails.
    other = tmp_path / "other"
    pki.ensure(str(other), [("ecs", "ecs", [])])
    mixed = TLSFiles(str(other / "ca.crt"), etcd.tls_files("ecs").cert,
                     etcd.tls_files("ecs").key)
    with pytest.raises(EtcdUnavailable):
        await client(etcd, mixed).get(b"/tls/k")
