"""The stress run: many clients, config writes, maintenance toggles, hand edits and worker kills at
once, with the invariants of docs/design.md §8 checked against every answer (``scripts/stress`` is its
command line).

:func:`.runner.run` starts a manager + proxy on a temp base dir (:class:`~dsproxy.testing.daemons.Daemons`)
and runs, for ``duration`` seconds, the actors of :mod:`.actors`, each in its own process:

* ``--clients`` client processes: status requests, operation leases (take, hold a moment, drop)
  and config reads, on stable stores, stores that come and go, and names that never exist;
  ``--stores N`` configures N stable stores (12 by default) -- beyond :data:`HOT` of them, half of
  the picks of a stable store go to the first :data:`HOT` (so that each store's history is still
  checked by many answers) and half to any of the N (see :class:`Stores`);
* a writer: comment updates, maintenance toggles (none / read-only / offline) and create/remove of
  the volatile stores, through the API; each acknowledged write is logged with the generation it
  produced and the time its answer arrived;
* chaos: SIGKILL of a random worker and hand edits of ``datastore.cfg`` (under the config lock,
  as ``vipw`` would), more of both with ``--chaos heavy``.

Every process appends JSON lines to its own log; :class:`.checker.Checker` reads them as they
grow (the progress line shows violations so far) and once more at the end.  Invariants:

1. **fresh generation**: an answer to a request sent after a write was acknowledged carries a
   generation (``x-dsproxy-generation``) no older than the one that write produced;
2. **fresh answer**: the answer (200 / 404 / 409) is one that a state of the store between the last
   acknowledgement before the request and the answer's arrival allows -- so after an offline
   transition returns, no new READ/WRITE is granted, and a removed store is gone;
3. **hand edits seen**: a hand edit is visible to every request sent 2 s after it (manager running);
4. **no lost write**: at the end the file parses and holds every store's last acknowledged state
   and the last hand edit;
5. **operations drain**: at the end every store's active-operation totals are zero;
6. **workers alive**: at the end the proxy has all its workers, booted;
7. **no unexpected error**: no 5xx, no refused write other than the expected ones, no connection
   error except on a connection to a worker that was just killed.

**Fleet mode** (``--fleet N``, :mod:`dsproxy.fleet`): a 3-member etcd cluster
(:class:`~dsproxy.testing.etcd.EtcdCluster`) and N hosts (:class:`~dsproxy.testing.fleet.Fleet`,
``BASE/hosts/hostI``, :func:`host_dirs`), the stable stores imported into etcd.  Each client sends
each request to a random host (one connection per host), the writer each write to a random host,
the chaos actor kills workers and hand-edits the file of random hosts; with ``--chaos heavy`` the
runner also SIGKILLs etcd members (the leader half of the time) and host managers and restarts them
after a moment (:data:`FLEET_CHAOS`).  What each invariant means with several hosts
(:mod:`.checker`):

1. **fresh generation**, per host: generations are a host's own, so an answer from host X is judged
   against the writes acknowledged *by X*;
2. **fresh answer**: a write acknowledged on host X is in effect on X for every request sent after
   its answer; a fleet-wide transition (``offline``: its answer waits for every live host) for every
   request sent after its answer *to any host* -- except hosts its answer names as lagging and
   hosts whose manager was down from :data:`FLEET_GRACE` s before the write until its answer (no
   longer a live host: not waited for).  A plain write acknowledged on another host may not be
   there yet (its watch event is in flight): any state from the last write in effect on X onward;
3. **hand edits undone** (instead of "seen"): an edit of host X's file is never visible on another
   host, and on X not longer than 2 s after it was made (counted from the restart, when X's manager
   was down then); at the end every host's file and etcd hold the store's etcd text;
4. **no lost write**: at the end etcd's datastores AND every host's file hold each store's last
   acknowledged state;
5. **operations drain** and 6. **workers alive**: on every host;
7. **no unexpected error**: what a fleet may refuse is expected -- a write on a host whose mirror
   was behind (409 "changed on another host", or a create/remove that the host's state refuses),
   503 from a host whose manager was down or while etcd members were down (a write cut off so is
   possibly applied);
8. **hosts converge**: at the end every host's workers serve etcd's final revision and every host's
   file holds exactly etcd's datastores.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

API = "/api2/json"
DEFAULT_STORES = 12
HOT = 12  # with more stable stores than this, half the picks go to the first HOT


def stable_names(count: int = DEFAULT_STORES) -> list[str]:
    """The stable stores of a run with ``count`` of them: st01... (wider names past 99)."""
    width = max(2, len(str(count)))
    return [f"st{i:0{width}d}" for i in range(1, count + 1)]


STABLE = stable_names()
VOLATILE = [f"vol{i:02d}" for i in range(1, 7)]
NEVER = ["nothere", "gone99"]
MANUAL = "manual01"
MANUAL_COMMENT = "initial"  # its comment as configured (and, in a fleet, as etcd keeps it)


class Stores:
    """The stores of one run: ``count`` stable ones, :data:`VOLATILE`, :data:`NEVER`, :data:`MANUAL`.

    With the default count every pick is uniform, as it always was; past :data:`HOT` stable stores
    the categories keep the proportions they have at the default count (12 stable : 6 volatile :
    2 never : 1 manual), and a stable pick is from the hot ones or from all, half and half."""

    def __init__(self, count: int = DEFAULT_STORES) -> None:
        self.stable = stable_names(count)
        self.others = [*VOLATILE, *NEVER, MANUAL]

    def stable_one(self, rng: random.Random) -> str:
        if len(self.stable) <= HOT or rng.random() < 0.5:
            return rng.choice(self.stable[:HOT])
        return rng.choice(self.stable)

    def any_one(self, rng: random.Random) -> str:
        """Any store a client may ask for (stable, volatile, never there, hand-edited)."""
        if len(self.stable) <= HOT:
            return rng.choice(self.stable + self.others)
        i = rng.randrange(HOT + len(self.others))
        return self.stable_one(rng) if i < HOT else self.others[i - HOT]

    def hot(self) -> list[str]:
        return self.stable[:HOT]


HAND_EDIT_DEADLINE = 2.0
CHAOS = {
    # kill a worker every N s, hand edit every N s, writer pause between writes (s)
    "light": {"kill_every": 6.0, "edit_every": 3.0, "write_pause": 0.05},
    "heavy": {"kill_every": 1.5, "edit_every": 1.0, "write_pause": 0.0},
}
# fleet mode (--fleet N): what the runner kills with --chaos heavy, besides workers and hand edits:
# an etcd member (the leader half of the time) every N s, down for a moment; a host's manager likewise
FLEET_CHAOS = {
    "light": None,
    "heavy": {"etcd_every": 4.0, "etcd_down": (0.2, 1.5), "manager_every": 4.0, "manager_down": (0.1, 3.0)},
}
FLEET_PREFIX = "/stress"
FLEET_LEASE_TTL = 10  # s: a killed manager's key outlives its restart, so its host is named lagging
FLEET_MAINTENANCE_TIMEOUT = 2.0  # s a fleet-wide transition (or a remove's question) waits for a host
FLEET_GRACE = 2.0  # s before a write during which a manager that was down exempts its host (see above)
now = time.monotonic  # every log time is on this clock


def host_dirs(base: Path, hosts: int) -> list[Path]:
    """Each host's base dir: the run's own with one manager + proxy (``hosts == 0``), else
    ``BASE/hosts/hostI`` (fleet mode: :class:`~dsproxy.testing.fleet.Fleet` on ``BASE/hosts``)."""
    return [base] if hosts == 0 else [base / "hosts" / f"host{i}" for i in range(hosts)]
