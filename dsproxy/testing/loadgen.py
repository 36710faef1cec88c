"""The load generator of the benchmark and stress scripts: keep-alive HTTP over a Unix socket.

``run_rounds(socket, rounds, parallel, clients)`` sends each round's request paths once over
``parallel`` keep-alive connections that stay open across rounds (a round times requests, not
connection set-up) and returns per round: requests, wall time, req/s, p50/p99 latency, errors by
kind, and the generator's own CPU share (CPU seconds / wall seconds per process: near 100 % means
the generator, not the server, is the bottleneck -- use more ``clients`` processes).

asyncio + uvloop + :class:`dsproxy.client.AsyncConnection` (httptools' response parser): one
process drives ~40,000 req/s on the project machine at ~60 % of a core.
``python -m dsproxy.testing.loadgen SOCKET CONNECTIONS`` is the child of a multi-process run (rounds as
JSON on stdin, results as JSON on stdout).
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..client import AsyncConnection


async def _drive(socket_path: str, rounds: list[list[str]], parallel: int) -> list[dict[str, Any]]:
    """Send each round's paths once over the same ``parallel`` keep-alive connections.

    The connections are opened (and answered once with a ping, so that every worker has accepted
    its share) before the first round: a round times requests, not connection set-up.
    """
    conns = [await AsyncConnection.open(socket_path) for _ in range(parallel)]
    await asyncio.gather(*(c.request("GET", "/api2/json/ping") for c in conns))
    clock = time.perf_counter_ns
    results = []
    for paths in rounds:
        latencies: list[int] = []
        errors: dict[str, int] = {}
        it = iter(paths)

        async def worker(index: int, it: Iterator[str], latencies: list[int], errors: dict[str, int]) -> None:
            conn = conns[index]
            for path in it:
                t0 = clock()
                try:
                    if not conn.usable:
                        conn.close()
                        conn = conns[index] = await AsyncConnection.open(socket_path)
                    status = (await conn.request("GET", path)).status
                except OSError as err:
                    status = -1
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                latencies.append(clock() - t0)
                if status not in (200, -1):
                    errors[str(status)] = errors.get(str(status), 0) + 1

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, it, latencies, errors) for i in range(parallel)))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        results.append({"wall": wall, "latencies": latencies, "errors": errors, "cpu": cpu})
    for c in conns:
        c.close()
    return results


def _client_process(socket_path: str, parallel: int) -> None:
    import uvloop

    rounds = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(uvloop.run(_drive(socket_path, rounds, parallel))))


def run_rounds(socket_path: str, rounds: list[list[str]], parallel: int, clients: int) -> list[dict[str, Any]]:
    """All rounds; ``clients`` processes share each round's paths and the connections."""
    if clients == 1:
        import uvloop

        return [
            summarise([r], len(p))
            for r, p in zip(uvloop.run(_drive(socket_path, rounds, parallel)), rounds, strict=True)
        ]
    procs = []
    for i in range(clients):
        share = [paths[i::clients] for paths in rounds]
        conns = max(1, parallel // clients + (1 if i < parallel % clients else 0))
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsproxy.testing.loadgen", socket_path, str(conns)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(share))
        proc.stdin.close()
        procs.append(proc)
    per_client = [json.loads(p.communicate()[0]) for p in procs]
    return [summarise([c[k] for c in per_client], len(rounds[k])) for k in range(len(rounds))]


def summarise(results: list[dict[str, Any]], requests: int) -> dict[str, Any]:
    lat = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    wall = max(r["wall"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    return {
        "requests": requests,
        "wall": wall,
        "rps": requests / wall if wall else 0.0,
        "p50_ms": lat[len(lat) // 2] / 1e6 if lat else 0.0,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6 if lat else 0.0,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "client_cpu_share": cpu / wall / len(results) if wall else 0.0,
    }


if __name__ == "__main__":
    _client_process(sys.argv[1], int(sys.argv[2]))
