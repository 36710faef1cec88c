"""The stress run: daemons, actors, the checker's verdict and the summary (``scripts/stress``).

:func:`run` lays out the stable stores (:func:`~dsproxy.testing.stores.write_stores`), starts a
manager + proxy on a temp base dir (:class:`~dsproxy.testing.daemons.Daemons`) -- or, with
``fleet`` hosts, a 3-member etcd cluster with the stores imported into it and the hosts of a
:class:`~dsproxy.testing.fleet.Fleet` -- runs the actors of :mod:`.actors` for ``duration`` seconds
while the :class:`~.checker.Checker` follows their logs (and, in a fleet with heavy chaos,
:class:`FleetChaos` kills etcd members and managers), then makes the final checks and prints the
summary.  Exit status 0 only if every invariant held.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ...client import ApiError, Client
from ...config import Value, parse, read_raw
from ...daemon.run import DaemonFailed
from ...paths import Paths
from ..daemons import Daemons, wait_for
from ..etcd import EtcdCluster, EtcdHarnessError
from ..fleet import Fleet, FleetHost
from ..stores import write_stores
from . import (
    API,
    CHAOS,
    DEFAULT_STORES,
    FLEET_CHAOS,
    FLEET_LEASE_TTL,
    FLEET_MAINTENANCE_TIMEOUT,
    FLEET_PREFIX,
    MANUAL,
    MANUAL_COMMENT,
    NEVER,
    VOLATILE,
    Stores,
    actors,
    now,
)
from .checker import Checker, host_id

INVARIANTS = (
    "fresh generation",
    "fresh answer",
    "hand edits seen",
    "no lost write",
    "operations drain",
    "workers alive",
    "no unexpected error",
)
FLEET_INVARIANTS = (
    "fresh generation",
    "fresh answer",
    "hand edits undone",
    "no lost write",
    "operations drain",
    "workers alive",
    "no unexpected error",
    "hosts converge",
)
# the chaos kills workers on purpose: that is not the crash loop the limit is there for
PROXY_ARGS = ("--graceful-timeout", "2", "--crash-limit", "100000")
CONVERGE_TIMEOUT = 30.0  # s the hosts have, once everything is healed, to serve etcd's final state


@dataclass
class StressOptions:
    duration: float = 30.0
    clients: int = 4
    workers: int = 2
    chaos: str = "light"
    seed: int = 1
    stores: int = DEFAULT_STORES  # stable stores configured (the hand-edited and volatile ones come on top)
    fleet: int = 0  # hosts of a fleet on a 3-member etcd cluster (0: one manager + proxy, no etcd)
    json: str | None = None
    keep: bool = False  # keep the temp dir and its logs even when every invariant held


def write_initial_config(base: Path, stores: Stores) -> dict[str, str]:
    """The stable stores and the hand-edited one, laid out and configured; every store's state."""
    configured = [*stores.stable, MANUAL]
    write_stores(Paths.resolve(base), {name: {"comment": MANUAL_COMMENT} for name in configured})
    return dict.fromkeys(configured, "ok") | dict.fromkeys(VOLATILE + NEVER, "absent")


# -- one host -------------------------------------------------------------------------------------------


def final_checks(d: Daemons, checker: Checker, workers: int, stores: Stores) -> dict[str, Any]:
    time.sleep(1.0)  # the last leases' connections close; killed workers are replaced
    checker.final_file_check(d.config_file)
    try:
        return _final_proxy_checks(d.proxy_sock, checker, workers, _drained(checker, stores))
    except (OSError, ApiError) as err:
        checker.violate("workers alive", f"the proxy does not answer at the end: {err}")
        return {"generation": None}


def _drained(checker: Checker, stores: Stores) -> list[str]:
    # a store never leased has no operation to drain: asking each of 100,000 would take minutes
    return sorted(checker.leased | {*stores.hot(), *VOLATILE, MANUAL})


def _final_proxy_checks(
    sock: str, checker: Checker, workers: int, drained: list[str], where: str = ""
) -> dict[str, Any]:
    on = f" on {where}" if where else ""
    with Client(sock) as c:
        deadline = now() + 10
        while True:
            node = c.get(f"{API}/nodes/localhost/status").data
            alive = [w for w in node["workers"] if w["booted"]]
            if len(alive) == workers or now() > deadline:
                break
            time.sleep(0.1)
        if len(alive) != workers:
            checker.violate("workers alive", f"{len(alive)} of {workers} workers alive{on} at the end")
        for store in drained:
            r = c.get(f"{API}/admin/datastore/{store}/active-operations")
            if r.status == 200 and r.json()["data"] != {"read": 0, "write": 0}:
                checker.violate("operations drain", f"{store}{on}: {r.json()['data']} still active at the end")
    result: dict[str, Any] = node
    return result


