"""The file-descriptor budget: any number of stores within ``RLIMIT_NOFILE`` (issue 9, §3.2).

Every open instance holds one fd, the shared ``fcntl`` lock on ``<path>/.lock``.  A process that
serves more stores than its limit allows used to fail with ``EMFILE`` once the table was full.
Like PostgreSQL's virtual file descriptors (``fd.c``), this module keeps the *open* ones within a
budget and closes the least recently used idle one when a store needs an fd and the budget is
spent; the store's instance stays (path, properties, ``.gc-status``), only its fd goes, and the
next lookup of it reopens the fd and takes the shared lock again.

* **The budget** is :attr:`dsproxy.daemon.limits.FdLimit.budget` of the soft limit now: the limit
  minus a reserve for sockets, pipes, the journal and the config file (256, or half of a smaller
  limit).  It is re-read on every open (one ``getrlimit``, off the hot path), so a library user
  who raises the limit gets the room at once.  If ``open`` still fails with ``EMFILE``/``ENFILE``
  (the process's other fds grew past the reserve), one more idle fd is closed and the open
  retried, as ``fd.c`` does; when none is left the lookup fails with the old ``OutOfDescriptors``.
  A limit at or below the reserve leaves a budget of 0: then there is no budget to keep, fds are
  opened until the kernel refuses (and shed on ``EMFILE``), as before this module; prewarm opens
  nothing.
* **Never an fd in use.**  Closing *any* fd of a file drops all of the process's ``fcntl`` locks
  on it, so an instance is closed only when this process has no operation on the store (its
  counters, the same test eviction uses).  A ``LOOKUP`` handle registers no operation and holds no
  lock; its instance may lose its fd.  When every fd in the budget belongs to a store in use, the
  lookup fails with :class:`FdBudgetExhausted` (503, naming the limit), never a raw ``OSError``;
  the process goes on serving the open stores.
* **Which one goes** -- a clock (second-chance) sweep over a ring in open order
  (an ``OrderedDict``: the hand is its front, "second chance" is ``move_to_end``).  At the hand:
  a store in use is skipped; one used since the hand last passed gets its mark cleared and is
  skipped; the first one with neither is closed.  Two passes at most; a full pass of stores in use
  is the "budget exhausted" answer (PostgreSQL's "no unpinned buffers available").

Prewarm is not a use: a prewarmed instance enters the ring with both marks clear
(:meth:`dsproxy.registry.Registry.prewarm`), so the first miss past a budget filled by prewarm
closes the oldest store nobody has asked for -- marked, all 19,744 prewarmed stores at 100,000
were swept first (0.2-0.9 s on a worker's first requests for stores outside them), and a store
asked for since prewarm lost its fd before them.

The "used" mark costs the hot path nothing.  The fast path of a lookup reads a precomputed
per-store decision (``_Entry.fast`` in :mod:`dsproxy.registry`); the sweep *clears the mark by
resetting that decision*, so the store's next lookup takes the slow path once, which sets the
mark (re-primes the decision).  "Primed" is the used bit.  A lookup that always takes the slow
path (a removable store, an operation its maintenance mode refuses) marks ``Instance.used``.
Measured (1,000 stores, best of 7 ``timeit`` rounds of 200,000
``reg.lookup(name, Operation.WRITE).release()``, before/after alternating in the same minutes):
624-638 ns on main, 625-629 ns with this module (the fast path's bytecode is unchanged); a plain
``entry.used = True`` on the fast path measured 618-736 ns against 618-647 ns without -- in the
noise of this shared machine, but not free, so the decision-reset mark it is.  The price is paid
only past the budget: one slow-path lookup (~2 us) per store per pass of the hand.  Past the
budget a lookup of a closed store (sweep + close + open + ``fstat`` + ``lockf`` + ``.gc-status``)
costs ~14 us (3,001 stores, budget 100); a refused lookup sweeps the whole ring, ~5.5 ms with
3,000 stores in use (linear: ~35 ms at 19,744) -- the price of an exact answer, paid only while
the process is past its limit.

Figures (per process, :meth:`FdPool.stats`): ``budget``, ``open`` (fds held now), ``opens``,
``reopens`` (opens of a store whose fd the budget had closed), ``closes`` (by the budget) and
``refused`` (lookups failed for want of an fd).  Node status, ``/metrics`` and ``dsproxy status``
show the answering worker's.

One pool per process (:data:`POOL`), shared by every :class:`~dsproxy.registry.Registry` in it:
the limit is the process's.  The ring refers to its registries weakly; a forked child starts with
an empty pool (the registry closes the parent's fds in the child).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from .errors import OutOfDescriptors

if TYPE_CHECKING:
    from .instance import Instance


class Owner(Protocol):
    """What the pool asks of a registry about one of its instances."""

    def _fd_busy(self, inst: Instance) -> bool:
        """Does this process have an operation on ``inst``'s store (so its fd must stay)?"""

    def _fd_recent(self, inst: Instance) -> bool:
        """Was ``inst`` used since the hand last passed?  Clears the mark."""

    def _fd_close(self, inst: Instance) -> None:
        """Close ``inst``'s fd (and make its next lookup take the slow path, which reopens)."""


