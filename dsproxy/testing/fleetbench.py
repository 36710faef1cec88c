"""What ``scripts/bench-fleet`` measures: fleet mode's costs, next to etcd's own (issue 13).

One *row* is one store count; :func:`run_row` measures it and returns a plain dict (the script
prints, saves and plots it).  Each row has its own 3-member etcd cluster
(:class:`~dsproxy.testing.etcd.EtcdCluster`) and 3 fleet hosts (:class:`~dsproxy.testing.fleet.Fleet`,
``--workers`` workers each, own base dirs and shared memory, one file system):

* **lay-out**: the stores ``store00000``... of :func:`dsproxy.testing.scale.lay_out` (the hosts
  share this machine's file system, so the directories serve all of them; ``--layout-dir`` keeps
  them across runs, as bench-scale's).
* **populate** (s): ``PREFIX/datastores/`` filled with N sections (bench-scale's: comment,
  schedules, some keep-* and notify options) by ``dsproxy fleet import``'s own code
  (:func:`dsproxy.fleet.admin.import_config`: one Range to refuse conflicts, then create-only txns
  of at most 128 keys and 1.5 MiB).
* **fleet start** (s): the 3 managers (each reads the prefix and writes its ``datastore.cfg``),
  then the 3 proxies, until every worker has booted; then the measurements wait until every
  worker has finished its first boot's warm-up (``warm_s`` in the JSON: from the start until then).
* **etcd floor**, measured with the fleet up (idle apart from its lease refreshes), on keys outside
  the fleet's prefix, through :class:`dsproxy.fleet.etcd.Etcd` (the client the managers use),
  under uvloop (as the manager runs):

  - ``put_if`` p50/p99: ``--floor-repeats`` sequential compare-and-set txns on one key (what a fleet
    write sends);
  - put -> watch p50/p99: a put until a watcher *in another process* (``python -m
    dsproxy.testing.fleetbench watch``: :meth:`Etcd.watch_prefix`, the manager's watch) has the
    event; the watcher stamps its receipt with ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for
    every process of the machine) and sends the stamp down a pipe, and the next put waits for it.

* **write served everywhere** (ms, p50/p99 of ``--writes``): a comment update through the
  ``proxy.sock`` of host ``i % 3`` (forwarded to its manager: validated, one ``put_if``, answered
  once its own mirror applied the revision), from the send until a status request on a keep-alive
  connection *to each worker of every host* is answered with ``x-dsproxy-revision`` >= the
  ``revision`` the write's answer carries; **ack** is the write's answer alone.  One request
  per connection with ``x-dsproxy-min-revision`` (the worker answers it once it has loaded that
  revision): polled every 1 ms until 2026-12-03, when the 6 pollers' requests were a fifth of
  the workers' CPU per write and the poll added its granularity.  **after ack** is served minus
  ack, per write: from the acknowledgement until every worker of every host serves it -- issue
  13's "write acknowledged -> served by every host's workers", the figure its first target
  compares with the put -> watch p99.  (Until 2026-12-04 the target was judged on served from
  the send, which also holds the ack's own HTTP hops, validation and txn: both are printed.)
* **throughput** (writes/s): ``--throughput-writes`` comment updates through host 0, one after the
  other on one connection, each answered before the next is sent.
* **offline transition** (ms, p50/p99 of ``--transitions``): ``maintenance-mode offline`` on a store
  through host 0, until its answer -- which waits until every live host's key shows the
  transaction's revision (and carries the fleet-wide active operations and ``lagging-hosts``; an
  answer naming a lagging host fails the row); each followed by the store back online (**online**:
  that write's answer, p50).
* **cold start** (s): once the 3 hosts are quiet (each has written its overlay into its file,
  :func:`_until_quiet`; ``quiet_s`` in the JSON), a 4th host (fresh base dir, empty
  ``datastore.cfg``) spawned against the populated prefix: until its manager answers (it read
  etcd, decoded every value and wrote the file), then its proxy is spawned, until each of its
  workers answers a status request with
  ``x-dsproxy-revision`` >= the etcd revision read just before the spawn.  Polled every 5 ms, not
  at :class:`~dsproxy.daemon.run.DaemonPair`'s 50 ms.  The JSON adds the manager's own account of
  its first read (``fleet: mirrored ... (read X s, written Y s)``: the etcd Range, then decoding and
  writing the file), and the CPU (user, system) and minor page faults of the manager and of the
  proxy with its workers until then (``cpu``).  On this machine (a Firecracker VM whose free
  memory goes back to its host, ``virtio_balloon`` free page reporting) a page the VM has not
  touched lately costs ~10 us to fault in against ~3 us (``mmap`` + one write per page, 8,000 MiB
  against 300 MiB, 2026-12-04): the same 86,700 faults of a cold manager were 0.81 s of system
  time in one start and 0.23 s in the next, and a cold start after a run had touched 8 GB took
  2.53 s against 3.29 s before.  The system seconds show which kind of start a row measured.

A failure (a daemon or member that does not start, a refused write, a lagging host, a timeout) ends
the row with an ``error`` entry; the figures measured before it stay, the next row runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..client import ApiError, AsyncConnection, Client
from ..config import Value
from ..daemon.protocol import MIN_REVISION_HEADER, REVISION_HEADER, WAIT_HEADER, WORKER_HEADER
from ..daemon.run import DaemonFailed
from .etcd import EtcdCluster, EtcdHarnessError
from .fleet import Fleet, FleetHost
from .scale import MeasureError, _describe, _pct, _per_worker, _spread, lay_out, sections, store_name

T = TypeVar("T")

API = "/api2/json"
PREFIX = "/bench-fleet"
FLOOR_PREFIX = b"/bench-fleet-floor/"  # outside the fleet's prefix: the hosts do not watch it
HOSTS = 3
SERVED_TIMEOUT = 30.0  # s until every worker of every host must serve a write's revision
COLD_POLL = 0.005  # s between looks while the 4th host starts
QUIET_SETTLE = 0.5  # s after the last host's flush before the cold start (its workers' loads)
WARM_UP = 5  # untimed puts before the watch delivery is timed (the watcher's stream is set up)

Progress = Callable[[str], None]


def _uv(coro: Awaitable[T]) -> T:
    """Run ``coro`` under uvloop, as the manager runs its etcd client."""
    import uvloop

    async def main() -> T:
        return await coro

    return uvloop.run(main())


def _ms(values: Sequence[float]) -> tuple[float, float]:
    return _pct(list(values), 0.5) * 1e3, _pct(list(values), 0.99) * 1e3


# -- etcd: populate and the floor -------------------------------------------------------------------


async def populate(endpoints: list[str], prefix: str, wanted: dict[str, dict[str, Value]]) -> dict[str, Any]:
    """``PREFIX/datastores/`` filled with ``wanted`` by ``dsproxy fleet import``'s code; what it took."""
    from ..fleet.admin import import_config
    from ..fleet.etcd import Etcd

    async with Etcd(endpoints, timeout=10.0) as etcd:
        t0 = time.perf_counter()
        result = await import_config(etcd, prefix, wanted, "bench-fleet")
        seconds = time.perf_counter() - t0
    if result.conflicts or result.imported != len(wanted):
        conflicts = len(result.conflicts)
        raise MeasureError(f"import wrote {result.imported} of {len(wanted)} stores ({conflicts} conflicts)")
    return {"keys": result.imported, "revision": result.revision, "seconds": seconds}