# -- a fleet ----------------------------------------------------------------------------------------------


def _run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


async def _import(endpoints: list[str], sections: dict[str, dict[str, Value]]) -> None:
    from ...fleet.admin import import_config
    from ...fleet.etcd import Etcd

    async with Etcd(endpoints, timeout=10.0) as etcd:
        result = await import_config(etcd, FLEET_PREFIX, sections, "stress")
    if result.conflicts or result.imported != len(sections):
        raise RuntimeError(f"stress: imported {result.imported} of {len(sections)} stores into etcd")


async def _etcd_datastores(endpoints: list[str]) -> tuple[int, dict[str, dict[str, Value]]]:
    """etcd's final revision and datastores, decoded as the mirror decodes them."""
    from ...fleet import datastores_prefix
    from ...fleet.etcd import Etcd
    from ...fleet.mirror import decode_all

    prefix = datastores_prefix(FLEET_PREFIX)
    async with Etcd(endpoints, timeout=10.0) as etcd:
        revision, kvs = await etcd.get_prefix(prefix)
    decoded = decode_all(prefix, kvs)
    return revision, {n: s for n, s in decoded.sections.items() if s is not None}


def start_fleet(stack: contextlib.ExitStack, base: Path, opts: StressOptions) -> tuple[EtcdCluster, list[FleetHost]]:
    """The cluster, the initial config imported into it (the file :func:`write_initial_config` wrote
    is its source), and ``opts.fleet`` hosts on ``BASE/hosts``: managers first, then proxies."""
    cluster = stack.enter_context(EtcdCluster(3, base / "etcd"))
    cluster.start()
    config_file = Paths.resolve(base).config_file
    sections = dict(parse(read_raw(config_file), filename=str(config_file)).items())
    _run_async(_import(cluster.endpoints, sections))
    manager_args = [
        "--maintenance-timeout", str(FLEET_MAINTENANCE_TIMEOUT), "--fleet-lease-ttl", str(FLEET_LEASE_TTL),
    ]  # fmt: skip
    fleet = Fleet(
        base / "hosts", cluster.endpoints, FLEET_PREFIX, opts.fleet, workers=opts.workers,
        manager_args=manager_args, ready_timeout=60.0 + opts.stores / 1000,
    )  # fmt: skip
    stack.enter_context(fleet)
    for host in fleet.hosts:
        host.start_manager()
    for host in fleet.hosts:
        host.start_proxy(*PROXY_ARGS)
    return cluster, fleet.hosts


class FleetChaos(threading.Thread):
    """``--chaos heavy`` in a fleet: SIGKILL of an etcd member (the leader half of the time) and of
    a host's manager, each restarted after a moment, logged to ``logs/fleet-chaos.jsonl`` (every
    kill before it is made).  Runs in the runner, which owns the processes; stops before ``stop_at``
    with everything running again."""

    def __init__(
        self, base: Path, cluster: EtcdCluster, hosts: list[FleetHost], seed: int, stop_at: float, rates: dict[str, Any]
    ) -> None:
        super().__init__(name="stress-fleet-chaos", daemon=True)
        self.log = actors.Log(base / "logs" / "fleet-chaos.jsonl")
        self.cluster, self.hosts, self.rates = cluster, hosts, rates
        self.rng = random.Random(seed)
        self.stop_at = stop_at
        self.stopping = threading.Event()

    def _next(self, every: float) -> float:
        return now() + every * (0.5 + self.rng.random())

    def run(self) -> None:
        next_etcd, next_manager = self._next(self.rates["etcd_every"]), self._next(self.rates["manager_every"])
        while now() < self.stop_at - 1.0 and not self.stopping.wait(0.05):
            if now() >= next_etcd:
                self._kill_member()
                next_etcd = self._next(self.rates["etcd_every"])
            if now() >= next_manager:
                self._kill_manager()
                next_manager = self._next(self.rates["manager_every"])
            self.log.write(event="tick", t=now())

    def _kill_member(self) -> None:
        cluster = self.cluster
        try:
            leader = cluster.leader()
        except EtcdHarnessError:
            leader = -1
        victim = leader if leader >= 0 and self.rng.random() < 0.5 else self.rng.randrange(len(cluster.members))
        self.log.write(event="etcd-kill", member=victim, leader=victim == leader, t=now())
        cluster.kill(victim)
        time.sleep(self.rng.uniform(*self.rates["etcd_down"]))
        try:
            cluster.restart(victim)
        except EtcdHarnessError as err:
            self.log.write(event="etcd-restart-failed", member=victim, error=str(err)[:300], t=now())
            return
        self.log.write(event="etcd-up", member=victim, t=now())

    def _kill_manager(self) -> None:
        i = self.rng.randrange(len(self.hosts))
        host = self.hosts[i]
        assert host.manager is not None
        self.log.write(event="manager-kill", host=i, pid=host.manager.pid, t=now())
        os.kill(host.manager.pid, signal.SIGKILL)
        host.manager.wait()
        time.sleep(self.rng.uniform(*self.rates["manager_down"]))
        try:
            host.start_manager()
        except DaemonFailed as err:
            self.log.write(event="manager-restart-failed", host=i, error=str(err)[:300], t=now())
            return
        self.log.write(event="manager-up", host=i, t=now())