class FdBudgetExhausted(OutOfDescriptors):
    """Every fd of the budget belongs to a store with an active operation (503)."""


def _limit() -> tuple[int, int, int]:
    """``(budget, soft limit, reserve)`` of this process now."""
    from .daemon.limits import check  # late: the daemon package is not needed to import dsproxy

    limit = check(0)
    return limit.budget, limit.soft, limit.reserve


class FdPool:
    """The open lock fds of one process, within a budget (see the module)."""

    def __init__(self, budget: int | None = None) -> None:
        self.fixed = budget  #: a budget that overrides the limit's (tests); None: from RLIMIT_NOFILE
        self._ring: OrderedDict[Instance, weakref.ref[Owner]] = OrderedDict()
        self.opens = self.reopens = self.closes = self.refused = 0

    @property
    def budget(self) -> int:
        return self._limit()[0]

    @property
    def open(self) -> int:
        return len(self._ring)

    def _limit(self) -> tuple[int, int, int]:
        if self.fixed is not None:
            return self.fixed, -1, -1
        return _limit()

    def make_room(self, name: str) -> None:
        """Before opening an fd for ``name``: close idle ones until one more fits the budget."""
        budget, soft, reserve = self._limit()
        while len(self._ring) >= budget > 0:
            if not self.shed():
                self.refused += 1
                raise FdBudgetExhausted(_exhausted(name, len(self._ring), budget, soft, reserve))

    def shed(self) -> bool:
        """Close the least recently used idle fd (clock sweep); False if every one is in use."""
        ring = self._ring
        for _ in range(2 * len(ring)):
            inst, ref = next(iter(ring.items()))
            owner = ref()
            if owner is None:  # its registry is gone without closing: the fd is ours to close
                del ring[inst]
                inst.close()
                self.closes += 1
                return True
            if owner._fd_busy(inst) or owner._fd_recent(inst):
                ring.move_to_end(inst)
                continue
            del ring[inst]
            owner._fd_close(inst)
            self.closes += 1
            return True
        return False

    def add(self, inst: Instance, owner: Owner, reopened: bool = False) -> None:
        """``inst`` holds a freshly opened fd (counted against the budget from now on)."""
        self._ring[inst] = weakref.ref(owner)
        if reopened:
            self.reopens += 1
        else:
            self.opens += 1

    def handover(self, new: Instance, owner: Owner) -> None:
        """``new`` took over the fd of an instance just discarded (a rebuild around the same fd)."""
        self._ring[new] = weakref.ref(owner)

    def discard(self, inst: Instance) -> None:
        """``inst``'s fd was closed by its registry (eviction, close): no longer counted."""
        self._ring.pop(inst, None)

    def stats(self) -> dict[str, int]:
        """The figures of the module docs, with ``limit`` (the soft limit, -1 if fixed) and ``reserve``."""
        budget, soft, reserve = self._limit()
        return {
            "budget": budget,
            "limit": soft,
            "reserve": reserve,
            "open": len(self._ring),
            "opens": self.opens,
            "reopens": self.reopens,
            "closes": self.closes,
            "refused": self.refused,
        }

    def _after_fork(self) -> None:
        self._ring = OrderedDict()
        self.opens = self.reopens = self.closes = self.refused = 0


def _exhausted(name: str, in_use: int, budget: int, soft: int, reserve: int) -> str:
    if soft < 0:
        limit = f"the file-descriptor budget ({budget})"
    else:
        limit = f"the file-descriptor budget (RLIMIT_NOFILE {soft} - {reserve} reserve)"
    return f"datastore '{name}': {in_use:,} datastores are in use in this process, {limit}; raise LimitNOFILE"


#: the pool of this process
POOL = FdPool()

os.register_at_fork(after_in_child=POOL._after_fork)

__all__ = ["POOL", "FdBudgetExhausted", "FdPool", "Owner"]
