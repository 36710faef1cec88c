"""Per-store invalidation with real daemons: every worker's view is a fresh parse of the file.

A manager and a proxy with two workers serve ~50 stores; a seeded sequence of API writes (creates,
comment updates, maintenance read-only/offline/none, removes) and hand edits of ``datastore.cfg``
(under the config lock, as the stress run's chaos actor makes them; some non-canonical) runs one
step at a time; some steps are bursts of writes while one worker is frozen (SIGSTOP), which then
catches up on several generations at once.  After each step, once every worker serves the shared
generation, each worker is asked -- on a keep-alive connection of its own, told apart by
``x-dsproxy-worker`` -- for the config list, which must equal the file parsed afresh, rendered as
``config_list`` renders it, and for READ and WRITE on the stores in maintenance and a few others,
granted or refused as the file says.

The ring must also have been used: each worker's ``changes-applied`` (node status) grows by one
for every load that applied per-store changes -- every API write except the first after a hand
edit (which the manager publishes as "everything", having re-read the file), and one per burst
for the frozen worker.  Its ``changes-patched`` grows by one for every write that followed one of
the manager's own writes (not a hand edit) and that it applied alone (not the frozen worker's
catch-up): the manager's file record let it read only the changed bytes.  Under
``DSPROXY_DEBUG_DISCARD_CACHES=1`` every load is a full one and both counts stay 0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from dsproxy import registry as registry_mod
from dsproxy.client import Client, Response
from dsproxy.config import MaintenanceMode, config_lock, digest, parse, read_raw, replace_file
from dsproxy.config.splice import edited_names, splice
from dsproxy.daemon.protocol import WORKER_HEADER
from dsproxy.fsutil import make_store
from dsproxy.testing.daemons import frozen
from dsproxy.testing.stores import store_path
from tests.daemons import Daemons, wait_for

API = "/api2/json"
STORES = 50
STEPS = 60
WORKERS = 2
DISCARD = {"DSPROXY_DEBUG_DISCARD_CACHES": "1"}


def _ask(c: Client, pid: int, path: str, method: str = "GET") -> Response:
    r = c.request(method, path)
    assert int(r.headers[WORKER_HEADER]) == pid, "the keep-alive connection moved to another worker"
    return r.raise_for_status()


def _settled(c: Client, pid: int, before: int | None, alone: bool = False) -> int:
    """The shared generation once every worker (``alone``: the one asked) serves it, and it
    moved past ``before``."""

    def check() -> tuple[int] | None:
        node = _ask(c, pid, f"{API}/nodes/localhost/status").data
        gen = node["generation"]
        served = [w["generation"] for w in node["workers"] if not alone or w["pid"] == pid]
        if gen != before and len(served) == (1 if alone else WORKERS) and all(g == gen for g in served):
            return (int(gen),)
        return None

    settled = wait_for(check, timeout=15.0, what=f"every worker to serve a generation after {before}")
    assert settled is not None
    return settled[0]


def _expected(config_file: Path) -> tuple[list[dict[str, Any]], str]:
    """What ``GET /config/datastore`` must answer for the file as it is: a fresh parse."""
    data = read_raw(config_file)
    rendered = [{"name": name, **props} for name, props in parse(data).items()]
    return json.loads(json.dumps(rendered)), digest(data)


def _assert_views(workers: dict[int, Client], config_file: Path, gen: int) -> None:
    expected, file_digest = _expected(config_file)
    for pid, c in workers.items():
        r = _ask(c, pid, f"{API}/config/datastore")
        assert r.generation == gen
        body = r.json()
        assert body["data"] == expected, f"worker {pid} serves another config than the file"
        assert body["digest"] == file_digest


def _assert_decisions(workers: dict[int, Client], config_file: Path, names: list[str]) -> None:
    """The stores' maintenance decisions on every worker are the file's: READ (a status request)
    and WRITE (a lease, dropped again) granted or refused as its ``maintenance-mode`` says."""
    config = parse(read_raw(config_file))
    for name in names:
        text = config[name].get("maintenance-mode")
        mode = "none" if text is None else MaintenanceMode.parse(str(text)).type
        want_read, want_write = (409 if mode == "offline" else 200), (200 if mode == "none" else 409)
        for pid, c in workers.items():
            read = c.get(f"{API}/admin/datastore/{name}/status")
            write = c.request("POST", f"{API}/admin/datastore/{name}/operation", {"operation": "write"})
            assert {int(read.headers[WORKER_HEADER]), int(write.headers[WORKER_HEADER])} == {pid}
            assert (read.status, write.status) == (want_read, want_write), (pid, name, mode, read.body, write.body)
            if write.status == 200:
                lease = write.json()["data"]["lease"]
                _ask(c, pid, f"{API}/admin/datastore/{name}/operation?lease={lease}", "DELETE")


def _hand_edit(d: Daemons, rng: random.Random, step: int) -> None:
    """An admin's edit with a locking editor: a comment, a store added or removed, a layout change."""
    with config_lock(d.paths.lock_file):
        text = read_raw(d.config_file).decode()
        sections = [s for s in text.split("\n\n") if s.strip()]
        kind = rng.randrange(4)
        i = rng.randrange(len(sections))
        uncommented = "\n".join(ln for ln in sections[i].split("\n") if not ln.lstrip().startswith("comment "))
        if kind == 0:  # a comment changed in place
            sections[i] = f"{uncommented}\n\tcomment edited by hand at step {step}"
        elif kind == 1 or len(sections) < 10:  # a store added (laid out as the manager would)
            name = f"hand{step:03d}"
            make_store(store_path(d.paths, name))
            sections.insert(rng.randrange(len(sections) + 1), f"datastore: {name}\n\tpath {d.paths.data_dir}/{name}")
        elif kind == 2:  # a store removed
            del sections[i]
        else:  # a layout the parser accepts but a dump never writes
            sections[i] = uncommented.replace("\tpath", "  path") + f"\n\tcomment  spaced {step}"
        new = "\n\n".join(sections) + "\n"
        if rng.random() < 0.3:
            new = new.replace("\n\n", "\n\n\n", 1)
        replace_file(d.config_file, new.encode())


