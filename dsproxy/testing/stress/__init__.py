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
"""

from __future__ import annotations

import random
import time

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
now = time.monotonic  # every log time is on this clock
