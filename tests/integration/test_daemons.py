"""The real daemons over the real socket: what a client of proxy.sock sees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dsproxy.client import Client
from tests.daemons import Daemons, wait_for

API = "/api2/json"


def http(d: Daemons) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=d.proxy_sock), base_url="http://dsproxy", timeout=30)


def curl(d: Daemons, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--unix-socket", d.proxy_sock, *args], capture_output=True, text=True, timeout=30
    )


def test_status_and_list_over_curl(daemons: Daemons) -> None:
    out = curl(daemons, "-i", f"http://localhost{API}/admin/datastore/demo0001/status")
    head, _, body = out.stdout.partition("\n\n")  # text mode: CRLF became LF
    assert head.startswith("HTTP/1.1 200")
    assert "x-dsproxy-generation:" in head
    data = json.loads(body)["data"]
    assert data["total"] > 0 and 0 <= data["avail"] <= data["total"]
    listing = json.loads(curl(daemons, f"http://localhost{API}/admin/datastore").stdout)["data"]
    assert [d["name"] for d in listing] == [f"demo000{i}" for i in range(1, 6)]
    missing = curl(daemons, "-i", f"http://localhost{API}/admin/datastore/nostore/status").stdout
    assert missing.startswith("HTTP/1.1 404") and "no such datastore 'nostore'" in missing


def test_config_crud_with_digests(daemons: Daemons, tmp_path: Path) -> None:
    with http(daemons) as c:
        r = c.post(f"{API}/config/datastore", json={"name": "store1", "comment": "first"})
        assert r.status_code == 200, r.text
        store_dir = daemons.base / "datastores" / "store1"
        assert (store_dir / ".chunks").is_dir() and (store_dir / ".lock").is_file()
        shown = c.get(f"{API}/config/datastore/store1").json()
        assert shown["data"]["comment"] == "first"
        digest = shown["digest"]
        assert (
            c.post(f"{API}/config/datastore", json={"name": "store1"}).json()["message"]
            == "datastore 'store1' already exists."
        )
        stale = c.put(f"{API}/config/datastore/store1", json={"comment": "x", "digest": "0" * 64})
        assert stale.status_code == 409
        assert stale.json()["message"] == "detected modified configuration - file changed by other user? Try again."
        ok = c.put(f"{API}/config/datastore/store1", json={"comment": "second", "keep-last": 3, "digest": digest})
        assert ok.status_code == 200, ok.text
        assert c.get(f"{API}/config/datastore/store1").json()["data"] == {
            "name": "store1", "comment": "second", "keep-last": 3, "path": str(store_dir),
        }  # fmt: skip
        c.put(f"{API}/config/datastore/store1", json={"delete": ["keep-last"]}).raise_for_status()
        assert "keep-last" not in c.get(f"{API}/config/datastore/store1").json()["data"]
        bad = c.put(f"{API}/config/datastore/store1", json={"keep-daily": "many"})
        assert bad.status_code == 400 and "'keep-daily'" in bad.json()["message"]
        nested = c.post(f"{API}/config/datastore", json={"name": "inner", "path": str(store_dir / "sub")})
        assert nested.status_code == 400 and "inside datastore 'store1'" in nested.json()["message"]
        relative = c.post(f"{API}/config/datastore", json={"name": "rel", "path": "some/where"})
        assert relative.status_code == 400
        assert c.delete(f"{API}/config/datastore/store1").status_code == 200
        assert c.get(f"{API}/config/datastore/store1").status_code == 404
        assert "datastore: store1" not in daemons.config_file.read_text()


def test_maintenance_refusals_and_texts(daemons: Daemons) -> None:
    with http(daemons) as c:
        c.put(
            f"{API}/config/datastore/demo0001", json={"maintenance-mode": "type=read-only,message=upgrade"}
        ).raise_for_status()
        assert c.get(f"{API}/admin/datastore/demo0001/status").status_code == 200
        w = c.post(f"{API}/admin/datastore/demo0001/operation", json={"operation": "write"})
        assert w.status_code == 409
        assert w.json()["message"] == "datastore 'demo0001' is unavailable: read-only maintenance mode: upgrade"
        r = c.put(f"{API}/config/datastore/demo0001", json={"maintenance-mode": "type=offline,message=disk swap"})
        assert r.json()["data"]["active-operations"] == {"read": 0, "write": 0}
        status = c.get(f"{API}/admin/datastore/demo0001/status")
        assert status.status_code == 409
        assert status.json()["message"] == "datastore 'demo0001' is unavailable: offline maintenance mode: disk swap"
        c.put(f"{API}/config/datastore/demo0002", json={"maintenance-mode": "delete"}).raise_for_status()
        back = c.put(f"{API}/config/datastore/demo0002", json={"delete": "maintenance-mode"})
        assert back.status_code == 400 and "being deleted" in back.json()["message"]
        deleted = c.get(f"{API}/admin/datastore/demo0002/status")
        assert deleted.status_code == 409
        assert deleted.json()["message"] == "datastore 'demo0002' is unavailable: datastore is being deleted"


def test_an_offline_transition_reports_held_leases_and_remove_refuses(daemons: Daemons) -> None:
    with http(daemons) as holder, http(daemons) as admin:
        lease = holder.post(f"{API}/admin/datastore/demo0003/operation", json={"operation": "write"}).json()["data"]
        assert admin.get(f"{API}/admin/datastore/demo0003/active-operations").json()["data"] == {"read": 0, "write": 1}
        r = admin.put(f"{API}/config/datastore/demo0003", json={"maintenance-mode": "type=offline"}).json()["data"]
        assert r["active-operations"] == {"read": 0, "write": 1} and r["lagging-processes"] == []
        gone = admin.delete(f"{API}/config/datastore/demo0003")
        assert gone.status_code == 409 and "active operations" in gone.json()["message"]
        assert admin.post(f"{API}/admin/datastore/demo0003/operation", json={"operation": "read"}).status_code == 409
        holder.delete(f"{API}/admin/datastore/demo0003/operation", params={"lease": lease["lease"]}).raise_for_status()
        assert admin.get(f"{API}/admin/datastore/demo0003/active-operations").json()["data"] == {"read": 0, "write": 0}
        assert admin.delete(f"{API}/config/datastore/demo0003").status_code == 200


def test_a_lease_ends_with_its_connection(daemons: Daemons) -> None:
    with http(daemons) as holder:
        holder.post(f"{API}/admin/datastore/demo0004/operation", params={"operation": "read"}).raise_for_status()
        assert daemons.get(f"{API}/admin/datastore/demo0004/active-operations").data == {"read": 1, "write": 0}
    wait_for(lambda: daemons.get(f"{API}/admin/datastore/demo0004/active-operations").data == {"read": 0, "write": 0})


def _on_every_worker(daemons: Daemons, each: int = 2, limit: int = 60) -> list[Client]:
    """Keep-alive connections until every worker holds ``each`` (whichever worker accepts a new
    connection first takes it: six in a row went to one worker on a loaded CI machine); the extras
    stay open too, so the caller closes the list."""
    clients: list[Client] = []
    per_pid: dict[int, int] = {}
    workers = len(daemons.worker_pids())
    while len(clients) < limit and (len(per_pid) < workers or min(per_pid.values()) < each):
        c = Client(daemons.proxy_sock)
        clients.append(c)
        pid = c.get(f"{API}/nodes/localhost/status").data["pid"]
        per_pid[pid] = per_pid.get(pid, 0) + 1
    if len(per_pid) < workers:
        for c in clients:
            c.close()
        pytest.fail(f"{limit} connections all went to worker {sorted(per_pid)}")
    return clients


def test_a_write_is_visible_on_every_workers_next_request(daemons: Daemons) -> None:
    clients = _on_every_worker(daemons)  # each worker holds some of the connections
    try:
        for i in range(5):
            with Client(daemons.proxy_sock) as w:
                ack = w.request("PUT", f"{API}/config/datastore/demo0005", {"comment": f"version {i}"}).data
            for c in clients:
                r = c.get(f"{API}/config/datastore/demo0005")
                assert r.data["comment"] == f"version {i}"
                assert r.generation is not None and r.generation >= ack["generation"]
    finally:
        for c in clients:
            c.close()


def test_a_manual_edit_is_seen_by_every_worker(daemons: Daemons) -> None:
    before = daemons.node()["generation"]
    text = daemons.config_file.read_text()
    daemons.config_file.write_text(text.replace("\tcomment demo datastore\n", "\tcomment edited by hand\n", 1))
    clients = [Client(daemons.proxy_sock) for _ in range(6)]
    try:

        def everyone_sees_it() -> bool:
            return all(
                c.get(f"{API}/config/datastore/demo0001").data.get("comment") == "edited by hand" for c in clients
            )

        wait_for(everyone_sees_it, timeout=10, what="the manual edit on every worker")
    finally:
        for c in clients:
            c.close()
    assert daemons.node()["generation"] != before


def test_a_broken_manual_edit_keeps_serving_and_blocks_writes(daemons: Daemons) -> None:
    good = daemons.config_file.read_text()
    daemons.config_file.write_text(good + "\ndatastore: broken\n\tbogus-key 1\n")
    # one answer, checked whole: two node() calls may land on two workers, one not yet reloaded
    error = wait_for(lambda: daemons.node()["config-error"], what="the parse error in the node status")
    assert "line" in error and "bogus-key" in error
    assert daemons.get(f"{API}/admin/datastore/demo0001/status").status == 200
    with Client(daemons.proxy_sock) as c:
        r = c.request("POST", f"{API}/config/datastore", {"name": "newstore"})
    assert r.status == 503 and "does not parse" in r.json()["message"]
    assert "bogus-key" in daemons.config_file.read_text(), "the admin's edit was overwritten"
    daemons.config_file.write_text(good)
    wait_for(lambda: daemons.node()["config-error"] is None, what="the error to clear")
    with Client(daemons.proxy_sock) as c:
        assert c.request("POST", f"{API}/config/datastore", {"name": "newstore"}).status == 200


def test_a_killed_worker_is_replaced_and_its_operations_vanish(daemons: Daemons) -> None:
    answered: list[float] = []
    failures: list[str] = []
    done = threading.Event()

    def load() -> None:  # keeps both workers busy; a fresh connection per error, like any client
        while not done.is_set():
            try:
                with Client(daemons.proxy_sock, timeout=10) as c:
                    while not done.is_set():
                        r = c.get(f"{API}/admin/datastore/demo0001/status")
                        if r.status != 200:
                            failures.append(f"{r.status} {r.body!r}")
                        answered.append(time.monotonic())
            except OSError:
                pass  # a connection the killed worker held: the next one goes to a live worker

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        _kill_a_lease_holder(daemons)
        after_kill = time.monotonic()
        wait_for(lambda: len([t for t in answered if t > after_kill]) > 50, what="the load to go on")
    finally:
        done.set()
        for t in threads:
            t.join()
    assert failures == []


def _kill_a_lease_holder(daemons: Daemons) -> None:
    with http(daemons) as holder:
        lease = holder.post(f"{API}/admin/datastore/demo0002/operation", json={"operation": "write"}).json()["data"]
        assert daemons.get(f"{API}/admin/datastore/demo0002/active-operations").data["write"] == 1
        before = daemons.worker_pids()
        os.kill(lease["worker"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: len(daemons.worker_pids() - before) == 1 and len(daemons.worker_pids()) == 2, what="a new worker"
        )
        restarted_in = time.monotonic() - killed_at
    assert daemons.get(f"{API}/admin/datastore/demo0002/active-operations").data == {"read": 0, "write": 0}
    assert lease["worker"] not in daemons.worker_pids()
    assert restarted_in < 5, f"replacement took {restarted_in:.1f} s"
    assert daemons.proxy is not None and daemons.proxy.poll() is None


def test_sighup_reload_replaces_every_worker_without_a_failed_request(daemons: Daemons) -> None:
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        with Client(daemons.proxy_sock) as c:
            while not done.is_set():
                try:
                    r = c.get(f"{API}/admin/datastore/demo0001/status")
                    if r.status != 200:
                        failures.append(f"{r.status} {r.body!r}")
                except OSError as err:
                    failures.append(repr(err))
                count[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        before = daemons.worker_pids()
        assert daemons.proxy is not None
        daemons.proxy.send_signal(signal.SIGHUP)
        wait_for(
            lambda: not (daemons.worker_pids() & before) and len(daemons.worker_pids()) == 2,
            timeout=30,
            what="new workers",
        )
        time.sleep(0.3)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert count[0] > 100
    assert failures == []


def test_bad_http_is_answered_4xx_and_no_worker_dies(daemons: Daemons) -> None:
    before = daemons.worker_pids()

    def raw(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(daemons.proxy_sock)
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
    assert raw(b"GET / HTTP/1.1\r\nx-big: " + b"b" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    assert raw(b"POST /api2/json/config/datastore HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n").startswith(
        b"HTTP/1.1 413"
    )
    assert raw(b"GET /api2/json/admin/datastore/%00x/status HTTP/1.1\r\nconnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert raw(b"GET /api2/json/admin/datastore/..%2f..%2fetc/status HTTP/1.1\r\nconnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    assert b"invalid datastore name" in raw(
        b"GET /api2/json/admin/datastore/a!b/status HTTP/1.1\r\nconnection: close\r\n\r\n"
    )
    assert raw(b"GET /nothing/here HTTP/1.1\r\nconnection: close\r\n\r\n").startswith(b"HTTP/1.1 404")
    with http(daemons) as c:
        assert c.post(f"{API}/config/datastore", content=b"{not json").status_code == 400
        assert c.get(f"{API}/admin/datastore/demo0001/status", params={"verbose": "maybe"}).status_code == 400
    assert daemons.worker_pids() == before


def test_a_slow_client_is_timed_out(daemon_factory) -> None:
    d = daemon_factory()
    d.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(d.proxy_sock)
        s.sendall(b"GET /api2/json/ping HTTP/1.1\r\n")  # never finishes the request
        started = time.monotonic()
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    assert 9 <= time.monotonic() - started < 25


def test_socket_activation(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    d.start_manager()
    d.run_dir.mkdir(parents=True, exist_ok=True)
    args = ["systemd-socket-activate", "-l", d.proxy_sock, *d.command("proxy", "--workers", "2")]
    d.start_proxy(args=args)
    # the proxy did not bind: systemd-socket-activate did, and passed the fd
    log = (d.logs / "proxy.log").read_text()
    assert "using the socket passed by systemd" in log
    assert d.get(f"{API}/admin/datastore/demo0001/status").status == 200


def test_sd_notify_ready_reloading_stopping(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory()
    d.start_manager()
    notify_path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(notify_path)
    sink.settimeout(30)
    messages: list[str] = []

    def receive_until(key: str) -> None:
        while not any(key in m for m in messages):
            messages.append(sink.recv(4096).decode())

    try:
        d.start_proxy(env={"NOTIFY_SOCKET": notify_path})
        receive_until("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=2 workers ready" in ready
        assert d.proxy is not None
        d.proxy.send_signal(signal.SIGHUP)
        receive_until("RELOADING=1")
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        messages.clear()
        receive_until("READY=1")
        d.proxy.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert d.proxy.wait(timeout=30) == 0
    finally:
        sink.close()


def test_cli_against_the_running_daemons(daemons: Daemons) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dsproxy", *args, "--base-dir", str(daemons.base)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = cli("datastore", "create", "clistore", "--comment", "from the cli")
    assert created.returncode == 0, created.stderr
    listed = json.loads(cli("datastore", "list", "--json").stdout)["data"]
    assert {"name": "clistore", "comment": "from the cli", "maintenance": None} in listed
    upd = cli("datastore", "update", "clistore", "--maintenance", "offline:new disk")
    assert upd.returncode == 0 and "active operations still running: read 0, write 0" in upd.stdout
    refused = cli("status", "clistore")
    assert refused.returncode == 1 and "offline maintenance mode: new disk" in refused.stderr
    status = cli("status")
    assert status.returncode == 0 and "demo0001" in status.stdout and "clistore" in status.stdout
    assert cli("datastore", "remove", "nothere").stderr.strip() == "dsproxy: no such datastore 'nothere'"


def test_cli_says_when_the_proxy_is_not_running(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(tmp_path), "datastore", "list"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "is the proxy running?" in r.stderr


@pytest.mark.parametrize("mode", ["config", "off"])
def test_the_baseline_modes_give_the_same_answers(daemon_factory, mode: str) -> None:
    d = daemon_factory(cache=mode)
    d.start_manager()
    d.start_proxy("--worker-timeout", "1")
    workers = d.worker_pids()
    with http(d) as c:
        assert c.get(f"{API}/admin/datastore/demo0001/status").status_code == 200
        c.put(
            f"{API}/config/datastore/demo0001", json={"maintenance-mode": "type=offline,message=m"}
        ).raise_for_status()
        assert c.get(f"{API}/admin/datastore/demo0001/status").json()["message"] == (
            "datastore 'demo0001' is unavailable: offline maintenance mode: m"
        )
        c.post(f"{API}/admin/datastore/demo0002/operation", json={"operation": "write"}).raise_for_status()
        assert c.get(f"{API}/admin/datastore/demo0002/active-operations").json()["data"] == {"read": 0, "write": 1}
        assert c.get(f"{API}/admin/datastore/zzz9/status").status_code == 404
    time.sleep(2.5)  # idle workers keep their heartbeat in every mode: none is taken for hung
    assert d.worker_pids() == workers


def test_a_hung_worker_is_killed_and_replaced(daemon_factory) -> None:
    d = daemon_factory()
    d.start_manager()
    d.start_proxy("--worker-timeout", "1")
    before = d.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: victim not in d.worker_pids() and len(d.worker_pids()) == 2, timeout=15, what="a replacement")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)


def _lock_holders(pids: set[int], lock: Path) -> set[int]:
    """The processes among ``pids`` with an open fd on ``lock``."""
    holders = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == str(lock):
                        holders.add(pid)
    return holders


def test_workers_close_an_offline_store_as_soon_as_its_last_operation_ends(daemons: Daemons) -> None:
    lock = daemons.base / "datastores" / "demo0005" / ".lock"
    workers = daemons.worker_pids()
    clients: list[Client] = []
    try:  # a status request on every worker opens the store there (if prewarm has not already)
        served: set[int] = set()
        while served != workers and len(clients) < 200:  # new connections (kept open) until each worker had one
            c = Client(daemons.proxy_sock)
            clients.append(c)
            served.add(c.get(f"{API}/nodes/localhost/status").data["pid"])
            assert c.get(f"{API}/admin/datastore/demo0005/status").status == 200
        assert served == workers, f"{len(clients)} connections all went to {served}"
    finally:
        for c in clients:
            c.close()
    assert _lock_holders(workers, lock) == workers
    with http(daemons) as holder, http(daemons) as admin:
        lease = holder.post(f"{API}/admin/datastore/demo0005/operation", json={"operation": "read"}).json()["data"]
        admin.put(f"{API}/config/datastore/demo0005", json={"maintenance-mode": "type=offline"}).raise_for_status()
        # the idle worker lets go at once; the one holding the lease keeps its fd ...
        wait_for(lambda: _lock_holders(workers, lock) == {lease["worker"]}, what="the idle worker to close it")
        time.sleep(0.3)
        assert _lock_holders(workers, lock) == {lease["worker"]}
        holder.delete(f"{API}/admin/datastore/demo0005/operation").raise_for_status()
        # ... until its count reaches zero: no further request needed
        wait_for(lambda: _lock_holders(workers, lock) == set(), what="the last fd to close")


def test_dsproxy_run_serves_and_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    base = tmp_path / "base"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(base), "run", "--demo-stores", "3", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:

        def up() -> bool:
            try:
                with Client(str(base / "run" / "proxy.sock"), timeout=2) as c:
                    return c.get(f"{API}/admin/datastore/demo0003/status").status == 200
            except OSError:
                return False

        wait_for(up, timeout=30, what="dsproxy run to serve")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not (base / "run" / "proxy.pid").exists() and not (base / "run" / "manager.pid").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        from dsproxy.ipc import shm

        shm.unlink(base / "run")


def test_a_lease_for_the_life_of_a_streamed_request_body(daemons: Daemons) -> None:
    head = (
        f"POST {API}/admin/datastore/demo0001/operation?operation=write HTTP/1.1\r\n"
        "host: x\r\ntransfer-encoding: chunked\r\n\r\n"
    ).encode()

    def active() -> dict[str, int]:
        data: dict[str, int] = daemons.get(f"{API}/admin/datastore/demo0001/active-operations").data
        return data

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(daemons.proxy_sock)
        s.sendall(head + b"5\r\nhello\r\n")
        wait_for(lambda: active() == {"read": 0, "write": 1}, what="the lease while the body streams")
        s.sendall(b"0\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200") and b'"held":' in answer
    assert active() == {"read": 0, "write": 0}
    # a client that dies mid-stream loses its lease with its connection
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemons.proxy_sock)
        s.sendall(head)
        wait_for(lambda: active() == {"read": 0, "write": 1}, what="the second lease")
    wait_for(lambda: active() == {"read": 0, "write": 0}, what="the lease to end with the connection")
    # refused at once (no need to send the body) when the store does not allow it
    with Client(daemons.proxy_sock) as c:
        c.request("PUT", f"{API}/config/datastore/demo0001", {"maintenance-mode": "type=read-only"}).raise_for_status()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(daemons.proxy_sock)
        s.sendall(head)
        refused = s.recv(65536)
    assert refused.startswith(b"HTTP/1.1 409") and b"read-only maintenance mode" in refused


def test_the_proxy_refuses_to_start_on_a_live_or_foreign_socket_path(daemons: Daemons, tmp_path: Path) -> None:
    second = subprocess.run(
        daemons.command("proxy", "--workers", "1"), capture_output=True, text=True, timeout=60
    )  # same base dir: the live proxy owns proxy.sock
    assert second.returncode == 3 and "another server is listening there" in second.stderr
    other = tmp_path / "other"
    (other / "run").mkdir(parents=True)
    (other / "run" / "proxy.sock").write_text("not a socket")
    third = subprocess.run(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(other), "proxy", "--workers", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert third.returncode == 3 and "is not a socket" in third.stderr
    assert (other / "run" / "proxy.sock").read_text() == "not a socket"


NOBODY_CLIENT = r"""
import json, os, sys
from dsproxy.client import Client  # everything imported first: the checkout may be closed to nobody
import http.client, encodings.idna
os.setgid(65534); os.setgroups([]); os.setuid(65534)
sock, method, path, body, header = sys.argv[1:6]
headers = {"x-dsproxy-client": header} if header else {}
with Client(sock, headers=headers) as c:
    r = c.request(method, path, json.loads(body) if body else None)
