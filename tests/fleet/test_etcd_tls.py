"""Fleet mode against an etcd cluster that speaks TLS only and wants client certificates.

One member (``--client-cert-auth``, certificates of a throwaway CA: :mod:`dsproxy.testing.pki`).
The client, the manager and ``dsproxy fleet status`` reach it with ``--etcd-cacert``,
``--etcd-cert`` and ``--etcd-key``; without the client certificate, with another CA's, or trusting
only the system's roots they are refused -- and a wrong file is an error naming it before anything
connects.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsproxy import cli
from dsproxy.fleet import tls
from dsproxy.fleet.etcd import Etcd, EtcdUnavailable
from dsproxy.fleet.tls import EtcdTLS
from dsproxy.testing.etcd import EtcdCluster
from dsproxy.testing.fleet import Fleet
from dsproxy.testing.pki import PKI


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd-tls"), tls=True) as cluster:
        yield cluster.start()


@pytest.fixture
def pki(secure_cluster: EtcdCluster) -> PKI:
    assert secure_cluster.pki is not None
    return secure_cluster.pki


def _run(cluster: EtcdCluster, secure: EtcdTLS | None, work: Any, timeout: float = 2.0) -> Any:
    async def main() -> Any:
        async with Etcd(cluster.endpoints, timeout=timeout, tls=secure) as etcd:
            return await work(etcd)

    return asyncio.run(main())


def test_a_client_with_the_cluster_s_certificates_reads_writes_and_watches(
    secure_cluster: EtcdCluster, pki: PKI
) -> None:
    secure = tls.load(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert "key" not in repr(secure).replace("key=<key>", "") and "PRIVATE" not in repr(secure)

    async def work(etcd: Etcd) -> tuple[int, list[bytes], list[bytes]]:
        txn = await etcd.put_if(b"/tls/datastores/a", b"datastore: a\n\tpath /srv/a\n", 0)
        _, kvs = await etcd.get_prefix(b"/tls/datastores/")
        async for batch in etcd.watch_prefix(b"/tls/", txn.revision):
            return txn.revision, [kv.value for kv in kvs], [e.value for e in batch.events]
        raise AssertionError("the watch ended")

    revision, values, events = _run(secure_cluster, secure, work)
    assert revision > 0 and values == [b"datastore: a\n\tpath /srv/a\n"] == events


@pytest.mark.parametrize("who", ["no client certificate", "another CA's client", "the system's roots"])
def test_a_client_the_cluster_does_not_trust_or_that_does_not_trust_it_is_refused(
    secure_cluster: EtcdCluster, pki: PKI, who: str
) -> None:
    secure = {
        "no client certificate": tls.load(str(pki.ca)),
        "another CA's client": tls.load(str(pki.ca), str(pki.other_client_cert), str(pki.other_client_key)),
        "the system's roots": None,  # https:// endpoints: the server's certificate is not trusted
    }[who]
    with pytest.raises(EtcdUnavailable) as info:
        _run(secure_cluster, secure, lambda etcd: etcd.revision(), timeout=0.5)
    assert secure_cluster.endpoints[0].removeprefix("https://") in str(info.value)
    hint = "is not signed by --etcd-cacert" if who == "the system's roots" else "the member refused this client"
    assert hint in str(info.value)


def test_a_wrong_tls_file_is_an_error_naming_it(pki: PKI, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: tls.load(None, str(pki.client_cert), None), "--etcd-cert needs --etcd-key"),
        (lambda: tls.load(str(tmp_path / "missing.pem")), f"--etcd-cacert {tmp_path / 'missing.pem'}: cannot read"),
        (lambda: tls.load(str(junk)), f"--etcd-cacert {junk}: not a PEM certificate"),
        (lambda: tls.load(None, str(pki.client_cert), str(junk)), f"--etcd-key {junk}: not a PEM private key"),
        (
            lambda: tls.load(None, str(pki.client_cert), str(pki.other_client_key)),
            f"--etcd-key {pki.other_client_key}: not the key of the certificate in {pki.client_cert}",
        ),
    ]
    for call, message in cases:
        with pytest.raises(tls.TLSFileError) as info:
            call()
        assert message in str(info.value)
    with pytest.raises(ValueError, match="with http:// endpoints"):
        tls.wanted(["http://e1:2379"], True)
    assert tls.wanted(["e1:2379"], True) and tls.wanted(["https://e1:2379"], False)
    assert not tls.wanted(["e1:2379", "http://e2:2379"], False)


def test_a_manager_over_tls_mirrors_and_serves_a_write(secure_cluster: EtcdCluster, tmp_path: Path) -> None:
    with Fleet(tmp_path, secure_cluster.endpoints, "/t/tls", 1, manager_args=secure_cluster.tls_args) as fleet:
        fleet.start()
        (host,) = fleet.hosts
        answer = host.request("POST", "/config/datastore", {"name": "secure1", "comment": "over tls"})
        revision = answer.raise_for_status().data["revision"]
        host.wait_revision(revision)
        assert host.datastores()["secure1"]["comment"] == "over tls"
        assert host.fleet_status()["state"] == "connected"
        assert "over TLS (CN=dsproxy test CA, CN=dsproxy-manager)" in host.log_text()


def test_a_manager_with_a_wrong_key_does_not_start(secure_cluster: EtcdCluster, pki: PKI, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "dsproxy", "--base-dir", str(tmp_path / "base"), "manager",
            "--etcd", ",".join(secure_cluster.endpoints), "--etcd-cacert", str(pki.ca),
            "--etcd-cert", str(pki.client_cert), "--etcd-key", str(pki.other_client_key)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"--etcd-key {pki.other_client_key}: not the key of the certificate" in done.stderr
    assert "BEGIN" not in done.stderr  # no key material in the log


def test_fleet_status_over_tls_and_without_a_client_certificate(
    secure_cluster: EtcdCluster, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["fleet", "status", "--etcd", ",".join(secure_cluster.endpoints), "--etcd-prefix", "/t/tls-status"]
    assert cli.main([*base, *secure_cluster.tls_args, "--json"]) == 0
    assert '"hosts": []' in capsys.readouterr().out
    assert cli.main([*base, "--etcd-cacert", str(pki.ca), "--etcd-timeout", "0.5"]) == 1
    assert secure_cluster.endpoints[0].removeprefix("https://") in capsys.readouterr().err