#: the maintenance updates of a step: (kind, body)
_MAINTENANCE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("read-only", {"maintenance-mode": "read-only"}),
    ("read-only", {"maintenance-mode": "read-only,message=backup%20window"}),
    ("offline", {"maintenance-mode": "offline"}),
    ("none", {"delete": ["maintenance-mode"]}),
)


def _api_write(
    c: Client, rng: random.Random, names: list[str], step: int, transitions: bool = True
) -> tuple[str, Response]:
    """One random write through the proxy: ``(what it was, the answer)``; without ``transitions``
    no ``offline`` (its transition waits for every worker to acknowledge)."""
    op = rng.random()
    if op < 0.3 or len(names) < 5:
        body = {"name": f"api{step:03d}", "comment": rng.choice(["", f"new {step}"])}
        return "create", c.request("POST", f"{API}/config/datastore", body)
    name = rng.choice(names)
    if op < 0.5:
        return "comment", c.request(
            "PUT", f"{API}/config/datastore/{name}", {"comment": f"step {step} {rng.random():.6f}"}
        )
    if op < 0.85:
        kind, body = rng.choice(_MAINTENANCE if transitions else _MAINTENANCE[:2])
        return kind, c.request("PUT", f"{API}/config/datastore/{name}", body)
    return "remove", c.request("DELETE", f"{API}/config/datastore/{name}")


def _configured(config_file: Path) -> list[str]:
    return list(parse(read_raw(config_file)))


def _sample(config_file: Path, rng: random.Random) -> list[str]:
    """The stores in maintenance and four others (the decisions a step may have changed)."""
    config = parse(read_raw(config_file))
    maintained = [name for name, props in config.items() if "maintenance-mode" in props]
    others = [name for name in config if name not in maintained]
    return maintained + rng.sample(others, min(4, len(others)))


def _changes_applied(workers: dict[int, Client]) -> dict[int, tuple[int, int]]:
    """Each worker's ``changes-applied`` and ``changes-patched``; checked against its ``/metrics``."""
    out = {}
    for pid, c in workers.items():
        status = _ask(c, pid, f"{API}/nodes/localhost/status").data
        applied, patched = status["changes-applied"], status["changes-patched"]
        metrics = _ask(c, pid, "/metrics").body.decode()
        assert f'dsproxy_worker_changes_applied_total{{pid="{pid}"}} {float(applied)}' in metrics
        assert f'dsproxy_worker_changes_patched_total{{pid="{pid}"}} {float(patched)}' in metrics
        out[pid] = (applied, patched)
    return out


def _spliceable(before: bytes, after: bytes) -> bool:
    """Whether a worker that loaded ``before`` applies ``after`` as a delta when the ring does not
    name the changes (a hand edit, and the first write after one: both publish "everything"): the
    stores where the texts differ, proven by the splice (dsproxy.registry)."""
    old, new = b"\n" + before, b"\n" + after
    guessed = edited_names(old, new)
    return guessed is not None and splice(old, parse(before), new, guessed) is not None