def heal(cluster: EtcdCluster, hosts: list[FleetHost]) -> None:
    """Every etcd member and every manager running again (whatever the chaos left behind)."""
    cluster.heal()
    for host in hosts:
        if host.manager is None or host.manager.poll() is not None:
            host.start_manager()


def final_fleet_checks(
    cluster: EtcdCluster, hosts: list[FleetHost], checker: Checker, workers: int, stores: Stores
) -> dict[str, Any]:
    """etcd's datastores and every host's file hold every acknowledged write; every host serves
    etcd's final revision with exactly its datastores (hosts converge); every host's workers alive,
    its operations drained."""
    time.sleep(1.0)
    revision, wanted = _run_async(_etcd_datastores(cluster.endpoints))
    checker.final_config_check(wanted, "etcd")
    drained = _drained(checker, stores)
    for i, host in enumerate(hosts):
        where = host_id(i)
        try:
            host.wait_revision(revision, CONVERGE_TIMEOUT)
            wait_for(
                partial(_mirrors, host, wanted), CONVERGE_TIMEOUT, what=f"{where}'s file to hold etcd's datastores"
            )
        except (AssertionError, OSError, ApiError) as err:
            differ = sorted(set(wanted).symmetric_difference(_mirror(host) or {}))[:5]
            checker.violate("hosts converge", f"{where}: {err} (stores that differ include {differ})")
        checker.final_file_check(host.config_file, f"{where} datastore.cfg")
        try:
            _final_proxy_checks(host.proxy_sock, checker, workers, drained, where)
        except (OSError, ApiError) as err:
            checker.violate("workers alive", f"the proxy of {where} does not answer at the end: {err}")
    return {"generation": None, "revision": revision}


def _mirrors(host: FleetHost, wanted: dict[str, dict[str, Value]]) -> bool:
    return _mirror(host) == wanted


def _mirror(host: FleetHost) -> dict[str, dict[str, Value]] | None:
    try:
        return dict(parse(read_raw(host.config_file), filename=str(host.config_file)).items())
    except Exception:
        return None


# -- the run ----------------------------------------------------------------------------------------------


def _start_actors(base: Path, opts: StressOptions, stop_at: float) -> list[subprocess.Popen[bytes]]:
    chaos = CHAOS[opts.chaos]
    n, hosts = opts.stores, opts.fleet
    commands = [actors.command("client", base, opts.seed + i, stop_at, n, hosts) for i in range(opts.clients)]
    commands.append(actors.command("writer", base, opts.seed, stop_at, n, hosts, chaos["write_pause"]))
    commands.append(
        actors.command("chaos", base, opts.seed, stop_at, n, hosts, chaos["kill_every"], chaos["edit_every"])
    )
    return [subprocess.Popen(cmd) for cmd in commands]


