"""The load generator of the benchmark and stress scripts: keep-alive HTTP over a Unix socket or HTTPS.

``run_rounds(socket, rounds, parallel, clients, min_seconds)`` sends each round's request paths
over ``parallel`` keep-alive connections that stay open across rounds (a round times requests, not
connection set-up) -- the whole list once, and again as long as the round has lasted less than
``min_seconds`` (a round of 1,000 cached answers lasts ~0.02 s: too short to time on a shared
machine) -- and returns per round: requests, passes over the list, wall time, req/s, p50/p99
latency, errors by kind, the time of the first pass, and the generator's own CPU share (CPU seconds
/ wall seconds per process: near 100 % means the generator, not the server, is the bottleneck --
use more ``clients`` processes).

asyncio + uvloop + :class:`dsproxy.client.AsyncConnection` (httptools' response parser): one
process drives ~40,000 req/s on the project machine at ~60 % of a core.
``python -m dsproxy.testing.loadgen TARGET CONNECTIONS MIN_SECONDS`` is the child of a multi-process run (rounds as
JSON on stdin, results as JSON on stdout).

The target (:class:`Target`) is a socket path, or ``https://HOST:PORT`` (the proxy's ``--listen``)
with the CA file that verifies it and headers for every request but ``ping`` (``Authorization:
PBSAPIToken=...``: the HTTPS floor is the unauthenticated ping).  A child gets the CA file and the
headers on stdin, never on its command line (``ps`` shows that to every user).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..client import AsyncConnection

TURNS = 10  # a group's rounds take turns this many times (see _drive)
PING = "/api2/json/ping"


@dataclass(frozen=True)
class Target:
    """Where the requests go: ``address`` is a Unix socket path or ``https://HOST:PORT``; over
    HTTPS the server is verified with ``cafile`` and ``headers`` go with every request but ping."""

    address: str
    cafile: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, target: str | Target) -> Target:
        return target if isinstance(target, Target) else cls(target)

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")

    async def open(self) -> AsyncConnection:
        if not self.tls:
            return await AsyncConnection.open(self.address)
        url = urlsplit(self.address)
        assert url.hostname is not None and url.port is not None, self.address
        return await AsyncConnection.open_tls(url.hostname, url.port, _client_context(self.cafile))

    def headers_for(self, path: str) -> dict[str, str] | None:
        return dict(self.headers) if self.headers and path != PING else None

    def secrets(self) -> dict[str, Any]:
        """What a child process gets on stdin (not on its command line)."""
        return {"cafile": self.cafile, "headers": [list(h) for h in self.headers]}


@functools.lru_cache(maxsize=4)
def _client_context(cafile: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


class _Round:
    """One round: its paths, over and over until a pass ends ``min_seconds`` after the start, and
    what the connections measured (latencies in ns, errors by kind, when the first pass was done)."""

    def __init__(self, paths: list[str], min_seconds: float) -> None:
        self.paths, self.min_seconds = paths, min_seconds
        self.start = time.perf_counter()
        self.passes = 0
        self.latencies: list[int] = []
        self.errors: dict[str, int] = {}
        self.first_pass_wall: float | None = None  # when as many answers as one pass has had came

    def __iter__(self) -> Iterator[str]:
        while True:
            yield from self.paths
            self.passes += 1
            if not self.paths or time.perf_counter() - self.start >= self.min_seconds:
                return

    def record(self, latency_ns: int, status: int | str) -> None:
        self.latencies.append(latency_ns)
        if len(self.latencies) == len(self.paths):
            self.first_pass_wall = time.perf_counter() - self.start
        if status not in (200, -1):
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1


async def _drive(
    target: Target, groups: list[list[list[str]]], parallel: int, min_seconds: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Measure each group of rounds over the same ``parallel`` keep-alive connections.

    A group of one round sends its paths at least once and for ``min_seconds``.  A group of
    several is measured in turns of ``min_seconds / TURNS`` (whole passes, at least one) of each
    round in turn, until each has had ``min_seconds``: the rounds of a group see the same machine,
    so their ratio holds even when its speed drifts (other load on a shared host).  The connections
    are opened (and answered once with a ping, so that every worker has accepted its share) before
    the first round: a round times requests, not connection set-up.
    """
    conns = [await target.open() for _ in range(parallel)]
    await asyncio.gather(*(c.request("GET", PING) for c in conns))
    clock = time.perf_counter_ns

    async def connection(index: int, it: Iterator[str], measured: _Round) -> None:
        conn = conns[index]
        for path in it:
            t0 = clock()
            status: int | str
            try:
                if not conn.usable:
                    conn.close()
                    conn = conns[index] = await target.open()
                status = (await conn.request("GET", path, headers=target.headers_for(path))).status
            except OSError as err:
                status = type(err).__name__
            measured.record(clock() - t0, status)

    async def measure(paths: list[str], min_seconds: float) -> dict[str, Any]:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        measured = _Round(paths, min_seconds)
        it = iter(measured)
        await asyncio.gather(*(connection(i, it, measured) for i in range(parallel)))
        wall = time.perf_counter() - measured.start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return {
            "wall": wall,
            "latencies": measured.latencies,
            "errors": measured.errors,
            "cpu": cpu,
            "passes": measured.passes,
            "first_pass_wall": measured.first_pass_wall or wall,
        }

    results = []
    for group in groups:
        if len(group) == 1:
            results.append([await measure(group[0], min_seconds)])
            continue
        turn = min_seconds / TURNS
        totals = [await measure(paths, turn) for paths in group]
        while min(t["wall"] for t in totals) < min_seconds:
            for total, paths in zip(totals, group, strict=True):
                if total["wall"] < min_seconds:  # a slow round is not held up by a fast one
                    _add(total, await measure(paths, turn))
        results.append(totals)
    for c in conns:
        c.close()
    return results


