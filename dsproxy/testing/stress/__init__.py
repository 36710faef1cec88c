"""The stress run: many clients, config writes, maintenance toggles, hand edits and worker kills at
once, with the invariants of docs/design.md §8 checked against every answer (``scripts/stress`` is its
command line).

:func:`.runner.run` starts a manager + proxy on a temp base dir (:class:`~dsproxy.testing.daemons.Daemons`)
and runs, for ``duration`` seconds, the actors of :mod:`.actors`, each in its own process:

* ``--clients`` client processes: status requests, operation leases (take, hold a moment, drop)
  and config reads, on stable stores, stores that come and go, and names that never exist;
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

import time

API = "/api2/json"
STABLE = [f"st{i:02d}" for i in range(1, 13)]
VOLATILE = [f"vol{i:02d}" for i in range(1, 7)]
NEVER = ["nothere", "gone99"]
MANUAL = "manual01"
HAND_EDIT_DEADLINE = 2.0
CHAOS = {
    # kill a worker every N s, hand edit every N s, writer pause between writes (s)
    "light": {"kill_every": 6.0, "edit_every": 3.0, "write_pause": 0.05},
    "heavy": {"kill_every": 1.5, "edit_every": 1.0, "write_pause": 0.0},
}
now = time.monotonic  # every log time is on this clock