def _follow(procs: list[subprocess.Popen[bytes]], checker: Checker, stop_at: float) -> None:
    """Judge the logs as they grow, with a progress line, until every actor has exited."""
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        checker.poll()
        left = max(0.0, stop_at - now())
        bad = sum(len(v) for v in checker.violations.values())
        print(
            f"\rstress: {left:4.0f} s left, {checker.checked} answers checked, {bad} violations",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    for p in procs:
        if p.returncode:
            checker.violate("no unexpected error", f"a stress process exited with {p.returncode}")


def _load(
    base: Path, opts: StressOptions, checker: Checker, cluster: EtcdCluster | None, hosts: list[FleetHost]
) -> None:
    """The actors (and the fleet chaos) for ``opts.duration`` seconds, judged as they go."""
    stop_at = now() + opts.duration
    procs = _start_actors(base, opts, stop_at)
    rates = FLEET_CHAOS[opts.chaos] if cluster is not None else None
    chaos = None if rates is None or cluster is None else FleetChaos(base, cluster, hosts, opts.seed, stop_at, rates)
    if chaos is not None:
        chaos.start()
    try:
        _follow(procs, checker, stop_at)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if chaos is not None:
            chaos.stopping.set()
            chaos.join(timeout=60)
    checker.poll(final=True)


def run(opts: StressOptions) -> int:
    import json

    base = Path(tempfile.mkdtemp(prefix="dsproxy-stress-"))
    (base / "logs").mkdir()
    stores = Stores(opts.stores)
    checker = Checker(base, write_initial_config(base, stores), opts.fleet)
    try:
        with contextlib.ExitStack() as stack:
            if opts.fleet:
                cluster, hosts = start_fleet(stack, base, opts)
                _load(base, opts, checker, cluster, hosts)
                heal(cluster, hosts)
                node = final_fleet_checks(cluster, hosts, checker, opts.workers, stores)
            else:
                # a worker prewarms every store before it is ready (~1 s per 10,000 here)
                d = stack.enter_context(Daemons(base, opts.workers, stores=0, ready_timeout=60.0 + opts.stores / 1000))
                d.start_manager()
                d.start_proxy(*PROXY_ARGS)
                _load(base, opts, checker, None, [])
                node = final_checks(d, checker, opts.workers, stores)
        summary = _summary(opts, checker, node)
        print_summary(summary)
        if opts.json:
            Path(opts.json).write_text(json.dumps(summary, indent=2) + "\n")
        if checker.violations:
            print(f"stress: FAILED -- logs kept in {base}/logs", file=sys.stderr)
            return 1
        return 0
    finally:
        if not checker.violations and not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


def _summary(opts: StressOptions, checker: Checker, node: dict[str, Any]) -> dict[str, Any]:
    gens = [g for host in checker.gens.values() for _, g in host]
    one = not opts.fleet
    return {
        "duration": opts.duration,
        "chaos": opts.chaos,
        "workers": opts.workers,
        "clients": opts.clients,
        "stores": opts.stores,
        "fleet": opts.fleet,
        "answers_checked": checker.checked,
        "counts": dict(checker.counts),
        "generations": {  # a fleet's generations are each host's own: only their count means something
            "acknowledged": len(gens),
            "first": min(gens, default=None) if one else None,
            "last": max(gens, default=None) if one else None,
            "final": node["generation"],
        },
        **({"etcd_revision": node.get("revision")} if opts.fleet else {}),
        "invariants": list(FLEET_INVARIANTS if opts.fleet else INVARIANTS),
        "violations": {k: {"count": len(v), "example": v[0]} for k, v in checker.violations.items()},
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    fleet = f", a fleet of {summary['fleet']} hosts on 3 etcd members" if summary.get("fleet") else ""
    t = Table(
        title=f"stress: {summary['duration']:g} s, chaos {summary['chaos']}, "
        f"{summary['clients']} clients, {summary['workers']} workers, {summary['stores']:,} stable stores{fleet}"
    )
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_row("answers checked", str(summary["answers_checked"]))
    for k in sorted(summary["counts"]):
        t.add_row(k, str(summary["counts"][k]))
    g = summary["generations"]
    t.add_row("generations acknowledged", str(g["acknowledged"]))
    if g["first"] is not None and g["final"] is not None:
        t.add_row("generation span (first ack -> final)", f"+{g['final'] - g['first']}")
    if summary.get("etcd_revision") is not None:
        t.add_row("etcd revision at the end", str(summary["etcd_revision"]))
    console.print(t)
    v = Table(title="invariants")
    v.add_column("invariant")
    v.add_column("violations", justify="right")
    v.add_column("example")
    for name in summary.get("invariants", INVARIANTS):
        entry = summary["violations"].get(name)
        v.add_row(name, str(entry["count"]) if entry else "0", entry["example"] if entry else "")
    console.print(v)