print(json.dumps({"status": r.status, "body": r.json()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_only_authorised_peers_may_write_and_forwarded_ids_cannot_be_forged(daemons: Daemons) -> None:
    # let uid 65534 reach and connect to the sockets at all (0660 and pytest's 0700 dirs stop it first)
    restore = []
    for d in [daemons.run_dir, *daemons.run_dir.parents]:
        mode = d.stat().st_mode & 0o7777
        if not mode & 0o001:
            restore.append((d, mode))
            os.chmod(d, mode | 0o001)
    for sock in ("proxy.sock", "manager.sock"):
        os.chmod(daemons.run_dir / sock, 0o666)
    try:
        _check_write_authorisation(daemons)
    finally:
        for d, mode in restore:
            os.chmod(d, mode)


def _check_write_authorisation(daemons: Daemons) -> None:

    def as_nobody(sock: str, method: str, path: str, body: str = "", header: str = "") -> dict[str, Any]:
        r = subprocess.run(
            [sys.executable, "-c", NOBODY_CLIENT, str(daemons.run_dir / sock), method, path, body, header],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        answer: dict[str, Any] = json.loads(r.stdout)
        return answer

    assert as_nobody("proxy.sock", "GET", f"{API}/admin/datastore/demo0001/status")["status"] == 200
    write = as_nobody("proxy.sock", "PUT", f"{API}/config/datastore/demo0001", '{"comment": "x"}')
    assert write["status"] == 403
    assert write["body"]["message"] == "permission denied: uid 65534 may not change the datastore configuration"
    forged = as_nobody("proxy.sock", "PUT", f"{API}/config/datastore/demo0001", '{"comment": "x"}', "0,0,1")
    assert forged["status"] == 403  # the worker sends the real peer, not the client's header
    direct = as_nobody("manager.sock", "PUT", f"{API}/config/datastore/demo0001", '{"comment": "x"}', "0,0,1")
    assert direct["status"] == 403 and "may not forward requests" in direct["body"]["message"]
    assert "comment x" not in daemons.config_file.read_text().replace("\tcomment demo", "")


def test_a_min_revision_read_outside_fleet_mode_is_refused_not_held(daemons: Daemons) -> None:
    """``x-dsproxy-min-revision`` names an etcd revision: a single host has none to wait for."""
    with daemons.client() as c:
        answer = c.request("GET", f"{API}/admin/datastore", headers={"x-dsproxy-min-revision": "5"})
    assert answer.status == 400 and b"not in fleet mode" in answer.body
