"""A real etcd cluster on loopback, for the fleet tests, benchmarks and the stress run.

:class:`EtcdCluster` starts ``size`` plain ``etcd`` processes (``/usr/bin/etcd``, Debian's
``etcd-server``; ``$DSPROXY_ETCD_BINARY`` names another binary) on 127.0.0.1 with free ports, private data
dirs under ``base_dir`` and a unique cluster token, each in its own process group with its zap log in
``<base_dir>/<name>.log``; :meth:`start` returns once every member answers ``/health`` and a leader
is elected.  Members are killed, frozen and restarted by index (:meth:`kill`, :meth:`restart`, the
context manager :meth:`frozen`); :meth:`heal` brings every member back (the module-scoped fixture
calls it between tests); :meth:`stop` -- or leaving the ``with`` block, also when the block raised
-- kills every process group (SIGKILL works on a SIGSTOPped member too) and removes the data dirs;
the logs stay in ``base_dir`` (the caller's temp dir) for a failed test's report.

    with EtcdCluster(3, tmp / "etcd").start() as cluster:
        cluster.endpoints            # ['127.0.0.1:40111', '127.0.0.1:40113', '127.0.0.1:40115']
        cluster.kill(cluster.leader())
        cluster.restart(i)

``tls=True`` makes a cluster that serves its clients over TLS only and accepts only clients with a
certificate of its CA (``--client-cert-auth``; the peers stay plain on loopback): the certificates
are made by :mod:`dsproxy.testing.pki` under ``base_dir/pki`` (:attr:`EtcdCluster.pki`), the
endpoints are ``https://127.0.0.1:PORT``, and :attr:`EtcdCluster.tls_args` are the dsproxy flags
a client needs (``--etcd-cacert``, ``--etcd-cert``, ``--etcd-key``).

The harness speaks only etcd's HTTP side (``/health``, the JSON gateway's ``/v3/maintenance/status``)
with the standard library, so that :mod:`dsproxy.fleet.etcd` stays the one module that imports
gRPC.  A restarted member gets the same command line: etcd ignores the ``--initial-*`` flags when its
data dir exists.  Startup measured here: 3 members healthy with a leader in 0.6-1.0 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import pki
from .daemons import free_port

ETCD = os.environ.get("DSPROXY_ETCD_BINARY", "/usr/bin/etcd")


class EtcdHarnessError(RuntimeError):
    """A member did not start or become healthy in time; the message carries the tail of its log."""


@dataclass
class Member:
    """One etcd process: its name, ports, data dir and log, and the running process (None: not started)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}" if self.tls else f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise EtcdHarnessError(f"member {self.name} is not running")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """Until every thread of ``pid`` is stopped (``T`` in ``/proc/PID/task/*/stat``): ``kill``
    returns before a busy thread has taken the SIGSTOP, and a request sent in between was
    answered (a "frozen" member that answered once, in CI 2026-12-04)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            states = []
            for task in tasks:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # (gone: nothing answers either)
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)


class EtcdCluster:
    """``size`` etcd members on loopback under ``base_dir`` (see the module); a context manager."""

    def __init__(
        self,
        size: int = 3,
        base_dir: Path | str = ".",
        *,
        ready_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
        tls: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.ready_timeout = ready_timeout
        self.extra_args = extra_args
        self.tls = tls
        self.pki: pki.PKI | None = pki.make(self.base_dir / "pki") if tls else None
        self._context: ssl.SSLContext | None = None
        if self.pki is not None:
            self._context = ssl.create_default_context(cafile=str(self.pki.ca))
            self._context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        self.token = f"dsproxy-test-{uuid.uuid4().hex[:12]}"
        self.members = [self._member(i) for i in range(size)]
        self._stopped_signals: set[int] = set()  # indexes of SIGSTOPped members

    def _member(self, i: int) -> Member:
        name = f"m{i}"
        data, log = self.base_dir / f"{name}.etcd", self.base_dir / f"{name}.log"
        return Member(name, free_port(), free_port(), data, log, tls=self.tls)

    @property
    def tls_args(self) -> tuple[str, ...]:
        """The dsproxy flags of a client this cluster accepts (none without TLS)."""
        if self.pki is None:
            return ()
        return ("--etcd-cacert", str(self.pki.ca), "--etcd-cert", str(self.pki.client_cert),
                "--etcd-key", str(self.pki.client_key))  # fmt: skip

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint, ``host:port``, in member order."""
        return [m.endpoint for m in self.members]

    def command(self, member: Member) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", str(member.log),
            *self._tls_flags(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_flags(self) -> tuple[str, ...]:
        if self.pki is None:
            return ()
        p = self.pki
        return ("--cert-file", str(p.server_cert), "--key-file", str(p.server_key),
                "--trusted-ca-file", str(p.ca), "--client-cert-auth")  # fmt: skip

    # -- starting -------------------------------------------------------------------------------------

    def start(self) -> EtcdCluster:
        """Start every member and wait until all are healthy with a leader; on failure stop everything."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(len(self.members)):
                self._spawn(i)
            for i in range(len(self.members)):
                self.wait_healthy(i)
            self.wait_leader()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> None:
        member = self.members[i]
        with open(self.base_dir / f"{member.name}.out", "ab") as out:  # the child keeps its own copy
            member.proc = subprocess.Popen(
                self.command(member), stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._stopped_signals.discard(i)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` again (after :meth:`kill`), on its old data dir; wait until it is healthy."""
        member = self.members[i]
        if member.running():
            raise EtcdHarnessError(f"member {member.name} is still running (pid {member.pid})")
        self._spawn(i)
        if wait:
            self.wait_healthy(i)

    def wait_healthy(self, i: int, timeout: float | None = None) -> None:
        """Until member ``i`` answers ``/health`` with ``"health": "true"`` (needs a quorum with a leader)."""
        member = self.members[i]
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        last = "no answer"
        while True:
            if member.proc is not None and member.proc.poll() is not None:
                raise EtcdHarnessError(
                    f"etcd member {member.name} exited with {member.proc.returncode}:\n{member.log_tail()}"
                )
            try:
                status, body = self._http(member, "GET", "/health")
                if status == 200 and json.loads(body).get("health") == "true":
                    return
                last = f"HTTP {status} {body[:200]!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise EtcdHarnessError(f"etcd member {member.name} not healthy ({last}):\n{member.log_tail()}")
            time.sleep(0.05)

    def wait_leader(self, timeout: float | None = None) -> int:
        """Until the running members agree on a leader; its index."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            with contextlib.suppress(EtcdHarnessError):
                return self.leader()
            if time.monotonic() > deadline:
                raise EtcdHarnessError(f"no etcd leader after {timeout or self.ready_timeout:g} s")
            time.sleep(0.05)

    # -- asking the members ---------------------------------------------------------------------------

    def _http(self, member: Member, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = (
            http.client.HTTPSConnection("127.0.0.1", member.client_port, timeout=1.0, context=self._context)
            if self._context is not None
            else http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=1.0)
        )
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def member_status(self, i: int) -> dict[str, int]:
        """``{"member_id", "leader", "raft_term", "revision"}`` of member ``i`` (the JSON gateway's status)."""
        status, body = self._http(self.members[i], "POST", "/v3/maintenance/status", b"{}")
        if status != 200:
            raise EtcdHarnessError(f"status of {self.members[i].name}: HTTP {status} {body[:200]!r}")
        data = json.loads(body)
        header = data.get("header", {})
        return {  # the gateway writes 64-bit integers as strings
            "member_id": int(header.get("member_id", 0)),
            "leader": int(data.get("leader", 0)),
            "raft_term": int(data.get("raftTerm", 0)),
            "revision": int(header.get("revision", 0)),
        }

    def leader(self) -> int:
        """Index of the member the running, unfrozen members agree is the leader (EtcdHarnessError if none)."""
        ids: dict[int, int] = {}
        leaders: set[int] = set()
        for i, member in enumerate(self.members):
            if not member.running() or i in self._stopped_signals:
                continue
            try:
                st = self.member_status(i)
            except (OSError, ValueError, EtcdHarnessError):
                continue
            ids[st["member_id"]] = i
            leaders.add(st["leader"])
        if len(leaders) == 1:
            (leader_id,) = leaders
            if leader_id in ids:
                return ids[leader_id]
        raise EtcdHarnessError(f"no agreed leader among the running members (they name {sorted(leaders)})")

    def follower(self) -> int:
        """Index of a running member that is not the leader."""
        lead = self.leader()
        for i, member in enumerate(self.members):
            if i != lead and member.running() and i not in self._stopped_signals:
                return i
        raise EtcdHarnessError("no running follower")

    # -- faults ---------------------------------------------------------------------------------------

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to member ``i``; SIGKILL/SIGTERM also wait until it has exited."""
        member = self.members[i]
        if member.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self._stopped_signals.add(i)
            _wait_stopped(member.proc.pid)
        elif sig == signal.SIGCONT:
            self._stopped_signals.discard(i)
        elif sig in (signal.SIGKILL, signal.SIGTERM):
            if i in self._stopped_signals:  # a frozen process handles SIGTERM only once continued
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.proc.pid, signal.SIGCONT)
                self._stopped_signals.discard(i)
            member.proc.wait(timeout=10)

    @contextlib.contextmanager
    def frozen(self, *indexes: int) -> Iterator[None]:
        """Members ``indexes`` SIGSTOPped while the block runs, continued after it, even on failure."""
        try:
            for i in indexes:
                self.kill(i, signal.SIGSTOP)
            yield
        finally:
            for i in indexes:
                self.kill(i, signal.SIGCONT)

    def heal(self) -> None:
        """Continue frozen members, restart dead ones, wait until all are healthy with a leader."""
        for i in list(self._stopped_signals):
            self.kill(i, signal.SIGCONT)
        for i, member in enumerate(self.members):
            if not member.running():
                self.restart(i, wait=False)
        for i in range(len(self.members)):
            self.wait_healthy(i)
        self.wait_leader()

    # -- stopping -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGKILL every member's process group, reap them, remove the data dirs (the logs stay)."""
        for member in self.members:
            if member.proc is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(member.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.proc.wait(timeout=10)
        self._stopped_signals.clear()
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)

    def logs(self, chars: int = 2000) -> str:
        """The tail of every member's log, for a failed test's message."""
        return "\n".join(f"--- {m.name}\n{m.log_tail(chars)}" for m in self.members)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- measuring ------------------------------------------------------------------------------------------


async def _measure(cluster: EtcdCluster, keys: int) -> dict[str, str]:
    """The figures quoted in :mod:`dsproxy.fleet.etcd`'s docstring, on ``cluster``."""
    import asyncio
    import statistics

    from ..fleet.etcd import Etcd

    def ms(values: list[float]) -> str:
        values = sorted(values)
        return f"p50 {statistics.median(values) * 1e3:.2f} ms, p99 {values[int(len(values) * 0.99)] * 1e3:.2f} ms"

    out: dict[str, str] = {}
    async with Etcd(cluster.endpoints) as etcd:
        key, revision, times = b"/measure/cas", 0, []
        for i in range(500):
            started = time.perf_counter()
            txn = await etcd.put_if(key, b"%d" % i, revision)
            times.append(time.perf_counter() - started)
            revision = txn.revision
        out["put_if, 500 sequential"] = ms(times)

        seen = asyncio.Event()

        async def watch(start: int) -> None:
            async for _ in etcd.watch_prefix(b"/measure/w/", start):
                seen.set()

        task = asyncio.create_task(watch(await etcd.revision() + 1))
        times = []
        for i in range(200):
            seen.clear()
            started = time.perf_counter()
            await etcd.put(b"/measure/w/k", b"%d" % i)
            await seen.wait()
            times.append(time.perf_counter() - started)
        task.cancel()
        out["put -> watch batch, same client, 200"] = ms(times)

        for parallel in (1, 4):
            prefix = b"/measure/big%d/" % parallel
            items = [(prefix + b"store%06d" % i, b"x" * 200) for i in range(keys)]
            started = time.perf_counter()
            await etcd.txn_batch(items, parallel=parallel)
            out[f"txn_batch {keys} x 200 B, parallel={parallel}"] = f"{time.perf_counter() - started:.2f} s"
        started = time.perf_counter()
        _, kvs = await etcd.get_prefix(b"/measure/big1/")
        out[f"get_prefix {len(kvs)} keys, one Range"] = f"{time.perf_counter() - started:.2f} s"
        async with Etcd(cluster.endpoints, max_message=4 << 20) as small:
            started = time.perf_counter()
            _, kvs = await small.get_prefix(b"/measure/big1/")
            out[f"get_prefix {len(kvs)} keys, paged (4 MiB limit)"] = f"{time.perf_counter() - started:.2f} s"

    victim = cluster.follower()
    async with Etcd([cluster.endpoints[victim], *(e for i, e in enumerate(cluster.endpoints) if i != victim)]) as etcd:
        await etcd.put(b"/measure/f", b"0")
        cluster.kill(victim)
        started = time.perf_counter()
        await etcd.put(b"/measure/f", b"1")
        out["put after SIGKILL of the member in use"] = f"{(time.perf_counter() - started) * 1e3:.1f} ms"
    cluster.heal()
    async with Etcd(cluster.endpoints) as etcd:
        await etcd.put(b"/measure/l", b"0")
        cluster.kill(cluster.leader())
        started = time.perf_counter()
        await etcd.put(b"/measure/l", b"1")
        out["put right after SIGKILL of the leader"] = f"{time.perf_counter() - started:.2f} s"
    return out


def main() -> None:
    """``python -m dsproxy.testing.etcd --measure [--keys N]``: start a 3-member cluster in a temp dir,
    print the client's figures (put_if latency, watch delivery, 100k load and read, failover)."""
    import argparse
    import asyncio
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m dsproxy.testing.etcd")
    parser.add_argument("--measure", action="store_true", required=True)
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsproxy-etcd-") as tmp, EtcdCluster(3, tmp) as cluster:
        cluster.start()
        for name, figure in asyncio.run(_measure(cluster, args.keys)).items():
            print(f"{name}: {figure}")


if __name__ == "__main__":
    main()
