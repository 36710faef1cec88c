"""The stress run: daemons, actors, the checker's verdict and the summary (``scripts/stress``).

:func:`run` lays out the stable stores (:func:`~dsproxy.testing.stores.write_stores`), starts a
manager + proxy on a temp base dir (:class:`~dsproxy.testing.daemons.Daemons`), runs the actors of
:mod:`.actors` for ``duration`` seconds while the :class:`~.checker.Checker` follows their logs,
then makes the final checks and prints the summary.  Exit status 0 only if every invariant held.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...client import ApiError, Client
from ...paths import Paths
from ..daemons import Daemons
from ..stores import write_stores
from . import API, CHAOS, DEFAULT_STORES, MANUAL, NEVER, VOLATILE, Stores, actors, now
from .checker import Checker

INVARIANTS = (
    "fresh generation",
    "fresh answer",
    "hand edits seen",
    "no lost write",
    "operations drain",
    "workers alive",
    "no unexpected error",
)


@dataclass
class StressOptions:
    duration: float = 30.0
    clients: int = 4
    workers: int = 2
    chaos: str = "light"
    seed: int = 1
    stores: int = DEFAULT_STORES  # stable stores configured (the hand-edited and volatile ones come on top)
    json: str | None = None
    keep: bool = False  # keep the temp dir and its logs even when every invariant held


def write_initial_config(base: Path, stores: Stores) -> dict[str, str]:
    """The stable stores and the hand-edited one, laid out and configured; every store's state."""
    configured = [*stores.stable, MANUAL]
    write_stores(Paths.resolve(base), {name: {"comment": "initial"} for name in configured})
    return dict.fromkeys(configured, "ok") | dict.fromkeys(VOLATILE + NEVER, "absent")


def final_checks(d: Daemons, checker: Checker, workers: int, stores: Stores) -> dict[str, Any]:
    time.sleep(1.0)  # the last leases' connections close; killed workers are replaced
    checker.final_file_check(d.config_file)
    # a store never leased has no operation to drain: asking each of 100,000 would take minutes
    drained = sorted(checker.leased | {*stores.hot(), *VOLATILE, MANUAL})
    try:
        return _final_proxy_checks(d.proxy_sock, checker, workers, drained)
    except (OSError, ApiError) as err:
        checker.violate("workers alive", f"the proxy does not answer at the end: {err}")
        return {"generation": None}


def _final_proxy_checks(sock: str, checker: Checker, workers: int, drained: list[str]) -> dict[str, Any]:
    with Client(sock) as c:
        deadline = now() + 10
        while True:
            node = c.get(f"{API}/nodes/localhost/status").data
            alive = [w for w in node["workers"] if w["booted"]]
            if len(alive) == workers or now() > deadline:
                break
            time.sleep(0.1)
        if len(alive) != workers:
            checker.violate("workers alive", f"{len(alive)} of {workers} workers alive at the end")
        for store in drained:
            r = c.get(f"{API}/admin/datastore/{store}/active-operations")
            if r.status == 200 and r.json()["data"] != {"read": 0, "write": 0}:
                checker.violate("operations drain", f"{store}: {r.json()['data']} still active at the end")
    result: dict[str, Any] = node
    return result


def _start_actors(base: Path, opts: StressOptions, stop_at: float) -> list[subprocess.Popen[bytes]]:
    chaos = CHAOS[opts.chaos]
    n = opts.stores
    commands = [actors.command("client", base, opts.seed + i, stop_at, n) for i in range(opts.clients)]
    commands.append(actors.command("writer", base, opts.seed, stop_at, n, chaos["write_pause"]))
    commands.append(actors.command("chaos", base, opts.seed, stop_at, n, chaos["kill_every"], chaos["edit_every"]))
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


def run(opts: StressOptions) -> int:
    import json

    base = Path(tempfile.mkdtemp(prefix="dsproxy-stress-"))
    (base / "logs").mkdir()
    stores = Stores(opts.stores)
    checker = Checker(base, write_initial_config(base, stores))
    try:
        # a worker prewarms every store before it is ready (~1 s per 10,000 here)
        with Daemons(base, opts.workers, stores=0, ready_timeout=60.0 + opts.stores / 1000) as d:
            d.start_manager()
            # the chaos kills workers on purpose: that is not the crash loop the limit is there for
            d.start_proxy("--graceful-timeout", "2", "--crash-limit", "100000")
            stop_at = now() + opts.duration
            procs = _start_actors(base, opts, stop_at)
            try:
                _follow(procs, checker, stop_at)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            checker.poll(final=True)
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
    gens = [g for _, g in checker.gens]
    return {
        "duration": opts.duration,
        "chaos": opts.chaos,
        "workers": opts.workers,
        "clients": opts.clients,
        "stores": opts.stores,
        "answers_checked": checker.checked,
        "counts": dict(checker.counts),
        "generations": {
            "acknowledged": len(gens),
            "first": min(gens, default=None),
            "last": max(gens, default=None),
            "final": node["generation"],
        },
        "violations": {k: {"count": len(v), "example": v[0]} for k, v in checker.violations.items()},
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    t = Table(
        title=f"stress: {summary['duration']:g} s, chaos {summary['chaos']}, "
        f"{summary['clients']} clients, {summary['workers']} workers, {summary['stores']:,} stable stores"
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
    console.print(t)
    v = Table(title="invariants")
    v.add_column("invariant")
    v.add_column("violations", justify="right")
    v.add_column("example")
    for name in INVARIANTS:
        entry = summary["violations"].get(name)
        v.add_row(name, str(entry["count"]) if entry else "0", entry["example"] if entry else "")
    console.print(v)
