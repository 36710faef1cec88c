"""The proxy over HTTPS (``--listen``): what a remote client sees -- real daemons, real TLS clients."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dsproxy.daemon import tls
from dsproxy.testing.daemons import free_port
from tests.daemons import Daemons, wait_for

API = "/api2/json"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = has_ipv6_loopback()


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


class HTTPS:
    """A proxy listening on 127.0.0.1:PORT (and [::1]:PORT), its certificate and a client for it."""

    def __init__(self, d: Daemons, port: int) -> None:
        self.d, self.port = d, port
        self.cert = d.paths.config_dir / "proxy.pem"
        self.key = d.paths.config_dir / "proxy.key"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def request(
        self, method: str, path: str, host: str = "127.0.0.1", body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(host, self.port, context=self.context(), timeout=30)
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"PBSAPIToken={token}"
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def connect(self, context: ssl.SSLContext | None = None, server_hostname: str = "127.0.0.1") -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return (context or self.context()).wrap_socket(raw, server_hostname=server_hostname)

    def served_fingerprint(self) -> str:
        """The fingerprint of the certificate a new connection is served (not verified: read it)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with self.connect(ctx) as s:
            der = s.getpeercert(binary_form=True)
        assert der is not None
        return tls.fingerprint(der)

    def fingerprint_or_none(self) -> str | None:
        """:meth:`served_fingerprint`, or None for a connection a draining worker closed (retry)."""
        try:
            return self.served_fingerprint()
        except OSError:  # ssl.SSLError included
            return None

    def cert_info(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "dsproxy", "--config-dir", str(self.d.paths.config_dir), "cert", "info", "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        info: dict[str, Any] = json.loads(out.stdout)
        return info


@pytest.fixture
def https(daemon_factory: Callable[..., Daemons]) -> Iterator[HTTPS]:
    d = daemon_factory(workers=2, stores=2)
    port = free_port()
    d.start_manager()
    listen = ["--listen", f"127.0.0.1:{port}"] + (["--listen", f"[::1]:{port}"] if IPV6 else [])
    d.start_proxy(*listen)
    yield HTTPS(d, port)


def test_a_client_pinning_the_fingerprint_from_cert_info_gets_answers(https: HTTPS) -> None:
    info = https.cert_info()
    ctx = https.context()  # the generated certificate is its own CA
    with https.connect(ctx, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None and tls.fingerprint(der) == info["fingerprint"]
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        s.sendall(f"GET {API}/ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"data":{"pong":true}}')


def test_a_client_that_does_not_trust_the_certificate_gets_a_verify_error(https: HTTPS) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", https.port, context=ssl.create_default_context(), timeout=30)
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
        conn.request("GET", f"{API}/ping")
    conn.close()
    assert https.request("GET", f"{API}/ping")[0] == 200  # the server is fine: it was the client's choice


@pytest.mark.skipif(not IPV6, reason="no IPv6 on the loopback interface")
def test_ipv6_listener_answers(https: HTTPS) -> None:
    assert https.request("GET", f"{API}/ping", host="::1") == (200, {"data": {"pong": True}})


def test_without_authentication_only_ping_is_answered_over_tcp(https: HTTPS) -> None:
    status, body = https.request("GET", f"{API}/admin/datastore/demo0001/status")
    assert status == 401
    assert body == {"message": "authentication failed - no authentication credentials provided."}
    before = https.d.config_file.read_bytes()
    status, body = https.request("PUT", f"{API}/config/datastore/demo0001", body={"comment": "from afar"})
    assert status == 401
    status, _ = https.request("POST", f"{API}/admin/datastore/demo0001/operation", body={"operation": "write"})
    assert status == 401
    assert https.d.config_file.read_bytes() == before  # nothing was forwarded to the manager
    with https.d.client() as c:  # the Unix socket keeps its own rules
        assert c.get(f"{API}/admin/datastore/demo0001/status").status == 200
        assert c.get(f"{API}/admin/datastore/demo0001/active-operations").data == {"read": 0, "write": 0}


def test_the_header_cap_holds_over_tls(https: HTTPS) -> None:
    with https.connect() as s:
        s.sendall(f"GET {API}/ping HTTP/1.1\r\nx-big: ".encode() + b"a" * (64 * 1024))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 431") and b"request headers larger than 16384 bytes" in answer


def test_the_generated_key_is_not_readable_by_others(https: HTTPS) -> None:
    mode = stat.S_IMODE(os.stat(https.key).st_mode)
    assert mode == 0o640 and not mode & 0o004


def test_a_replaced_certificate_is_served_after_sighup(https: HTTPS) -> None:
    old = https.served_fingerprint()
    assert old == tls.file_fingerprint(https.cert)
    cert_pem, key_pem = tls.generate("replaced.example")
    https.key.write_bytes(key_pem)
    https.cert.write_bytes(cert_pem)
    new = tls.file_fingerprint(https.cert)
    assert https.served_fingerprint() == old  # nothing changes before the reload
    assert https.d.proxy is not None
    os.kill(https.d.proxy.pid, signal.SIGHUP)
    # connections reach every new worker once the old ones are drained
    wait_for(lambda: all(https.fingerprint_or_none() == new for _ in range(6)), 30, 0.2, what="the new certificate")
    assert https.request("GET", f"{API}/ping")[0] == 200  # and it verifies with the new file as CA


def test_a_certificate_that_does_not_load_keeps_the_old_one_on_reload(https: HTTPS) -> None:
    old = https.served_fingerprint()
    https.cert.write_text("not a certificate\n")
    assert https.d.proxy is not None
    os.kill(https.d.proxy.pid, signal.SIGHUP)
    wait_for(lambda: "keep the previous certificate" in https.d.log_text(), 30, what="the reload's complaint")
    assert https.served_fingerprint() == old and https.d.proxy.poll() is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_with_the_cacert_or_the_pinned_key(https: HTTPS) -> None:
    url = f"https://127.0.0.1:{https.port}{API}/ping"
    ok = subprocess.run(["curl", "-sS", "--cacert", str(https.cert), url], capture_output=True, text=True, timeout=30)
    assert json.loads(ok.stdout) == {"data": {"pong": True}}, ok.stderr
    pin = https.cert_info()["pinned-pubkey"]
    pinned = subprocess.run(
        ["curl", "-sS", "-k", "--pinnedpubkey", pin, url], capture_output=True, text=True, timeout=30
    )
    assert json.loads(pinned.stdout) == {"data": {"pong": True}}, pinned.stderr
    wrong = "sha256//" + "A" * 43 + "="
    refused = subprocess.run(
        ["curl", "-sS", "-k", "--pinnedpubkey", wrong, url], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0 and "pinned" in refused.stderr.lower()
    untrusted = subprocess.run(["curl", "-sS", url], capture_output=True, text=True, timeout=30)
    assert untrusted.returncode == 60 and "self-signed" in untrusted.stderr


def test_a_port_in_use_is_a_boot_failure_that_says_so(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory(workers=1, stores=1)
    d.start_manager()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            d.command("proxy", "--workers", "1", "--listen", f"127.0.0.1:{port}"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr + proc.stdout


def _dsproxy(d: Daemons, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(d.base), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


def test_a_token_made_with_the_cli_works_over_https_and_a_revoke_is_refused_by_every_worker(https: HTTPS) -> None:
    """The whole remote path: token created and granted through the CLI, status over HTTPS with it,
    a 403 where the ACL does not reach, and after a revoke every worker refuses it within 2 s."""
    made = json.loads(_dsproxy(https.d, "token", "create", "root@pam!e2e", "--json"))
    token = f"{made['tokenid']}:{made['value']}"
    status, body = https.request("GET", f"{API}/admin/datastore/demo0001/status", token=token)
    assert status == 403 and "Datastore.Audit" in body["message"]  # a new token has no permissions
    _dsproxy(https.d, "acl", "update", "/datastore/demo0001", "DatastoreAudit", "--auth-id", "root@pam!e2e")
    for _ in range(8):  # 2 workers: each connection may land on either
        status, body = https.request("GET", f"{API}/admin/datastore/demo0001/status", token=token)
        assert status == 200 and {"total", "used", "avail"} <= set(body["data"])
    assert https.request("GET", f"{API}/admin/datastore/demo0002/status", token=token)[0] == 403
    status, _ = https.request("PUT", f"{API}/config/datastore/demo0001", body={"comment": "x"}, token=token)
    assert status == 403  # Audit does not allow Modify
    _dsproxy(https.d, "token", "remove", "root@pam!e2e")
    refused = time.monotonic()
    assert all(
        https.request("GET", f"{API}/admin/datastore/demo0001/status", token=token)[0] == 401 for _ in range(8)
    )
    assert time.monotonic() - refused < 2 + 8 * 1.0  # 8 refusals, each after the failure delay
