"""TLS pieces without daemons: the generated certificate, the context, --listen parsing, and the
HTTP server over TLS in this process (handshake timeout, header cap, the remote gate)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from dsproxy import cli
from dsproxy.daemon import http, options, tls
from dsproxy.daemon.http import HTTPError, Limits, Request, Router, Server, bind_tcp, data_reply

FINGERPRINT = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")


# -- the certificate ----------------------------------------------------------------------------------


def test_self_signed_files_are_made_once_with_a_private_key(tmp_path: Path) -> None:
    files, generated = tls.ensure_self_signed(tmp_path)
    assert generated and files == tls.CertFiles(tmp_path / "proxy.pem", tmp_path / "proxy.key")
    key_mode = stat.S_IMODE(files.key.stat().st_mode)
    assert key_mode == 0o640 and not key_mode & 0o007
    first = tls.file_fingerprint(files.cert)
    again, generated = tls.ensure_self_signed(tmp_path)
    assert not generated and tls.file_fingerprint(again.cert) == first  # a restart keeps what clients pinned


def test_certificate_info_names_the_loopback_addresses_and_the_pinned_fingerprint(tmp_path: Path) -> None:
    files, _ = tls.ensure_self_signed(tmp_path)
    info = tls.certificate_info(files.cert)
    assert {"localhost", "127.0.0.1", "::1", socket.gethostname()} <= set(info["san"])
    assert info["self-signed"] and info["public-key"] == "ECDSA secp256r1"
    der = ssl.PEM_cert_to_DER_cert(files.cert.read_text())
    assert FINGERPRINT.match(info["fingerprint"])
    assert info["fingerprint"].replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    assert info["not-after"] > "2100"  # PBS's 1000 years: a pinned self-signed certificate does not expire


def test_a_link_planted_at_the_key_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    victim = tmp_path / "victim"
    (conf / "proxy.key").symlink_to(victim)  # dangling: "missing", so the files are generated
    tls.ensure_self_signed(conf)
    assert not victim.exists()
    assert not (conf / "proxy.key").is_symlink() and b"PRIVATE KEY" in (conf / "proxy.key").read_bytes()


def test_a_key_that_does_not_match_is_a_clear_error(tmp_path: Path) -> None:
    files, _ = tls.ensure_self_signed(tmp_path)
    _, other_key = tls.generate()
    (tmp_path / "other.key").write_bytes(other_key)
    with pytest.raises(tls.TLSError, match="key values mismatch"):
        tls.server_context(tls.CertFiles(files.cert, tmp_path / "other.key"))
    with pytest.raises(tls.TLSError, match="missing"):
        tls.server_context(tls.CertFiles(tmp_path / "nope.pem", files.key))


def test_the_server_context_wants_tls_1_2_and_no_client_certificate(tmp_path: Path) -> None:
    ctx = tls.server_context(tls.ensure_self_signed(tmp_path)[0])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE


# -- --listen -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8007", ("127.0.0.1", 8007)),
        ("[::1]:8007", ("::1", 8007)),
        ("[::]:0", ("::", 0)),
        ("localhost:8007", ("localhost", 8007)),
    ],
)
def test_listen_takes_ipv4_ipv6_and_names(text: str, expected: tuple[str, int]) -> None:
    ep = options.endpoint(text)
    assert tuple(ep) == expected and options.endpoint(str(ep)) == ep  # dsproxy run passes str(ep) on


@pytest.mark.parametrize("text", ["8007", "::1:8007", "[nonsense]:1", "host:99999", "host:", ":8007", "a_b:1"])
def test_a_bad_listen_value_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        options.endpoint(text)


def test_a_bad_listen_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["proxy", "--listen", "::1:8007"])
    assert exit_info.value.code == 2
    assert "an IPv6 address goes in brackets" in capsys.readouterr().err


def test_run_passes_every_listen_on_to_the_proxy() -> None:
    args = cli.build_parser().parse_args(["run", "--listen", "127.0.0.1:1", "--listen", "[::1]:2"])
    assert options.argv(args, "proxy") == ["--listen", "127.0.0.1:1", "--listen", "[::1]:2"]


def test_cert_info_prints_the_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files, _ = tls.ensure_self_signed(tmp_path)
    assert cli.main(["cert", "info", "--config-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert tls.file_fingerprint(files.cert) in out and "localhost" in out
    assert cli.main(["cert", "info", "--config-dir", str(tmp_path / "none")]) == 1
    assert "no certificate yet" in capsys.readouterr().err


# -- the HTTP server over TLS, in this process -------------------------------------------------------


class TLSServer:
    """An :class:`http.Server` on 127.0.0.1 with TLS, in a thread; remote requests to ``/secret`` are refused."""

    def __init__(self, files: tls.CertFiles, limits: Limits) -> None:
        router = Router()
        router.add("GET", "/ping", lambda r: data_reply({"pong": True, "remote": r.remote is not None}))
        router.add("GET", "/secret", lambda r: data_reply("secret"))
        self.server = Server(router, limits, authenticate_remote=self._gate)
        self.sock = bind_tcp("127.0.0.1", 0)[0]
        self.port = self.sock.getsockname()[1]
        self.context = tls.server_context(files)
        self.loop = uvloop.new_event_loop()  # what the workers run
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _gate(request: Request) -> None:
        if request.path != "/ping":
            raise HTTPError(401, "authentication required")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(self.sock, balance=True, ssl=self.context))
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain(0.5), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSServer]:
    files, _ = tls.ensure_self_signed(tmp_path)
    server = TLSServer(files, Limits(request_timeout=0.5, max_header_bytes=4096))
    try:
        yield server
    finally:
        server.close()


def _client(server: TLSServer, cafile: Path) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cafile))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_tls_requests_pass_the_remote_gate(tls_server: TLSServer, tmp_path: Path) -> None:
    with _client(tls_server, tmp_path / "proxy.pem") as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\nGET /secret HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 200") and b'"remote":true' in answer
    assert b"HTTP/1.1 401" in answer and b"authentication required" in answer and b'"secret"' not in answer


def test_the_header_cap_holds_over_tls(tls_server: TLSServer, tmp_path: Path) -> None:
    with _client(tls_server, tmp_path / "proxy.pem") as s:
        s.sendall(b"GET /ping HTTP/1.1\r\nx-big: " + b"a" * 60000)  # no CRLF: the head never ends
        answer = _read_all(s)  # answered and closed: the server did not wait for the rest
    assert answer.startswith(b"HTTP/1.1 431") and b"request headers larger than 4096 bytes" in answer


def test_a_client_that_never_says_hello_is_dropped(tls_server: TLSServer, tmp_path: Path) -> None:
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=30) as raw:
        started = time.monotonic()
        assert raw.recv(1) == b""  # closed by the server (a hang would end in the 30 s timeout)
        assert time.monotonic() - started < 20
    with _client(tls_server, tmp_path / "proxy.pem") as s:  # the server still answers others
        s.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert _read_all(s).startswith(b"HTTP/1.1 200")


def test_a_drain_finishes_a_handshake_under_way_and_drops_a_silent_client_after_the_grace(tmp_path: Path) -> None:
    """A reload's old worker: a client that connected just before it (its hello on the way) is
    served; one that never says hello holds the drain for the grace only, not the 30 s handshake
    timeout."""
    files, _ = tls.ensure_self_signed(tmp_path)
    server = TLSServer(files, Limits(request_timeout=30.0))
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    late = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        time.sleep(0.2)  # both accepted, their handshakes waiting for a hello
        started = time.monotonic()
        draining = asyncio.run_coroutine_threadsafe(server.server.drain(30.0), server.loop)
        time.sleep(0.2)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "proxy.pem"))
        with ctx.wrap_socket(late, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
        draining.result(10)
        took = time.monotonic() - started
        assert http.DRAIN_FRESH_GRACE <= took < http.DRAIN_FRESH_GRACE + 2.0, took
        assert silent.recv(1) == b""  # dropped
    finally:
        silent.close()
        server.close()


def test_tcp_is_never_served_without_a_gate(tmp_path: Path) -> None:
    files, _ = tls.ensure_self_signed(tmp_path)
    sock = bind_tcp("127.0.0.1", 0)[0]
    try:
        with pytest.raises(ValueError, match="authenticate_remote"):
            asyncio.run(Server(Router()).serve(sock, balance=True, ssl=tls.server_context(files)))
    finally:
        sock.close()