async def etcd_floor(endpoints: list[str], repeats: int) -> dict[str, Any]:
    """put_if latency and put -> watch delivery in another process (see the module)."""
    from ..fleet.etcd import Etcd

    watcher = await _start_watcher(endpoints)  # before any channel of ours is open (gRPC and fork)
    async with Etcd(endpoints) as etcd:
        key, revision, cas = FLOOR_PREFIX + b"cas", 0, []
        for i in range(repeats):
            t0 = time.perf_counter()
            txn = await etcd.put_if(key, b"%d" % i, revision)
            cas.append(time.perf_counter() - t0)
            if not txn.succeeded:
                raise MeasureError(f"put_if on {key!r} at mod_revision {revision} failed")
            revision = txn.revision
        watch = await _watch_delivery(etcd, watcher, repeats)
    (cas_p50, cas_p99), (watch_p50, watch_p99) = _ms(cas), _ms(watch)
    return {
        "put_if_p50_ms": cas_p50, "put_if_p99_ms": cas_p99, "watch_p50_ms": watch_p50, "watch_p99_ms": watch_p99,
    }  # fmt: skip


async def _start_watcher(endpoints: list[str]) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", __name__, "watch", ",".join(endpoints), FLOOR_PREFIX.decode() + "w/"]
    return await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)


