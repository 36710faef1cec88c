"""What ``scripts/bench-scale`` measures: the costs that grow with the store count (issue 9).

One *row* is one store count; :func:`run_row` measures it and returns a plain dict (the script
prints, saves and plots it).  Per row, on one base dir:

* **lay-out**: the stores ``store00000``... are laid out once for the largest row and reused by the
  smaller ones (their config names the first N); ``--layout-dir`` keeps them across runs.  The
  lay-out is :func:`lay_out` -- ``mkdir``, ``.chunks``, ``.lock`` relative to one directory fd,
  skipping stores already there -- not :func:`dsproxy.fsutil.make_store` (a no-follow walk from
  ``/`` per store): measured here on a quiet machine, 5,000 stores took 0.32 s against 0.50 s; in
  a bench run on the loaded machine 10,000 took 2.7 s, so ~30 s (and 300,000 inodes) for 100,000.
  Lookups need nothing more.
* **config**: ``datastore.cfg`` of N sections like bench-lookup's (comment, schedules, some keep-*
  and notify options), each with its ``path``, written by hand (canonical form).
* **warm lookup+release in process** (ns): bench-lookup's own in-process program (the script passes
  its text) in a fresh interpreter, before any daemon starts.  Measured for every row in one phase
  by :func:`warm_lookups`, the rows in turn for ``LOOKUP_ROUNDS`` rounds (a fresh process each),
  not minutes apart with each row: this VM's speed drifts by up to 2x between minutes (the same
  code gave 100,000 / 1,000 ratios from 0.52 to 2.05 when each row was measured in its own
  minute).  The program also times a fixed pure-Python loop beside the lookup (``reference_ns``,
  the machine's speed in that second); the target compares lookup / reference, the median over
  rounds -- in the run that showed 2.05 raw, the normalised ratio of each round was 0.94-0.99.
* **write floor** (ms): :func:`dsproxy.config.replace_file` -- temp file, write, fsync, rename,
  directory fsync, the manager's own write path -- of a file as large as ``datastore.cfg``, in
  the same directory; p50 of ``--floor-repeats`` before the daemons start, and again *beside the
  writes* (one floor write after each measured write, once every worker served it: the same
  disk and journal state as the writes it is compared with -- on this shared VM the disk's speed
  changes between minutes, and a floor taken before the daemons started gave write/floor ratios
  from 1.3 to 3.4 for the same code).  The issue 9 target compares with the floor beside.
* then per invalidation mode (``delta``: the server as built; ``full``: ``DSPROXY_INVALIDATION=full``
  in both daemons' environment: the registry then never applies the ring's per-store changes and
  reloads the whole file on every bump, as before the ring) a manager + proxy:

  - **ready** (s): ``start_proxy`` until every worker has booted (a first boot's workers report ready
    before their prewarm, which follows in the background: tables before 2026-12-01 23:00 UTC
    included it);
  - **write acknowledged by every worker** (ms, p50/p99 of ``--writes``): a comment update through
    the API (``PUT`` on proxy.sock, forwarded to the manager), until a status request on a
    keep-alive connection *to each worker* is answered with the write's generation or a newer one
    (``x-dsproxy-generation``).  A request makes its worker catch up at once; an idle worker would
    catch up on its next tick (``TICK`` = 0.1 s) and acknowledge in its slot then -- the figure is
    what a client sending the next request sees, not the tick's cadence;
  - **longest stall** (ms): measured from outside, since the workers do not publish an apply time:
    one more connection per worker sends a ping every 1 ms; for each of ``--stall-writes`` writes
    the longest ping round trip sent in a window of ``STALL_WINDOW`` from the write on (a ping sent
    while the worker applies the change waits for it; the window covers the next tick and its
    prewarm too).  Reported: the median over writes of that per-write longest trip, its maximum,
    and the same over as many windows without a write (the machine's own noise);
  - **status p99** (ms): ``GET .../status?verbose=0`` over ``STATUS_CONNECTIONS`` connections on up
    to ``STATUS_SAMPLE`` stores (each requested once before, so that its fd is open), idle and
    while a thread makes ``--write-rate`` writes/s, in windows of ``STATUS_WINDOW`` (1 s) that
    alternate until each side has had ``--status-seconds``: the median of the windows' p99 on
    each side, and the target's ratio the median of each pair's busy / idle.  Idle first, then
    busy, 3 s each, gave ratios from 1.3 to 4.9 for the same code in consecutive rounds (idle
    p99 alone moved 0.22-0.50 ms between minutes);
  - **worker RSS** (MB, the largest) and **open fds per worker** (the largest ``/proc/PID/fd``).

A failure (a daemon that does not become ready, a write that is refused, a timeout) ends that mode
of that row with an ``error`` entry; the figures measured before it stay, and the next mode and row
run.  With this machine's hard ``RLIMIT_NOFILE`` of 20,000 a 100,000-store proxy fails until the fd
budget lands (each worker keeps one ``.lock`` fd per store).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..client import ApiError, AsyncConnection, Client
from ..config import Value, dump, replace_file
from ..daemon.protocol import WORKER_HEADER
from ..daemon.run import DaemonFailed
from ..fsutil import STORE_DIR_MODE, make_store
from ..ipc import shm
from ..paths import Paths
from .daemons import Daemons
from .loadgen import run_rounds

API = "/api2/json"
PING = f"{API}/ping"
MODES = ("delta", "full")
INVALIDATION_ENV = "DSPROXY_INVALIDATION"  # the variable the per-store ring reads (``full`` forces reloads)
PING_INTERVAL = 0.001
STALL_WINDOW = 0.3  # s after a write whose pings count for its stall: > one worker tick (0.1 s)
STATUS_CONNECTIONS = 4
STATUS_SAMPLE = 2000
STATUS_WINDOW = 1.0  # s: idle and busy status windows alternate (this VM's speed drifts between minutes)
SERVED_TIMEOUT = 30.0  # s until every worker must serve a write's generation
LOOKUP_ROUNDS = 3  # rounds of the interleaved in-process lookup phase (each row once per round)

Progress = Callable[[str], None]


class MeasureError(RuntimeError):
    """A measurement that could not be made (the message says why); ends that mode of the row."""


def store_name(i: int) -> str:
    return f"store{i:05d}"  # bench-lookup's names: its in-process program looks up store{N // 2}


# -- the instance on disk ---------------------------------------------------------------------------


def lay_out(data_dir: Path, count: int) -> dict[str, Any]:
    """Stores ``store00000``... up to ``count`` under ``data_dir`` (see the module); what it took."""
    data_dir.mkdir(parents=True, exist_ok=True)
    made = 0
    start = time.perf_counter()
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i in range(count):
            name = store_name(i)
            try:
                os.mkdir(name, STORE_DIR_MODE, dir_fd=fd)
            except FileExistsError:
                try:
                    os.stat(f"{name}/.lock", dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:  # an interrupted earlier lay-out
                    make_store(str(data_dir / name))
                continue
            os.mkdir(f"{name}/.chunks", STORE_DIR_MODE, dir_fd=fd)
            os.close(os.open(f"{name}/.lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=fd))
            made += 1
    finally:
        os.close(fd)
    return {"stores": count, "made": made, "seconds": time.perf_counter() - start}


def sections(data_dir: Path, count: int) -> dict[str, dict[str, Value]]:
    """The sections of ``datastore.cfg`` for the first ``count`` stores of ``data_dir`` (like
    bench-lookup's: comment, schedules, some keep-* and notify options)."""
    out: dict[str, dict[str, Value]] = {}
    for i in range(count):
        props: dict[str, Value] = {"path": str(data_dir / store_name(i)), "comment": f"store number {i}"}
        props["gc-schedule"] = "daily"
        if i % 2 == 0:
            props |= {"keep-daily": 7, "keep-weekly": 4, "prune-schedule": "weekly"}
        if i % 5 == 0:
            props |= {"notify-user": "backup@pbs", "verify-new": True}
        out[store_name(i)] = props
    return out


def write_config(paths: Paths, data_dir: Path, count: int) -> int:
    """``datastore.cfg`` naming the first ``count`` stores of ``data_dir``; its size in bytes."""
    paths.ensure()
    text = dump(sections(data_dir, count)).encode()
    replace_file(paths.config_file, text)
    return len(text)


class FloorWriter:
    """The manager's write path for a file of ``size`` bytes in ``config_dir``, timed per write."""

    def __init__(self, config_dir: Path, size: int) -> None:
        self.data = (b"x" * 79 + b"\n") * (size // 80) + b"x" * (size % 80)
        self.target = config_dir / ".bench-scale-floor"
        self.times: list[float] = []

    def write(self) -> None:
        t0 = time.perf_counter()
        try:
            replace_file(self.target, self.data)
        finally:
            self.target.unlink(missing_ok=True)
        self.times.append(time.perf_counter() - t0)

    def figures(self) -> dict[str, float]:
        return {"p50_ms": _pct(self.times, 0.5) * 1e3, "p99_ms": _pct(self.times, 0.99) * 1e3}


def write_floor(config_dir: Path, size: int, repeats: int) -> dict[str, float]:
    """The manager's write path for a file of ``size`` bytes in ``config_dir`` (ms, p50/p99)."""
    floor = FloorWriter(config_dir, size)
    for _ in range(repeats):
        floor.write()
    return floor.figures()


def warm_lookup(base: Path, stores: int, repeats: int, program: str) -> dict[str, Any]:
    """bench-lookup's in-process ``program`` on ``base`` in a fresh interpreter (its JSON)."""
    argv = [sys.executable, "-I", "-c", program, str(base), str(stores), str(repeats)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    finally:
        shm.unlink(base / "run")
    if out.returncode != 0:
        raise MeasureError(f"the in-process lookup failed: {_last_line(out.stderr)}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def warm_lookups(
    base: Path, data_dir: Path, counts: list[int], repeats: int, program: str, progress: Progress
) -> dict[int, dict[str, Any]]:
    """The in-process lookup of every store count, the counts in turn for ``LOOKUP_ROUNDS``
    rounds (see the module), each on its own base dir under ``base``.  Per count: the median of
    the rounds' medians (``median_ns``), of their references (``reference_ns``), of the
    per-round ratio of the two (``normalised``), and every round's figures."""
    bases = {}
    for count in counts:
        bases[count] = base / f"lookup-{count}"
        write_config(Paths.resolve(bases[count]), data_dir, count)
    rounds: dict[int, list[dict[str, Any]]] = {count: [] for count in counts}
    try:
        for k in range(LOOKUP_ROUNDS):
            for count in counts:
                progress(f"warm lookup in process, round {k + 1}/{LOOKUP_ROUNDS}: {count:,} stores")
                rounds[count].append(warm_lookup(bases[count], count, repeats, program))
    finally:
        for count in counts:
            shutil.rmtree(bases[count], ignore_errors=True)
    return {
        count: {
            "median_ns": statistics.median(r["median_ns"] for r in runs),
            "reference_ns": statistics.median(r["reference_ns"] for r in runs),
            "normalised": statistics.median(r["median_ns"] / r["reference_ns"] for r in runs),
            "rounds": runs,
        }
        for count, runs in rounds.items()
    }


# -- measuring a running proxy ----------------------------------------------------------------------


async def _per_worker(sock: str, workers: int, per_worker: int) -> tuple[list[list[AsyncConnection]], list[Any]]:
    """``per_worker`` keep-alive connections to each worker (told apart by ``x-dsproxy-worker``),
    and the spare ones opened on the way (keep them open: the accept balancing counts them)."""
    by_pid: dict[str, list[AsyncConnection]] = {}
    spare: list[AsyncConnection] = []
    for _ in range(workers * per_worker * 16):
        conn = await AsyncConnection.open(sock)
        pid = (await conn.request("GET", PING)).headers.get(WORKER_HEADER, "?")
        group = by_pid.setdefault(pid, [])
        if len(group) < per_worker:
            group.append(conn)
        else:  # a worker busy for a moment (a full reload, a collection) leaves every accept to the
            spare.append(conn)  # other: give it the time to come back (seen once at 100,000 stores)
            await asyncio.sleep(0.02)
        if len(by_pid) == workers and all(len(g) == per_worker for g in by_pid.values()):
            return list(by_pid.values()), spare
    for conn in [c for g in by_pid.values() for c in g] + spare:
        conn.close()
    raise MeasureError(f"could not reach each of {workers} workers on its own connection (reached {len(by_pid)})")


async def _write(conn: AsyncConnection, store: str, n: int) -> int:
    body = json.dumps({"comment": f"bench-scale write {n}"}).encode()
    resp = await conn.request("PUT", f"{API}/config/datastore/{store}", body)
    if resp.status != 200:
        raise MeasureError(f"the write to {store} was answered {resp.status}: {resp.body[:200]!r}")
    return int(resp.json()["data"]["generation"])


async def _until_served(conn: AsyncConnection, store: str, generation: int) -> None:
    deadline = time.monotonic() + SERVED_TIMEOUT
    while True:
        resp = await conn.request("GET", f"{API}/admin/datastore/{store}/status?verbose=0")
        if resp.generation is not None and resp.generation >= generation:
            return
        if time.monotonic() > deadline:
            raise MeasureError(f"a worker still served generation {resp.generation} {SERVED_TIMEOUT:g} s after a write")
        await asyncio.sleep(0.001)


async def _write_until_served(writer: AsyncConnection, pollers: list[AsyncConnection], store: str, n: int) -> float:
    t0 = time.perf_counter()
    generation = await _write(writer, store, n)
    await asyncio.gather(*(_until_served(c, store, generation) for c in pollers))
    return time.perf_counter() - t0


class _Pinger:
    """Pings on one connection every ``PING_INTERVAL``; keeps (send time, round trip) of each."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.trips: list[tuple[float, float]] = []
        self.stopped = False

    async def run(self) -> None:
        clock = time.perf_counter
        while not self.stopped:
            t0 = clock()
            await self.conn.request("GET", PING)
            self.trips.append((t0, clock() - t0))
            await asyncio.sleep(max(0.0, t0 + PING_INTERVAL - clock()))

    def longest(self, since: float, until: float) -> float:
        return max((trip for sent, trip in self.trips if since <= sent < until), default=0.0)


async def _measure_writes(
    sock: str, workers: int, names: list[str], writes: int, stall_writes: int, floor: FloorWriter | None
) -> dict[str, Any]:
    groups, spare = await _per_worker(sock, workers, 1)
    pollers = [g[0] for g in groups]
    writer = spare.pop() if spare else await AsyncConnection.open(sock)
    try:
        latencies = []
        for i in range(writes):
            latencies.append(await _write_until_served(writer, pollers, names[_spread(i, len(names))], i))
            if floor is not None:  # beside it: the same disk state (nothing else runs meanwhile)
                floor.write()
        # opened only now: a connection idle through 60 full reloads at 100,000 stores (1-3 s
        # each) outlived the proxy's 75 s keep-alive time
        ping_groups, ping_spare = await _per_worker(sock, workers, 1)
        groups, spare = groups + ping_groups, spare + ping_spare
        pingers = [_Pinger(g[0]) for g in ping_groups]
        tasks = [asyncio.ensure_future(p.run()) for p in pingers]
        idle, stalls = [], []
        for i in range(stall_writes):  # a window without a write, then one with
            t0 = time.perf_counter()
            await asyncio.sleep(STALL_WINDOW)
            idle.append(max(p.longest(t0, t0 + STALL_WINDOW) for p in pingers))
            t0 = time.perf_counter()
            await _write_until_served(writer, pollers, names[_spread(writes + i, len(names))], writes + i)
            await asyncio.sleep(max(0.0, t0 + STALL_WINDOW - time.perf_counter()))
            stalls.append(max(p.longest(t0, t0 + STALL_WINDOW) for p in pingers))
        for p in pingers:
            p.stopped = True
        await asyncio.gather(*tasks)
    finally:
        for conn in [writer, *spare, *(c for g in groups for c in g)]:
            conn.close()
    return {
        "write_p50_ms": _pct(latencies, 0.5) * 1e3,
        "write_p99_ms": _pct(latencies, 0.99) * 1e3,
        "stall_ms": statistics.median(stalls) * 1e3 if stalls else None,
        "stall_max_ms": max(stalls, default=0.0) * 1e3,
        "stall_idle_ms": statistics.median(idle) * 1e3 if idle else None,
        "stall_idle_max_ms": max(idle, default=0.0) * 1e3,
        "writes": latencies,
        **({"floor_beside": floor.figures()} if floor is not None and floor.times else {}),
    }


def measure_writes(
    sock: str, workers: int, names: list[str], writes: int, stall_writes: int, floor: FloorWriter | None = None
) -> dict[str, Any]:
    """Write-until-served latencies, the longest per-write stall and (with ``floor``) the write
    floor measured beside the writes (see the module)."""
    import uvloop

    return uvloop.run(_measure_writes(sock, workers, names, writes, stall_writes, floor))


@contextlib.contextmanager
def _writing(sock: str, names: list[str], rate: float) -> Iterator[list[int]]:
    """A thread making ``rate`` comment writes per second through the API while the block runs;
    yields the list it appends each acknowledged write's status to."""
    done: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        with Client(sock, timeout=30) as c:
            n = 0
            next_at = time.monotonic()
            while not stop.wait(max(0.0, next_at - time.monotonic())):
                next_at += 1 / rate
                store = names[_spread(n, len(names))]
                done.append(c.request("PUT", f"{API}/config/datastore/{store}", {"comment": f"load {n}"}).status)
                n += 1

    thread = threading.Thread(target=loop, name="bench-scale-writer", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=30)


def measure_status(sock: str, names: list[str], seconds: float, rate: float) -> dict[str, Any]:
    """Status latency over the proxy, idle and during ``rate`` writes/s (see the module): windows
    of ``STATUS_WINDOW`` s, idle and busy in turn, until each side has had ``seconds``."""
    step = max(1, len(names) // STATUS_SAMPLE)
    paths = [f"{API}/admin/datastore/{n}/status?verbose=0" for n in names[::step]]
    run_rounds(sock, [paths], STATUS_CONNECTIONS, 1, 0.0)  # one pass: every sampled store opened first
    pairs = max(1, round(seconds / STATUS_WINDOW))
    window = seconds / pairs
    idle, busy, refused, writes = [], [], [], 0
    for _ in range(pairs):
        idle.append(run_rounds(sock, [paths], STATUS_CONNECTIONS, 1, window)[0])
        with _writing(sock, names, rate) as done:
            busy.append(run_rounds(sock, [paths], STATUS_CONNECTIONS, 1, window)[0])
        refused += [s for s in done if s != 200]
        writes += len(done)
    errors = sum(r["errors"] for r in idle), sum(r["errors"] for r in busy)
    if any(errors) or refused:
        failed = f"{errors[0]} idle / {errors[1]} busy"
        raise MeasureError(f"status requests failed: {failed}; writes refused: {refused[:5]}")
    pairs_p99 = [(i["p99_ms"], b["p99_ms"]) for i, b in zip(idle, busy, strict=True)]
    ratios = [b / i for i, b in pairs_p99 if i]
    wall = sum(b["wall"] for b in busy)
    return {
        "status_idle_p50_ms": statistics.median(r["p50_ms"] for r in idle),
        "status_idle_p99_ms": statistics.median(r["p99_ms"] for r in idle),
        "status_busy_p50_ms": statistics.median(r["p50_ms"] for r in busy),
        "status_busy_p99_ms": statistics.median(r["p99_ms"] for r in busy),
        "status_p99_ratio": statistics.median(ratios) if ratios else None,  # per window pair, then the median
        "status_windows": [{"idle_p99_ms": i, "busy_p99_ms": b} for i, b in pairs_p99],
        "status_busy_writes": writes,
        "status_busy_write_rate": writes / wall if wall else 0.0,  # falls short of a slow writer
        "status_busy_seconds": wall,
        "status_requests": sum(r["requests"] for r in idle + busy),
    }


def worker_resources(d: Daemons) -> dict[str, Any]:
    """The largest worker RSS (MB) and open fd count, from ``/proc``."""
    pids = sorted(d.worker_pids())
    page = os.sysconf("SC_PAGE_SIZE")
    rss, fds = [], []
    for pid in pids:
        with contextlib.suppress(OSError):
            rss.append(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page / 1e6)
            fds.append(len(os.listdir(f"/proc/{pid}/fd")))
    return {"worker_rss_mb": max(rss, default=0.0), "worker_fds": max(fds, default=0), "worker_pids": pids}


# -- one row ----------------------------------------------------------------------------------------


def run_mode(base: Path, stores: int, mode: str, opts: Any, progress: Progress) -> dict[str, Any]:
    """Manager + proxy on ``base`` in invalidation ``mode``: every per-server figure, or those
    measured before an ``error``."""
    env = {INVALIDATION_ENV: "full"} if mode == "full" else {}
    out: dict[str, Any] = {"mode": mode}
    names = [store_name(i) for i in range(stores)]
    try:
        with Daemons(base, opts.workers, stores=0, ready_timeout=opts.ready_timeout, env=env) as d:
            progress(f"{stores:,} stores, {mode}: starting the manager")
            d.start_manager()
            progress(f"{stores:,} stores, {mode}: starting the proxy")
            t0 = time.perf_counter()
            d.start_proxy()
            out["ready_s"] = time.perf_counter() - t0
            progress(f"{stores:,} stores, {mode}: {opts.writes} + {opts.stall_writes} writes")
            paths = Paths.resolve(base)
            floor = FloorWriter(paths.config_dir, paths.config_file.stat().st_size)
            out |= measure_writes(d.proxy_sock, opts.workers, names, opts.writes, opts.stall_writes, floor)
            progress(f"{stores:,} stores, {mode}: status, idle and at {opts.write_rate:g} writes/s")
            out |= measure_status(d.proxy_sock, names, opts.status_seconds, opts.write_rate)
            out |= worker_resources(d)
    except (DaemonFailed, MeasureError, ApiError, OSError, AssertionError) as err:
        out["error"] = _describe(err)
    return out


def run_row(base: Path, data_dir: Path, stores: int, opts: Any, progress: Progress) -> dict[str, Any]:
    """Every figure of one store count but the in-process lookup (:func:`warm_lookups` measures
    every row's in one phase; the stores are laid out before); ``modes`` maps each mode to its
    figures.  A config that cannot be written ends the row."""
    paths = Paths.resolve(base)
    row: dict[str, Any] = {"stores": stores, "modes": {}}
    try:
        row["config_bytes"] = write_config(paths, data_dir, stores)
        row["floor"] = write_floor(paths.config_dir, row["config_bytes"], opts.floor_repeats)
    except OSError as err:
        row["error"] = _describe(err)
        return row
    for mode in opts.invalidation:
        write_config(paths, data_dir, stores)  # every mode starts from the same file
        row["modes"][mode] = run_mode(base, stores, mode, opts, progress)
        shutil.rmtree(paths.run_dir, ignore_errors=True)
    return row


# -- the targets of issue 9 -------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target: its text, the measured value (None: a figure is missing) and whether it holds.
    "large" is the largest row measured (100,000 stores in the full run), "small" the smallest."""
    if not rows:
        return []
    small, large = min(rows, key=lambda r: r["stores"]), max(rows, key=lambda r: r["stores"])
    delta, full = large["modes"].get("delta", {}), large["modes"].get("full", {})
    n, m = f"{large['stores']:,}", f"{small['stores']:,}"
    lookup = _ratio(_get(large, "lookup", "normalised"), _get(small, "lookup", "normalised"))
    stall = _get(delta, "stall_ms")
    beside = _get(delta, "floor_beside", "p50_ms")
    write = _ratio(_get(delta, "write_p50_ms"), beside if beside is not None else _get(large, "floor", "p50_ms"))
    status = _get(delta, "status_p99_ratio")
    return [
        _target(f"warm lookup at {n} / at {m} (each / machine reference)", lookup, "<=", 1.2),
        _target(f"longest stall per write at {n} (ms)", stall, "<=", 5.0),
        _target(f"stall full / delta at {n}", _ratio(_get(full, "stall_ms"), stall), ">=", 50.0),
        _target(f"write p50 / write floor beside it at {n}", write, "<=", 2.0),
        _target(f"status p99 during writes / idle at {n}", status, "<=", 2.0),
        _target(f"proxy ready at {n} (s)", _get(delta, "ready_s"), "<=", 20.0),
        _target(f"worker RSS at {n} (MB)", _get(delta, "worker_rss_mb"), "<=", 300.0),
    ]


def _get(figures: dict[str, Any], *keys: str) -> float | None:
    """``figures[k1][k2]...`` as a float, None where any level is missing."""
    value: Any = figures
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _target(text: str, value: float | None, op: str, bound: float) -> dict[str, Any]:
    holds = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"target": f"{text} {op} {bound:g}", "value": value, "holds": holds}


# -- helpers ----------------------------------------------------------------------------------------


def _spread(i: int, n: int) -> int:
    """The i-th write's store: spread over the config, never the same twice in a row."""
    return (i * 7919 + n // 2) % n


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def _describe(err: BaseException) -> str:
    """One line for a table cell: the error's first line and, for a daemon that failed, the last
    line of its logs (what it said before it died)."""
    text = str(err).strip()
    first = text.split("\n", 1)[0][:300].rstrip(":")
    last = _last_line(text) if isinstance(err, DaemonFailed) and "\n" in text else ""
    return f"{type(err).__name__}: {first}" + (f" -- {last}" if last else "")


def _last_line(text: str) -> str:
    """The last line of ``text`` that says something, without a log line's time stamp."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _TIMESTAMP.sub("", lines[-1])[:300] if lines else "(no output)"


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ ")
