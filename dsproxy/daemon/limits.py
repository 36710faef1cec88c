"""The file-descriptor limit, honestly (docs/design.md §3.2, §7).

Every process that serves datastores keeps one fd per open store (the shared lock on
``<path>/.lock``), plus a few dozen for sockets, client connections, pipes, the journal and the
config file.  The shipped drop-in asks systemd for ``LimitNOFILE=1048576``, but the kernel caps a
process at its parent's hard limit: in LXC, in many containers and on this project's machine the
hard limit is 20,000, ``systemctl show -p LimitNOFILE`` still says 1048576, and nothing reports the
clamp.  So dsproxy looks for itself:

* :func:`raise_soft_limit` -- at start, the soft limit goes up to the hard one (children inherit
  it); this is all a process may do on its own.
* :func:`check` -- compares what the process has with what the configured stores need
  (``stores * FDS_PER_STORE + FD_RESERVE``) and says what that means: with enough, every store can
  stay open; without, at most ``budget`` stores can be open at once in one process
  (:mod:`dsproxy.fdbudget` closes the least recently used idle ones and reopens them on use), and
  only more than ``budget`` operations on different stores at once get an error (503).
* :func:`check_at_start` -- the proxy master's and the manager's start: raise, count the store
  sections of the config, log the facts once (a warning with every number when short).  It counts
  the section headers (one regular expression over the bytes: ~15 ms for the 14 MB file of 100,000
  stores) instead of parsing the file (0.8 s alone, 2.4 s on the loaded machine, in the proxy
  master before it forks any worker: on the cold start's path); the workers report the parsed
  count in node status.

Workers report the same facts in node status (``rlimit-nofile``), so ``dsproxy status`` shows
them; the budget is what :mod:`dsproxy.fdbudget` keeps the open stores within (a limit of 300
leaves 44; one at or below the reserve leaves none: then stores are opened until the kernel says
no, as before the budget).
"""

from __future__ import annotations

import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import read_raw
from ..errors import DatastoreError

if TYPE_CHECKING:
    from ..registry import Registry

FDS_PER_STORE = 1
#: fds a serving process needs besides its stores: listening and client sockets, pipes, the
#: journal, the config file and its lock, the shared memory
FD_RESERVE = 256


@dataclass(frozen=True)
class FdLimit:
    soft: int
    hard: int
    stores: int

    @property
    def needed(self) -> int:
        return self.stores * FDS_PER_STORE + FD_RESERVE

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed

    @property
    def reserve(self) -> int:
        """The fds kept for everything but stores (:data:`FD_RESERVE`)."""
        return FD_RESERVE

    @property
    def budget(self) -> int:
        """Stores that can be open at once in one process (the limit minus the reserve)."""
        return max(0, (self.soft - self.reserve) // FDS_PER_STORE)

    def describe(self) -> str:
        have = f"RLIMIT_NOFILE {self.soft}/{self.hard} (soft/hard)"
        need = f"{self.needed} needed for {self.stores} datastores ({FDS_PER_STORE} each + {FD_RESERVE} reserve)"
        if self.enough:
            return f"{have}: enough, {need}"
        return (
            f"{have} is below the {need}: at most {self.budget} datastores can be open at once per process; "
            f"the least recently used idle ones are closed and reopened on their next lookup (slower), and "
            f"lookups beyond {self.budget} operations at once fail with 503. Raise LimitNOFILE (the drop-in "
            f"dsproxy-proxy.service.d/10-limits.conf asks for 1048576; a container's own hard limit caps it: "
            f"raise that on the host)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "soft": self.soft,
            "hard": self.hard,
            "stores": self.stores,
            "needed": self.needed,
            "reserve": self.reserve,
            "budget": self.budget,
            "enough": self.enough,
        }


def raise_soft_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft, hard
    return soft, hard, hard


def check(stores: int) -> FdLimit:
    """This process's limit against ``stores`` configured datastores."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FdLimit(soft, hard, stores)


def of_registry(registry: Registry) -> FdLimit:
    """:func:`check` for the stores ``registry`` serves (0 while its config cannot be read)."""
    try:
        stores = len(registry.config()[0])
    except DatastoreError:
        stores = 0
    return check(stores)


#: a section header: ``datastore:`` at the start of a line (the parser's headers start there too)
_HEADER = re.compile(rb"^datastore[ \t]*:", re.MULTILINE)


def count_sections(data: bytes) -> int:
    """How many sections ``data`` (a ``datastore.cfg``) has, without parsing it: its header lines.
    For a file that parses this is its store count (a name given twice counts twice)."""
    return len(_HEADER.findall(data))


def check_at_start(config_file: os.PathLike[str], log: logging.Logger, stores: int | None = None) -> FdLimit:
    """Raise the soft limit, compare with the config's store count (``stores`` if the caller
    knows it, else its header lines), log it (a warning if short)."""
    before, soft, hard = raise_soft_limit()
    if stores is None:
        try:
            stores = count_sections(read_raw(config_file))
        except OSError:
            stores = 0  # the config's own error is reported where it is loaded
    limit = FdLimit(soft, hard, stores)
    fields = {f"DSPROXY_NOFILE_{k.upper()}": v for k, v in limit.as_dict().items()}
    raised = f" (soft raised from {before})" if before != soft else ""
    if limit.enough:
        log.info("%s%s", limit.describe(), raised, extra=fields)
    else:
        log.warning("%s%s", limit.describe(), raised, extra=fields)
    return limit


__all__ = ["FDS_PER_STORE", "FD_RESERVE", "FdLimit", "check", "check_at_start", "of_registry", "raise_soft_limit"]