def _add(total: dict[str, Any], one: dict[str, Any]) -> None:
    """Add the figures of one more pass to a round measured pass by pass."""
    for key in ("wall", "cpu", "passes"):
        total[key] += one[key]
    total["latencies"] += one["latencies"]
    for kind, n in one["errors"].items():
        total["errors"][kind] = total["errors"].get(kind, 0) + n


def _client_process(address: str, parallel: int, min_seconds: float) -> None:
    import uvloop

    given = json.loads(sys.stdin.read())
    target = Target(address, given["cafile"], tuple((k, v) for k, v in given["headers"]))
    _write_all(1, json.dumps(uvloop.run(_drive(target, given["groups"], parallel, min_seconds))).encode())


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, short writes included: ``sys.stdout.write`` is not enough.

    Under ``PYTHONUNBUFFERED=1`` (set on the project machine) ``sys.stdout`` is a TextIOWrapper
    over the raw FileIO, which writes once and drops what a short ``write(2)`` left over; this
    machine's kernel ends a blocking write into a full pipe ~20 ms later with 65,536 written (no
    signal; seen with strace), so a child whose parent was still reading another child's results
    cut its JSON at exactly 64 KiB (``JSONDecodeError`` at column 65537, ``--clients 2`` and
    more, now and then) and exited 0.  ``os.write`` again blocks until the parent reads."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_rounds(
    target: str | Target, rounds: list[list[str]], parallel: int, clients: int, min_seconds: float = 0.0
) -> list[dict[str, Any]]:
    """All rounds, each lasting ``min_seconds`` or one pass over its paths, whichever is longer;
    ``clients`` processes share each round's paths and the connections."""
    return [group[0] for group in run_groups(target, [[r] for r in rounds], parallel, clients, min_seconds)]


def run_groups(
    target: str | Target, groups: list[list[list[str]]], parallel: int, clients: int, min_seconds: float = 0.0
) -> list[list[dict[str, Any]]]:
    """Like :func:`run_rounds`, the rounds of each group measured together, pass by pass in turn
    (see :func:`_drive`): ``[[warm, ping], [warm, ping]]`` gives two warm and two ping rounds,
    each pair measured at the same time.  ``target``: a socket path or a :class:`Target`."""
    target = Target.of(target)
    if clients == 1:
        import uvloop

        per_client = [uvloop.run(_drive(target, groups, parallel, min_seconds))]
    else:
        procs = []
        for i in range(clients):
            share = [[paths[i::clients] for paths in group] for group in groups]
            conns = max(1, parallel // clients + (1 if i < parallel % clients else 0))
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsproxy.testing.loadgen", target.address, str(conns), str(min_seconds)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"groups": share, **target.secrets()}))
            proc.stdin.close()
            procs.append(proc)
        per_client = [_collect(p) for p in procs]
    return [[summarise([c[g][k] for c in per_client]) for k in range(len(group))] for g, group in enumerate(groups)]


def _collect(proc: subprocess.Popen[str]) -> list[list[dict[str, Any]]]:
    """A client process's results (its stdin is closed already: no ``communicate``)."""
    assert proc.stdout is not None
    with proc.stdout:
        results: list[list[dict[str, Any]]] = json.loads(proc.stdout.read())
    if proc.wait() != 0:
        raise RuntimeError(f"load generator process {proc.pid} exited with {proc.returncode}")
    return results


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's figures from each client process's share of it."""
    lat = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    wall = max(r["wall"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    requests = len(lat)  # every request sent has its latency, answered or not
    return {
        "requests": requests,
        "passes": min(r["passes"] for r in results),
        "first_pass_wall": max(r["first_pass_wall"] for r in results),
        "wall": wall,
        "rps": requests / wall if wall else 0.0,
        "p50_ms": lat[len(lat) // 2] / 1e6 if lat else 0.0,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6 if lat else 0.0,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "client_cpu_share": cpu / wall / len(results) if wall else 0.0,
    }


if __name__ == "__main__":
    _client_process(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