async def _watch_delivery(etcd: Any, proc: asyncio.subprocess.Process, repeats: int) -> list[float]:
    """Put -> the watcher process's stamp of the event, ``repeats`` times after :data:`WARM_UP`."""
    assert proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 30.0)
        if not ready.startswith(b"ready"):
            raise MeasureError(f"the watcher process did not start: {ready!r}")
        times = []
        for i in range(WARM_UP + repeats):
            t0 = time.monotonic()
            revision = await etcd.put(FLOOR_PREFIX + b"w/k", b"%d" % i)
            line = await asyncio.wait_for(proc.stdout.readline(), 10.0)
            seen, stamp = line.split()
            if int(seen) != revision:
                raise MeasureError(f"the watcher saw revision {int(seen)}, the put made {revision}")
            if i >= WARM_UP:
                times.append(float(stamp) - t0)
        return times
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _watch_main(endpoints: list[str], prefix: bytes) -> None:
    """The watcher process: ``ready``, then ``REVISION MONOTONIC`` for each event, as it arrives."""
    from ..fleet.etcd import Etcd

    async with Etcd(endpoints) as etcd:
        start = await etcd.revision() + 1
        sys.stdout.write(f"ready {start}\n")
        sys.stdout.flush()
        async for batch in etcd.watch_prefix(prefix, start):
            stamp = time.monotonic()
            sys.stdout.write("".join(f"{e.mod_revision} {stamp:.9f}\n" for e in batch.events))
            sys.stdout.flush()


async def current_revision(endpoints: list[str]) -> int:
    from ..fleet.etcd import Etcd

    async with Etcd(endpoints) as etcd:
        return await etcd.revision()


# -- the fleet: writes, throughput, transitions -----------------------------------------------------