class _Steps:
    """The seeded steps, each checked once settled, with what each worker's ``changes-applied``
    must have grown by: one per write it applied -- and, for a hand edit and the first write after
    one (the ring says "everything"), one if the edited stores splice (:func:`_spliceable`)."""

    def __init__(self, d: Daemons, workers: dict[int, Client], writer: Client) -> None:
        self.d, self.workers, self.writer = d, workers, writer
        self.rng, self.sample = random.Random(9), random.Random(10)
        self.first, self.second = sorted(workers)
        self.gen = _settled(workers[self.first], self.first, None)
        self.applied = dict.fromkeys(workers, 0)
        self.patched = dict.fromkeys(workers, 0)  # ... of which patched in (the manager's file record)
        self.dirty = False  # a hand edit since the last write: the next one publishes "everything"
        #: the file is the manager's last write (so the next one says how it changed): at first, the
        #: demo stores' creation
        self.stamped = True
        self.text = read_raw(d.config_file)  # what every worker loaded last
        self.hand_edits = self.bursts = self.spliced_edits = 0
        self.frozen: int | None = None
        self.kinds = dict.fromkeys(("create", "comment", "read-only", "offline", "none", "remove"), 0)

    def run(self) -> None:
        self.check()
        for step in range(STEPS):
            choice = self.rng.random()
            if choice < 0.15:
                self.hand_edit(step)
            elif choice < 0.25:
                self.burst(step)
            else:
                self.write(step, self.writer)
            self.gen = _settled(self.workers[self.first], self.first, self.gen)
            self.text = read_raw(self.d.config_file)
            self.check()

    def check(self) -> None:
        _assert_views(self.workers, self.d.config_file, self.gen)
        _assert_decisions(self.workers, self.d.config_file, _sample(self.d.config_file, self.sample))

    def hand_edit(self, step: int) -> None:
        _hand_edit(self.d, self.rng, step)  # the manager's watch publishes it (the step settles on that)
        self.hand_edits += 1
        self.dirty = True
        self.stamped = False
        delta = _spliceable(self.text, read_raw(self.d.config_file))
        self.spliced_edits += delta
        for pid in self.applied:
            self.applied[pid] += delta

    def write(self, step: int, via: Client, transitions: bool = True) -> None:
        before = read_raw(self.d.config_file)
        kind, r = _api_write(via, self.rng, _configured(self.d.config_file), step, transitions)
        assert r.status == 200, (step, kind, r.status, r.body[:300])
        self.kinds[kind] += 1
        delta = not self.dirty or _spliceable(before, read_raw(self.d.config_file))
        for pid in self.applied:
            self.applied[pid] += delta
            self.patched[pid] += self.stamped and pid != self.frozen
        self.dirty = False
        self.stamped = True

    def burst(self, step: int) -> None:
        """A few writes while the second worker is frozen: it catches up on all of them in one load
        (the ring names every store they changed), or one full reload if the first was "everything"."""
        self.bursts += 1
        dirty, applied = self.dirty, self.applied[self.second]
        first, gen = self.workers[self.first], self.gen  # (the step settles after the burst)
        self.frozen = self.second  # (it catches up on several generations: no record says how)
        with frozen(self.second):
            for _ in range(self.rng.randrange(2, 5)):
                self.write(step, first, transitions=False)  # forwarded by the worker that runs
                gen = _settled(first, self.first, gen, alone=True)
            delta = not dirty or _spliceable(self.text, read_raw(self.d.config_file))
        self.frozen = None
        self.applied[self.second] = applied + delta


@pytest.mark.parametrize("mode", ["delta", "discard"])
def test_every_worker_serves_a_fresh_parse_after_each_write_and_hand_edit(tmp_path: Path, mode: str) -> None:
    discard = mode == "discard" or registry_mod.DISCARD_CACHES  # the daemons inherit the test's env
    with Daemons(tmp_path / "base", workers=WORKERS, stores=STORES, env=DISCARD if mode == "discard" else None) as d:
        d.start()
        with d.worker_clients() as workers, d.client() as writer:
            before = _changes_applied(workers)
            steps = _Steps(d, workers, writer)
            steps.run()
            # the seed exercises every kind
            assert steps.hand_edits >= 5 and steps.bursts >= 3 and min(steps.kinds.values()) >= 2, vars(steps)
            assert 0 < steps.spliced_edits < steps.hand_edits, vars(steps)  # both kinds of hand edit
            after = _changes_applied(workers)
    for pid in workers:
        (applied, patched), (applied0, patched0) = after[pid], before[pid]
        if discard:
            assert after[pid] == (0, 0)
        else:  # the ring was used for every write it could be, and the file record for most
            assert applied - applied0 == steps.applied[pid], (pid, before, after, steps.applied)
            assert patched - patched0 == steps.patched[pid], (pid, before, after, steps.patched)