async def _request(conn: AsyncConnection, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await conn.request(method, path, json.dumps(body).encode())
    if resp.status != 200:
        raise MeasureError(f"{method} {path} was answered {resp.status}: {resp.body[:300]!r}")
    data: dict[str, Any] = resp.json()["data"]
    return data


async def _until_revision(conn: AsyncConnection, store: str, revision: int) -> None:
    """One status request that its worker answers once it serves ``revision`` (the
    ``x-dsproxy-min-revision`` wait: the answer comes with the load, no polling)."""
    path = f"{API}/admin/datastore/{store}/status?verbose=0"
    wait = {MIN_REVISION_HEADER: str(revision), WAIT_HEADER: f"{SERVED_TIMEOUT:g}"}
    resp = await conn.request("GET", path, headers=wait)
    served = resp.headers.get(REVISION_HEADER)
    if resp.status != 200 or served is None or int(served) < revision:
        body = resp.body[:200]
        raise MeasureError(f"a worker answered {resp.status} at etcd revision {served} for {revision}: {body!r}")


class _Connections:
    """Per host: one keep-alive connection to each worker (the pollers) and one to write through;
    the spare connections opened on the way stay open (the accept balancing counts them)."""

    def __init__(self) -> None:
        self.pollers: list[AsyncConnection] = []
        self.writers: list[AsyncConnection] = []
        self.spare: list[AsyncConnection] = []

    async def open(self, hosts: Sequence[FleetHost], workers: int) -> _Connections:
        for host in hosts:
            groups, spare = await _per_worker(host.proxy_sock, workers, 1)
            self.pollers += [g[0] for g in groups]
            self.writers.append(spare.pop() if spare else await AsyncConnection.open(host.proxy_sock))
            self.spare += spare
        return self

    def close(self) -> None:
        for conn in [*self.pollers, *self.writers, *self.spare]:
            conn.close()


async def measure_fleet(hosts: Sequence[FleetHost], workers: int, names: list[str], opts: Any) -> dict[str, Any]:
    """Write served everywhere, throughput and offline transitions on a running fleet (see the module)."""
    conns = await _Connections().open(hosts, workers)
    try:
        out = await _served_everywhere(conns, names, opts.writes)
        out |= await _throughput(conns.writers[0], names, opts.throughput_writes)
        out |= await _transitions(conns.writers[0], names, opts.transitions)
    finally:
        conns.close()
    return out


async def _served_everywhere(conns: _Connections, names: list[str], writes: int) -> dict[str, Any]:
    acks, served, after = [], [], []
    for i in range(writes):
        store = names[_spread(i, len(names))]
        writer = conns.writers[i % len(conns.writers)]
        t0 = time.perf_counter()
        data = await _request(writer, "PUT", f"{API}/config/datastore/{store}", {"comment": f"bench-fleet write {i}"})
        acks.append(time.perf_counter() - t0)
        await asyncio.gather(*(_until_revision(c, store, int(data["revision"])) for c in conns.pollers))
        served.append(time.perf_counter() - t0)
        after.append(served[-1] - acks[-1])
    (ack_p50, ack_p99), (served_p50, served_p99), (after_p50, after_p99) = _ms(acks), _ms(served), _ms(after)
    return {
        "ack_p50_ms": ack_p50, "ack_p99_ms": ack_p99, "served_p50_ms": served_p50, "served_p99_ms": served_p99,
        "after_ack_p50_ms": after_p50, "after_ack_p99_ms": after_p99,
        "served_max_ms": max(served) * 1e3, "served": served, "acks": acks, "pollers": len(conns.pollers),
    }  # fmt: skip


async def _throughput(writer: AsyncConnection, names: list[str], writes: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    for i in range(writes):
        store = names[_spread(10_000 + i, len(names))]
        await _request(writer, "PUT", f"{API}/config/datastore/{store}", {"comment": f"bench-fleet rate {i}"})
    wall = time.perf_counter() - t0
    return {"throughput_wps": writes / wall, "throughput_writes": writes}


async def _transitions(writer: AsyncConnection, names: list[str], count: int) -> dict[str, Any]:
    offline, online = [], []
    for i in range(count):
        store = names[_spread(20_000 + i, len(names))]
        path = f"{API}/config/datastore/{store}"
        t0 = time.perf_counter()
        data = await _request(writer, "PUT", path, {"maintenance-mode": "type=offline"})
        offline.append(time.perf_counter() - t0)
        if data.get("lagging-hosts") or "active-operations" not in data:
            raise MeasureError(f"the offline transition of {store} answered {data}")
        t0 = time.perf_counter()
        await _request(writer, "PUT", path, {"delete": ["maintenance-mode"]})
        online.append(time.perf_counter() - t0)
    (off_p50, off_p99), (on_p50, _) = _ms(offline), _ms(online)
    return {"offline_p50_ms": off_p50, "offline_p99_ms": off_p99, "online_p50_ms": on_p50, "offline": offline}


def _until_warm(hosts: Sequence[FleetHost], workers: int, timeout: float) -> float:
    """Until every worker of every host has finished its first boot's warm-up (its ``warm:`` log
    line): the writes are measured on warm hosts, not beside the last host's warm-up (which took
    the CPU of whole writes: at 100,000 stores the served p99 was 0.5-1 s, the p50 ~60 ms).
    Seconds waited."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        warm = [h.log_text(tail=10**7).count("] INFO: warm: ") for h in hosts]
        if all(n >= workers for n in warm):
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise MeasureError(f"the workers' warm-up had not ended after {timeout:g} s: warm per host {warm}")
        time.sleep(0.1)


def _until_quiet(hosts: Sequence[FleetHost], timeout: float) -> float:
    """Until every host has written its last writes' overlay into its file (its whole write of
    the file, 1 s after the writes pause: at 100,000 stores a 14 MB render per host, which the
    cold start would otherwise share the CPU with), and a beat more for its workers to load it.
    Seconds waited."""
    from ..config import overlay

    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while any((o := overlay.read_beside(h.paths.config_file)) is not None and o.stores for h in hosts):
        if time.monotonic() > deadline:
            raise MeasureError(f"the hosts' overlays were not written into their files after {timeout:g} s")
        time.sleep(0.05)
    time.sleep(QUIET_SETTLE)
    return time.perf_counter() - t0


# -- cold start ---------------------------------------------------------------------------------------


class ColdHost(FleetHost):
    """A fleet host whose daemons are spawned without :class:`DaemonPair`'s 50 ms waits (the cold
    start times them itself)."""

    def spawn_manager(self) -> None:
        self.manager = self._spawn("manager", self.command("manager", *self.fleet_args()))

    def spawn_proxy(self) -> None:
        options = ("--workers", str(self.workers), "--cache", self.cache, "--ttl", str(self.ttl))
        self.proxy = self._spawn("proxy", self.command("proxy", *options))

    def check_alive(self) -> None:
        gone = self.exited()
        if gone is not None:
            raise DaemonFailed(f"the {gone[0]} of the 4th host exited with {gone[1]}:\n{self.log_text()}", gone[1])


def _manager_answers(host: ColdHost, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        host.check_alive()
        try:
            with Client(host.manager_sock, timeout=timeout) as c:
                if c.get(f"{API}/ping").status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise MeasureError(f"the 4th host's manager did not answer within {timeout:g} s")
        time.sleep(COLD_POLL)


async def _workers_serving(host: ColdHost, store: str, revision: int, timeout: float) -> None:
    """Until each of the host's workers answers a status request at ``revision`` or later."""
    path = f"{API}/admin/datastore/{store}/status?verbose=0"
    deadline = time.monotonic() + timeout
    serving: set[str] = set()
    held: list[AsyncConnection] = []  # kept open: the balancing sends the next connection elsewhere
    try:
        while len(serving) < host.workers:
            if time.monotonic() > deadline:
                done = f"{len(serving)} of {host.workers}"
                raise MeasureError(f"{done} workers of the 4th host serving after {timeout:g} s")
            host.check_alive()
            try:
                conn = await AsyncConnection.open(host.proxy_sock)
            except OSError:
                await asyncio.sleep(COLD_POLL)
                continue
            held.append(conn)
            while conn.usable and time.monotonic() < deadline:
                try:
                    resp = await conn.request("GET", path)
                except OSError:
                    break
                pid, served = resp.headers.get(WORKER_HEADER, "?"), resp.headers.get(REVISION_HEADER)
                if pid in serving:
                    break
                if resp.status == 200 and served is not None and int(served) >= revision:
                    serving.add(pid)
                    break
                await asyncio.sleep(COLD_POLL)
    finally:
        for conn in held:
            conn.close()


def cold_start(base: Path, endpoints: list[str], workers: int, store: str, timeout: float) -> dict[str, Any]:
    """A 4th host spawned against the populated prefix, until its workers serve (see the module)."""
    host = ColdHost(base, endpoints, PREFIX, f"host{HOSTS}", workers=workers, ready_timeout=timeout)
    revision = _uv(current_revision(endpoints))
    try:
        t0 = time.perf_counter()
        host.spawn_manager()
        _manager_answers(host, timeout)
        manager = time.perf_counter() - t0
        host.spawn_proxy()
        _uv(_workers_serving(host, store, revision, timeout))
        serving = time.perf_counter() - t0
        mirrored = _MIRRORED.search(host.log_text(tail=100_000))
        assert host.manager is not None and host.proxy is not None
        cpu = {"manager": _cpu_of(host.manager.pid, False), "proxy": _cpu_of(host.proxy.pid, True)}
    finally:
        host.stop()
    out = {"manager_s": manager, "serving_s": serving, "revision": revision, "cpu": cpu}
    if mirrored:  # the manager's own account of its first read: the etcd read, then decoding + the file
        out |= {"etcd_read_s": float(mirrored["read"]), "mirror_written_s": float(mirrored["written"])}
    return out


def _cpu_of(pid: int, children: bool) -> dict[str, float]:
    """CPU seconds (user, system) and minor page faults of ``pid`` so far, with its live children's
    (the proxy's workers) when ``children``: from ``/proc/PID/stat``, read while they run."""
    import psutil  # type: ignore[import-untyped]

    pids = [pid, *(c.pid for c in psutil.Process(pid).children())] if children else [pid]
    tick = os.sysconf("SC_CLK_TCK")
    user = system = faults = 0.0
    for one in pids:
        with open(f"/proc/{one}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (the command in parentheses may hold spaces)
        faults += int(fields[7])  # minflt
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return {"user_s": user, "sys_s": system, "minor_faults": faults}


_MIRRORED = re.compile(
    r"fleet: mirrored \d+ datastores of etcd revision \d+ \(read (?P<read>[\d.]+) s, written (?P<written>[\d.]+) s\)"
)


# -- one row ----------------------------------------------------------------------------------------


def run_row(base: Path, data_dir: Path, stores: int, opts: Any, progress: Progress) -> dict[str, Any]:
    """Every figure of one store count (see the module), or those measured before an ``error``."""
    from ..fleet.etcd import EtcdError

    row: dict[str, Any] = {"stores": stores}
    names = [store_name(i) for i in range(stores)]
    what = f"{stores:,} stores"
    try:
        progress(f"{what}: lay-out")
        row["layout"] = lay_out(data_dir, stores)
        progress(f"{what}: etcd cluster")
        with EtcdCluster(HOSTS, base / "etcd") as cluster:
            cluster.start()
            progress(f"{what}: populating etcd")
            row["populate"] = _uv(populate(cluster.endpoints, PREFIX, sections(data_dir, stores)))
            progress(f"{what}: starting {HOSTS} hosts")
            timeout = opts.ready_timeout
            with Fleet(base, cluster.endpoints, PREFIX, HOSTS, workers=opts.workers, ready_timeout=timeout) as fleet:
                t0 = time.perf_counter()
                fleet.start()
                row["fleet_start_s"] = time.perf_counter() - t0
                progress(f"{what}: waiting for the workers' warm-up")
                row["warm_s"] = _until_warm(fleet.hosts, opts.workers, timeout) + row["fleet_start_s"]
                progress(f"{what}: etcd floor")
                row["floor"] = _uv(etcd_floor(cluster.endpoints, opts.floor_repeats))
                progress(f"{what}: writes, throughput, transitions")
                row |= _uv(measure_fleet(fleet.hosts, opts.workers, names, opts))
                progress(f"{what}: cold start of a 4th host")
                row["quiet_s"] = _until_quiet(fleet.hosts, timeout)
                row["cold_start"] = cold_start(
                    base / f"host{HOSTS}", cluster.endpoints, opts.workers, names[0], opts.ready_timeout
                )
    except (DaemonFailed, MeasureError, EtcdHarnessError, EtcdError, ApiError, OSError, AssertionError) as err:
        row["error"] = _describe(err)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return row


# -- the targets of issue 13 ------------------------------------------------------------------------


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target: its text, the measured value (None: a figure is missing) and whether it holds.
    Served-everywhere and the transition are judged on every row, the cold start on the largest."""
    out = []
    for row in rows:
        n = f"{row['stores']:,}"
        ratio = _ratio(row.get("after_ack_p99_ms"), row.get("floor", {}).get("watch_p99_ms"))
        out.append(_target(f"acknowledged -> served everywhere p99 / etcd put->watch p99 at {n}", ratio, 3.0))
        out.append(_target(f"offline transition p50 at {n} (ms)", row.get("offline_p50_ms"), 50.0))
    if rows:
        large = max(rows, key=lambda r: r["stores"])
        cold = large.get("cold_start", {}).get("serving_s")
        out.append(_target(f"cold start to serving at {large['stores']:,} (s)", cold, 3.0))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _target(text: str, value: float | None, bound: float) -> dict[str, Any]:
    return {"target": f"{text} <= {bound:g}", "value": value, "holds": None if value is None else value <= bound}


def main(argv: list[str]) -> None:
    """``python -m dsproxy.testing.fleetbench watch ENDPOINTS PREFIX``: the watcher of the floor."""
    if len(argv) != 3 or argv[0] != "watch":
        sys.exit("usage: python -m dsproxy.testing.fleetbench watch ENDPOINT[,ENDPOINT...] PREFIX")
    _uv(_watch_main(argv[1].split(","), argv[2].encode()))


if __name__ == "__main__":
    main(sys.argv[1:])
