"""The shared-memory segment: generation counters, process slots, operation counters.

Design note
===========

Every dsproxy process of one instance (manager, proxy master, workers, library users) maps one
POSIX shared-memory segment.  Its name derives from the instance's run directory
(``/dsproxy.<sha256(realpath(run_dir))[:24]>``), so two instances -- and parallel tests -- never
share one.  Next to it, ``<run_dir>/shm.lock`` is the *writers' lock* (see "Locks" below).

Layout (version 3; little-endian; every field a u64 unless noted; offsets in bytes; S = the
store-table size, a power of two in 65,536..2**21 named by the header; a unit test pins all of
them)::

    0         header, one page
      0         magic, 8 bytes  b"DSPXSHM1"
      8         layout version (3)
      16        segment size in bytes (segment_size(S))
      24        state: 1 = active, 2 = retired (a newer segment replaced this one; reopen)
      32        number of process slots (128)
      40        number of store entries (S)
      48        creation time, unix ns
      56        pid of the creator
      64        number of ring entries (4096)
      72        ring head: ring entries ever written
      80        the fleet record, 6 words (all 0 outside fleet mode; "The fleet record"):
                  80 sequence (seqlock: odd while written)   88 etcd revision served
                  96 the generation that revision was published under   104 state (1 connected,
                  2 disconnected, 3 fenced)   112 disconnected since (unix ms, 0 while connected)
                  120 hand edits refused
      128       generation counters, 16 words: [0] datastore, [1] token, [2] ACL, [3..15] reserved
    4096      process slots, 128 x 128 bytes, word index within a slot:
      0 pid (0 = free)   1 start time (ticks, /proc field 22)   2 role   3 booted
      4 heartbeat (CLOCK_MONOTONIC ns)   5 generation of the config this process serves
      6 lookups   7 cache hits   8 slow-path reloads   9 config errors (the registry's)
      10 lookup errors (the daemon's)   11 origin (k + 1: moved over from slot k)   12..15 reserved
    20480     invalidation ring, 4096 x 64 bytes: u64 sequence (k + 1 for entry number k, 0 while
              written), u64 generation it produced, u64 kind (1 created, 2 updated, 3 removed,
              4 everything), 40-byte NUL-padded store name
    282624    store-name table, S x 48 bytes: u64 tag (0 = empty), 40-byte NUL-padded name
    282624 + 48 S   operation counters, one 16 S-byte block per slot: S stores x (read, write)
    282624 + 48 S + 2048 S   end (sparse on tmpfs: only touched pages cost memory; 131 MiB of
              address space at S = 65,536, 512 MiB at S = 262,144 -- 100,000 stores)

Who writes what
---------------
* Generation counters: bumped by the manager after every config write, and by any process whose
  slow path finds the file changed by hand under an unchanged generation.  Bumps hold the writers'
  lock (read-modify-write).  They are compared for equality only; wraparound is harmless.
* A slot's identity words (pid, start, role) are written by the process that claims it, under the
  writers' lock, pid last.  A slot whose process is dead (pid gone, zombie, or another start time)
  is reclaimed by whoever notices; claiming zeroes the slot's counter block (hole punch).
* A slot's status words (booted, heartbeat, served generation, statistics) and its operation
  counters are written **only by the owning process**, without a lock: one writer per word.
  Totals are sums over live slots, so a dead process's operations vanish with it.  Only this
  module indexes slot words: owners write them through :meth:`Segment.acknowledge`,
  :meth:`~Segment.publish_stats`, :meth:`~Segment.beat` and :meth:`~Segment.set_booted`, and
  everyone reads them as :class:`SlotInfo` snapshots (:meth:`~Segment.slots`,
  :meth:`~Segment.heartbeats`).
* The store-name table maps a datastore name to the index of its counters in every block.  Entries
  are added under the writers' lock (name bytes first, tag last) and never removed, so readers probe
  it without a lock.  (How it still never runs out: "Store names" below.)
* The fleet record is written by the manager only (:meth:`Segment.publish` with a ``revision``,
  :meth:`Segment.set_fleet`), under the writers' lock.
* The invalidation ring and its head are written by :meth:`Segment.publish` only (the manager's
  writes and its hand-edit watch), under the writers' lock, together with the bump.

Ordering rules
--------------
* *Publish after write*: the manager replaces ``datastore.cfg`` (rename, directory fsync), then
  bumps the generation.
* *Read the generation before the file*: a config cached under generation G is never older than
  the file at the time G was published.
* Hot-path reads are plain aligned 8-byte loads through ``memoryview.cast('Q')`` (~35-50 ns, one
  ``memcpy`` of 8 bytes, untearable on x86-64 and ARMv8).  No lock is taken on a lookup.
* *Registration vs. maintenance*: a lookup increments its own counter and **then** re-reads the
  generation; if it moved, it undoes the increment and starts over.  A maintenance transition bumps
  the generation and then waits until every live slot's *served generation* equals the new one.
  A process stores its served generation only after it has loaded that config, so by TSO store
  order every operation it granted under the old config is visible in its counters before the
  acknowledgement is; and every lookup after the acknowledgement checks the new config.  So once the
  wait returns, the counted operations are exactly the ones that can still be running, and no new
  READ/WRITE is granted.  (A process that does not acknowledge within the timeout is reported.)

The invalidation ring
---------------------
With each bump the manager records what changed, one entry per store, in a ring of 4,096 entries
(PostgreSQL's ``sinvaladt.c`` is the model): entries first, then the head, then the generation
(publish after write).  A reader whose cached generation is G and who read N asks
:meth:`Segment.changes_since`: it walks back from the head, takes each entry only if its sequence
word names it before and after the read (a seqlock: an entry being written or overwritten by the
next lap is refused), stops at the first entry older than G+1, and answers the set of names only
if every generation G+1..N had an entry and none says "everything" -- else None, and the reader
reloads the whole file.  A bump without entries (a registry that noticed a hand edit, a retired
segment) leaves a gap, so it also means a full reload.  The ring is a hint: what the registry
does with it is verified against the file (:mod:`dsproxy.config.splice`), so garbage in the ring
can cost a full reload, never a wrong answer; its words are range-checked all the same.

The fleet record
----------------
In fleet mode (``dsproxy manager --etcd``, :mod:`dsproxy.fleet.mirror`) the configuration is a
mirror of etcd, and a worker says which etcd revision it serves (``x-dsproxy-revision``, status,
metrics) without ever claiming a newer one.  The manager writes ``(revision, generation)`` *inside*
:meth:`Segment.publish`, before the generation word: a process that loaded generation G and then
reads the record finds G in it -- or a later generation, when the manager published again
meanwhile; it then keeps the revision it knew for an earlier generation (older than what it
serves: a lower bound, never a claim too new).  A watch batch without datastore changes moves the
revision of the current generation forward without a bump (the config at it is the same).  The
record is a seqlock: the writer makes the sequence odd, writes the words, makes it even again; a
reader takes the words only when the sequence is even, non-zero and the same before and after.
Its words are range-checked like every other (revision below 2**63, a known state, times and
counts below 2**53); a torn or garbage record reads as "no fleet information", and the manager's
contents check reports garbage in it so that the segment is replaced.

Store names
-----------
The manager sizes the table for the configuration: :func:`table_size` (a power of two, at least
twice the configured stores -- linear probing stays short below half load -- at least 65,536),
from the file at start.  Names are never removed, so create/remove churn and hand edits fill it
with dead names; the manager moves everyone to a new segment (:func:`move_size`: when the
configured stores need a larger table, when it is three quarters full, or more than half full
with mostly dead names) through the replace-and-retire path of "Failure handling".  A moving
process claims its new slot with its held operations already in its counters and its old slot as
the slot's *origin*, and frees the old slot after (:meth:`Segment.claim_slot`); the manager keeps
the old mapping while anyone still counts there and sums both (:func:`moving_totals`: old slots
first, then new ones, an old slot that a new one names as its origin counted once, in the new
one), so a remove or a maintenance transition during a move counts every operation exactly once;
a registry that moved does the same for its ``active_operations``.  A mapping that is retired
checks as retired even once the name holds the new object: it moves, it does not run degraded.
A handle from before the move is released against the counter its operation moved to.  Past
2**21 entries (a million configured stores) the table does not grow: creates still work, but
lookups of names that find no room fail with "store table is full".

Locks
-----
The writers' lock is ``flock`` on ``<run_dir>/shm.lock``.  The POSIX semaphore would be cheaper
(~0.2 us against ~1.5 us) but the kernel does not release it when its holder dies, and every writer
here is off the hot path (bumps, slot claims, name-table inserts, segment creation), so the cost
does not matter and ``flock``'s robustness does: a holder SIGKILLed inside any critical section
releases the lock with its last fd, and the half-done work is harmless by construction (pid is
written last on a claim, tag last on a name insert, a bump is a single store).  Acquisition is
polled with ``LOCK_NB`` under a timeout, so a wedged peer (e.g. SIGSTOP) produces a clear error
instead of a hang.  The hot path takes no lock at all, so dsproxy needs no semaphore.

Failure handling
----------------
* Missing segment: a library user creates it (race-free: creation happens under the writers' lock,
  the magic is written last); a daemon worker refuses to create and runs degraded.
* Foreign magic, unknown layout version, wrong size or a truncated object: :class:`SegmentError`
  names what was found.  The process runs *degraded*: no caching, every lookup reads the file --
  correct and slow, never stale.  Only the manager replaces such a segment (:func:`recreate`):
  it marks an old segment of ours as retired and bumps its generations (so every process takes its
  slow path and reopens), then unlinks the name and creates a new segment.  Nothing ever shrinks or
  truncates a mapped segment, because touching a mapping past its new end kills with SIGBUS.
* Generations of a new segment start at a value derived from the clock, so a process can never
  mistake a counter of a new segment for the one it cached from the old.

Untrusted contents
------------------
The segment is writable by every process of the proxy's user and group, so a compromised or
buggy one can write anything anywhere in it.  No word read from it is used before it is
range-checked, and garbage never crashes a reader or turns into a 500:

* A claimed slot (pid != 0) is *sound* when its pid lies in ``1..PID_MAX`` (2**22, the kernel's
  ceiling of ``pid_max``), its start time is not later than the boot clock now (+1 h), its role
  is a :class:`Role`, its booted flag 0 or 1, its heartbeat not later than the monotonic clock
  now (+1 h), its statistics below 2**53 and its reserved words zero.  Generations are only
  compared, so any value is fine there.  Readers (:meth:`Segment.claimed_slots`,
  :meth:`~Segment.slots`, :meth:`~Segment.active_operations`, slot claims, the master's heartbeat
  watch) treat an unsound slot as garbage: not alive, its counters ignored, free to be claimed.
  Liveness is asked of the kernel only for a sound pid (``os.kill`` raises on a u64).
* An operation count is sound below 2**48; a live slot with a larger one is left out of the
  totals.  A process whose *own* counter overflows on ``+= 1`` gives its slot up and runs
  degraded until its next check claims a fresh one (the hot path pays nothing for this: a
  ``try`` costs nothing in 3.11 until it raises).
* A store-table entry is sound when its tag is 0 or ``crc32(name) << 1 | 1`` with a non-empty
  NUL-padded name.  Readers need no check: a probe compares tag and name bytes and its index is
  reduced modulo the table size, so garbage can at worst cost a miss or a counter shared by
  mistake, never an index outside the table.

:meth:`Segment.check` with ``contents`` (the manager's, every 0.5 s) looks for such garbage
itself and reports it as a ``garbage`` problem, which makes the manager replace the segment
through the same retire/recreate path as a scribbled header -- the segment heals without a
restart.  It stays cheap whatever the table size, ~1 ms (``tests/unit/test_shm_layout.py``
bounds it): the slot area is one 16 KiB copy; the store table is read one window of 65,536
entries (3 MiB: all of the smallest table) per call, round robin, with one ``preadv`` into a
buffer kept for the next call (a read does not fill tmpfs holes as touching the mapping would,
and a kept buffer has no fresh pages to fault in), range-checked a byte column at a time with
``bytes`` slicing and big-integer masks, and skipped by a ``memcmp`` when unchanged since it was
last found sound; tags are recomputed from names 256 entries per call until all were since the
last change; one window of one operation-counter block (65,536 stores, 1 MiB) of a claimed slot
is read per call, round robin.  Reading the whole 12 MiB table of 100,000 stores each call was
~4 ms on a quiet machine and 8-10 ms in the loaded manager -- in the writer thread, so a write
that came during it waited; now a scribble there is found within 4 calls (2 s) instead of 1.  A
find is confirmed under the writers' lock before it is reported, since a claim in progress can
look torn to a reader without the lock.  Workers and the master check only the header (what
makes their mapping unusable) and skip garbage as above until the replacement arrives.
"""

from __future__ import annotations

import array
import contextlib
import enum
import hashlib
import mmap
import os
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

import posix_ipc

from . import flock
from .proc import PID_MAX, Liveness, is_alive, start_time, start_time_limit, valid_pid

if TYPE_CHECKING:
    from .opfile import FileCounters

MAGIC: Final = b"DSPXSHM1"
# 2: the daemon's lookup errors got a word of their own (10)
# 3: the invalidation ring; a store table sized for the configuration; a slot's origin word (11)
LAYOUT_VERSION: Final = 3
STATE_ACTIVE: Final = 1
STATE_RETIRED: Final = 2

PAGE: Final = 4096
# header fields (byte offsets)
OFF_MAGIC: Final = 0
OFF_VERSION: Final = 8
OFF_SIZE: Final = 16
OFF_STATE: Final = 24
OFF_MAX_SLOTS: Final = 32
OFF_MAX_STORES: Final = 40
OFF_CREATED: Final = 48
OFF_CREATOR: Final = 56
OFF_RING_SIZE: Final = 64
OFF_RING_HEAD: Final = 72
OFF_FLEET: Final = 80  # the fleet record (see "The fleet record"), word index within it:
FLEET_SEQ: Final = 0
FLEET_REVISION: Final = 1
FLEET_GENERATION: Final = 2
FLEET_STATE: Final = 3
FLEET_DISCONNECTED: Final = 4
FLEET_HAND_EDITS: Final = 5
FLEET_WORDS: Final = 6
OFF_GENERATIONS: Final = 128
NUM_GENERATIONS: Final = 16
GEN_DATASTORE: Final = 0
GEN_TOKEN: Final = 1
GEN_ACL: Final = 2  # user.cfg + acl.cfg (GEN_TOKEN: token.shadow); both bumped by dsproxy.auth.writer

MAX_SLOTS: Final = 128
SLOT_SIZE: Final = 128
OFF_SLOTS: Final = PAGE
# slot fields (word index within a slot)
SLOT_PID: Final = 0
SLOT_START: Final = 1
SLOT_ROLE: Final = 2
SLOT_BOOTED: Final = 3
SLOT_HEARTBEAT: Final = 4
SLOT_GENERATION: Final = 5
SLOT_LOOKUPS: Final = 6  # lookups served (a daemon worker's; the same figure in status and metrics)
SLOT_CACHE_HITS: Final = 7  # lookups answered without a reload
SLOT_RELOADS: Final = 8  # slow-path loads of the config (the registry's)
SLOT_CONFIG_ERRORS: Final = 9  # the registry's: the config file could not be read or parsed
SLOT_LOOKUP_ERRORS: Final = 10  # the daemon's: lookups answered with an error
SLOT_ORIGIN: Final = 11  # k + 1: the slot carries the operations of slot k of the retired segment; 0: fresh
SLOT_WORDS: Final = SLOT_SIZE // 8

# the invalidation ring: what each generation bump changed (see "The invalidation ring")
RING_SIZE: Final = 4096
RING_ENTRY_SIZE: Final = 64
OFF_RING: Final = OFF_SLOTS + MAX_SLOTS * SLOT_SIZE
RING_SEQ: Final = 0  # word index within an entry: k + 1 once entry number k is complete; 0 while written
RING_GENERATION: Final = 1  # the generation the change produced
RING_KIND: Final = 2  # a ChangeKind
OFF_RING_NAME: Final = 24  # byte offset within an entry: the store name, NUL-padded to NAME_BYTES

NAME_ENTRY_SIZE: Final = 48
NAME_BYTES: Final = 40
OFF_NAMES: Final = OFF_RING + RING_SIZE * RING_ENTRY_SIZE
#: the smallest store table, and the default of a segment created without a store count
MAX_STORES: Final = 65536
#: the largest store table (4 GiB of sparse counters): 1,048,576 configured stores at half load
STORES_LIMIT: Final = 2**21
COUNTER_BLOCK_SIZE: Final = MAX_STORES * 16  # of a default-sized segment; see Segment.block_size
OFF_COUNTERS: Final = OFF_NAMES + MAX_STORES * NAME_ENTRY_SIZE  # of a default-sized segment
SEGMENT_SIZE: Final = OFF_COUNTERS + MAX_SLOTS * COUNTER_BLOCK_SIZE  # of a default-sized segment

MASK64: Final = (1 << 64) - 1
WRITER_LOCK_TIMEOUT: Final = 10.0


def table_size(stores: int) -> int:
    """The store-table size for ``stores`` configured stores: a power of two, at least twice the
    count (linear probing stays short below half load), at least :data:`MAX_STORES`."""
    size = MAX_STORES
    while size < 2 * stores and size < STORES_LIMIT:
        size *= 2
    return size


def segment_size(stores: int) -> int:
    """Bytes of a segment whose store table has ``stores`` entries."""
    return OFF_NAMES + stores * NAME_ENTRY_SIZE + MAX_SLOTS * stores * 16


def _sound_table_size(stores: int) -> bool:
    return MAX_STORES <= stores <= STORES_LIMIT and stores & (stores - 1) == 0


# bounds of the words a reader range-checks (see "Untrusted contents" in the module essay)
STAT_LIMIT: Final = 2**53  # lookups, cache hits, reloads, errors: 10**6/s for 280 years
OPERATIONS_LIMIT: Final = 2**48  # one process's operations on one store (fds run out long before)
CLOCK_MARGIN: Final = 3600.0  # seconds a start time or heartbeat may lie ahead of this process's clock
NAME_CRC_WINDOW: Final = 256  # store-table entries whose tag :meth:`Segment.check` recomputes per call
NAME_CHECK_WINDOW: Final = 65536  # store-table entries :meth:`Segment.check` reads per call (3 MiB)
COUNTER_CHECK_WINDOW: Final = 65536  # operation counter pairs of one block it reads per call (1 MiB)


class ChangeKind(enum.IntEnum):
    """What one invalidation-ring entry says of its store (a layout value)."""

    CREATED = 1
    UPDATED = 2
    REMOVED = 3
    EVERYTHING = 4  # a hand edit, or more changes than the ring holds: reload the whole file


_KINDS: Final = frozenset(int(k) for k in ChangeKind)


class Role(enum.IntEnum):
    """What a slot's process is (a layout value: 2, once the master's, is never claimed)."""

    MANAGER = 1
    WORKER = 3
    LIBRARY = 4


_ROLES: Final = frozenset(int(r) for r in Role)


class FleetState(enum.IntEnum):
    """The manager's link to etcd in fleet mode (a layout value of the fleet record)."""

    CONNECTED = 1
    DISCONNECTED = 2  # serving the last mirror, config writes refused
    FENCED = 3  # disconnected past the lease: ``--fleet-fencing offline`` took every store offline
    #: connected, but another live manager runs with this ``--host-id``: config writes refused
    DUPLICATE = 4


_FLEET_STATES: Final = frozenset(int(s) for s in FleetState)
#: the states in which the manager reaches etcd (no disconnected-since)
CONNECTED_STATES: Final = frozenset({FleetState.CONNECTED, FleetState.DUPLICATE})
REVISION_LIMIT: Final = 2**63  # etcd revisions are int64


class FleetRecord(NamedTuple):
    """What the fleet record says (:meth:`Segment.fleet`)."""

    revision: int  #: the etcd revision of the config published under ``generation``
    generation: int
    state: FleetState
    disconnected_since: float | None  #: unix time, while not connected
    hand_edits: int  #: hand edits of datastore.cfg the manager refused (and undid)

    @property
    def connected(self) -> bool:
        return self.state in CONNECTED_STATES


def _fleet_garbage(v: Sequence[int]) -> str | None:
    """What is wrong with the fleet record's words ``v`` (sequence even and non-zero), or None."""
    if v[FLEET_REVISION] >= REVISION_LIMIT:
        return f"revision {v[FLEET_REVISION]} out of range"
    if v[FLEET_STATE] not in _FLEET_STATES:
        return f"unknown state {v[FLEET_STATE]}"
    connected = v[FLEET_STATE] in CONNECTED_STATES
    if v[FLEET_DISCONNECTED] >= STAT_LIMIT or (connected and v[FLEET_DISCONNECTED]):
        return f"disconnected-since {v[FLEET_DISCONNECTED]} out of range for state {v[FLEET_STATE]}"
    if v[FLEET_HAND_EDITS] >= STAT_LIMIT:
        return f"hand edits {v[FLEET_HAND_EDITS]} out of range"
    return None


class SegmentError(Exception):
    """The segment cannot be used (missing, foreign, wrong version or size, no permission)."""


class _Uninitialised(SegmentError):
    """Missing, or created but not initialised yet (its creator may still be at work, or died)."""


def segment_name(run_dir: str | os.PathLike[str]) -> str:
    """The POSIX shm name of the instance whose run directory is ``run_dir``."""
    real = os.path.realpath(run_dir)
    return "/dsproxy." + hashlib.sha256(real.encode()).hexdigest()[:24]


def lock_path(run_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(run_dir), "shm.lock")


def _name_hash(name: bytes) -> int:
    return zlib.crc32(name)


class ProblemKind(enum.StrEnum):
    """What is wrong with a segment (:class:`SegmentProblem`)."""

    REMOVED = "removed"  # the name is gone (or cannot be opened)
    REPLACED = "replaced"  # the name points to another object
    TRUNCATED = "truncated"  # smaller than the layout: a mapping of it must not be touched again
    OVERWRITTEN = "overwritten"  # the header (magic, version, sizes, state) is not ours
    RETIRED = "retired"  # the manager replaced it: reopen
    GARBAGE = "garbage"  # the header is sound, a slot, counter or store-table entry is not


class SegmentProblem(NamedTuple):
    """What :meth:`Segment.check` found; ``message`` says it.  Readers skip garbage, the manager
    replaces the segment on any kind but ``RETIRED``."""

    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        return self.message


class _Scan:
    """What one :meth:`Segment.check` reads of the parts it checks in turns (repeated unchanged
    when it confirms a find under the lock)."""

    __slots__ = (
        "block",
        "block_first",
        "block_next",
        "counters_first",
        "counters_next",
        "crc_first",
        "crc_next",
        "names_first",
        "names_next",
    )

    def __init__(self, crc_first: int, block_first: int, names_first: int, counters_first: int) -> None:
        self.crc_first = self.crc_next = crc_first
        self.block_first = self.block_next = block_first
        self.block: int | None = None  # the slot whose counter block it reads; -1: no slot is claimed
        self.names_first = self.names_next = names_first  # the first store-table entry of its window
        self.counters_first = self.counters_next = counters_first  # the first store of its counter window


class SlotInfo(NamedTuple):
    """A snapshot of one live process slot."""

    slot: int
    pid: int
    start: int
    role: int
    booted: bool
    heartbeat_ns: int
    generation: int
    lookups: int
    cache_hits: int
    reloads: int
    config_errors: int
    lookup_errors: int
    origin: int = 0  # k + 1: carries the operations of slot k of the retired segment (SLOT_ORIGIN)

    @property
    def errors(self) -> int:
        """Config errors and lookup errors together (the ``errors`` of status and metrics)."""
        return self.config_errors + self.lookup_errors


class Segment:
    """One mapped segment.  Use :meth:`open`; the hot path reads :attr:`words` directly."""

    def __init__(self, name: str, lock_file: str, mm: mmap.mmap, inode: int = 0, stores: int = MAX_STORES) -> None:
        self.name = name
        #: the store table's size (a checked header field): entries, counter block, where the blocks start
        self.max_stores = stores
        self.block_size = stores * 16
        self.off_counters = OFF_NAMES + stores * NAME_ENTRY_SIZE
        self.size = segment_size(stores)
        #: store-table entries in use, as :meth:`check` counted them (a window per call: the whole
        #: table within ``max_stores / NAME_CHECK_WINDOW`` calls)
        self.names_used = 0
        self.lock_file = lock_file
        self.mm = mm
        self.inode = inode  # of the object mapped: tells whether the name still points to it
        #: the whole segment as u64 words -- ``words[i]`` is one untearable 8-byte load/store
        self.words = memoryview(mm).cast("Q")
        self._name_cache: dict[str, int] = {}
        # check()'s state: where its round robins stand, and the store table it last found sound
        self._block_cursor = 0  # the next slot whose counter block it reads
        self._counters_cursor = 0  # the first store of the next counter window in that block
        self._crc_cursor = 0  # the first entry of its next tag recomputation
        self._crc_pending = 0  # entries whose tag it has not recomputed since the table changed
        self._names_cursor = 0  # the first entry of the next store-table window
        self._sound_table = bytearray()  # the table as its windows were found sound (the manager's, once it checks)
        self._sound_windows: set[int] = set()  # the windows found sound at least once
        self._used_by_window: dict[int, int] = {}  # entries in use in each window, as last read
        self._buffers: dict[int, bytearray] = {}  # read buffers by size, reused (no fresh pages each call)
        #: how :meth:`slots` tells who is alive: the manager's pidfds, else is_alive per slot
        self.liveness: Liveness | None = None

    def check(self, *, contents: bool = True) -> SegmentProblem | None:
        """What is wrong with this segment now, or None.

        The size is checked on a fresh descriptor *before* the mapping is read: touching a mapping
        whose object was truncated kills with SIGBUS.  Found: the name removed or pointing to
        another object, the object truncated, the header scribbled over (magic, version, size,
        table sizes), the segment retired by the manager -- the problems after which a process
        must stop using its mapping.  With ``contents`` (the manager's check, every 0.5 s) also
        garbage in the process slots, the operation counters and the store-name table (kind
        ``garbage``; see "Untrusted contents" in the module essay): ~1 ms with a full table.
        """
        name = self.name
        try:
            handle = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            return SegmentProblem(ProblemKind.REMOVED, f"shared memory {name} was removed")
        except posix_ipc.Error as err:
            return SegmentProblem(ProblemKind.REMOVED, f"shared memory {name} cannot be opened: {err}")
        except OSError:
            # out of file descriptors (a connection flood) or memory: nothing is known to be wrong with
            # the segment, only that it cannot be looked at now -- keep using it and look again later
            return None
        try:
            st = os.fstat(handle.fd)
            if self.inode and st.st_ino != self.inode:
                if self.retired:  # moved (a store-table move, a replacement): move too, carrying operations
                    return SegmentProblem(ProblemKind.RETIRED, f"shared memory {name} is retired")
                return SegmentProblem(ProblemKind.REPLACED, f"shared memory {name} was replaced by another object")
            # the header page is safe to read while the object is not empty (SIGBUS is for pages past its end)
            header = bytes(self.mm[:_HEADER_BYTES]) if st.st_size >= _HEADER_BYTES else b""
            problem = _header_problem(name, st.st_size, header)
            if problem is None and contents:
                problem = self._check_contents(handle.fd)
        finally:
            handle.close_fd()
        return problem

    def _check_contents(self, fd: int) -> SegmentProblem | None:
        """Garbage in the slots, counters or store table, confirmed under the writers' lock.

        The first look takes no lock; a slot claim in progress can look torn to it (pid of the
        dead owner, role already zeroed), so whatever it finds is looked at again, the same parts,
        while holding the writers' lock, which every claim and insert holds.  Only garbage seen
        twice is reported; a lock that cannot be had within a second reports nothing this time.
        """
        scan = _Scan(self._crc_cursor, self._block_cursor, self._names_cursor, self._counters_cursor)
        found = self._scan_contents(fd, scan)
        self._crc_cursor, self._block_cursor = scan.crc_next, scan.block_next
        self._names_cursor, self._counters_cursor = scan.names_next, scan.counters_next
        if found is None:
            return None
        try:
            with self.writer_lock(timeout=1.0):
                found = self._scan_contents(fd, scan)
        except SegmentError:
            return None
        if found is None:
            return None
        return SegmentProblem(ProblemKind.GARBAGE, f"shared memory {self.name} holds garbage: {found}")

    def _scan_contents(self, fd: int, scan: _Scan) -> str | None:
        fleet = self.words[OFF_FLEET // 8 : OFF_FLEET // 8 + FLEET_WORDS].tolist()
        if fleet[FLEET_SEQ] % 2:  # (seen again under the lock, where no write is under way)
            return f"the fleet record: sequence {fleet[FLEET_SEQ]} is odd"
        bad = None if fleet[FLEET_SEQ] == 0 else _fleet_garbage(fleet)
        if bad is not None:
            return f"the fleet record: {bad}"
        vals = self._slot_words()
        start_limit, clock_limit = start_time_limit(CLOCK_MARGIN), _clock_limit()
        claimed = []
        for index in range(MAX_SLOTS):
            v = vals[index * SLOT_WORDS : (index + 1) * SLOT_WORDS]
            if v[SLOT_PID] == 0:
                continue  # free: a freed slot keeps its old words, nobody reads them
            bad = _slot_garbage(v, start_limit, clock_limit)
            if bad is not None:
                return f"process slot {index}: {bad}"
            claimed.append(index)
        bad = self._scan_names(fd, scan)
        if bad is not None:
            return f"store table {bad}"
        stores = self.max_stores
        if self._crc_pending > 0:  # recompute the tags of one window, until all are done since the change
            first = scan.crc_first
            if first + NAME_CRC_WINDOW <= stores:  # read now: the check's copy of the table may be older
                window = os.pread(fd, NAME_CRC_WINDOW * NAME_ENTRY_SIZE, OFF_NAMES + first * NAME_ENTRY_SIZE)
                bad = _names_crc_garbage(window, range(NAME_CRC_WINDOW), NAME_CRC_WINDOW, first)
                if bad is not None:
                    return f"store table {bad}"
            scan.crc_next = (first + NAME_CRC_WINDOW) % stores
            self._crc_pending -= NAME_CRC_WINDOW
        if scan.block is None:  # one window of one block per call, round robin over the claimed slots
            later = [i for i in claimed if i >= scan.block_first] or claimed
            scan.block = later[0] if later else -1
            if scan.block != scan.block_first:
                scan.counters_first = 0
            width = min(COUNTER_CHECK_WINDOW, stores)
            scan.counters_next = (scan.counters_first + width) % stores
            scan.block_next = scan.block if scan.counters_next else scan.block + 1
        if scan.block >= 0:
            first, width = scan.counters_first, min(COUNTER_CHECK_WINDOW, stores - scan.counters_first)
            block = self._read(fd, width * 16, self.off_counters + scan.block * self.block_size + first * 16)
            bad = None if block is None else _counters_garbage(block, first)
            if bad is not None:
                return f"operation counters of process slot {scan.block}: {bad}"
        return None

    def _scan_names(self, fd: int, scan: _Scan) -> str | None:
        """Range-check one window of the store table (all of a 65,536-entry one), unless it is
        the window found sound last time (a ``memcmp``); count the entries in use in it."""
        stores = self.max_stores
        width = min(NAME_CHECK_WINDOW, stores)
        first = scan.names_first - scan.names_first % width
        scan.names_next = (first + width) % stores
        at = first * NAME_ENTRY_SIZE
        table = self._read(fd, width * NAME_ENTRY_SIZE, OFF_NAMES + at)
        if table is None:
            return None  # cannot read it now: nothing is known to be wrong
        if first in self._sound_windows and self._sound_table.startswith(table, at):
            return None
        if not self._sound_table:
            self._sound_table = bytearray(stores * NAME_ENTRY_SIZE)
        bad = _names_garbage(table, first)
        if bad is not None:
            return bad
        self._sound_table[at : at + len(table)] = table
        self._sound_windows.add(first)
        self._crc_pending = stores
        self._used_by_window[first] = width - table[0::NAME_ENTRY_SIZE].count(0)  # a tag's low byte is odd
        self.names_used = sum(self._used_by_window.values())
        return None

    def _read(self, fd: int, size: int, offset: int) -> bytearray | None:
        """``size`` bytes of the object at ``offset``, into a buffer kept for the next call (a read
        does not fill tmpfs holes as touching the mapping would); None if it came short."""
        buf = self._buffers.get(size)
        if buf is None:
            buf = self._buffers[size] = bytearray(size)
        try:
            got = os.preadv(fd, [buf], offset)
        except OSError:
            return None
        return buf if got == size else None

    def _slot_words(self) -> list[int]:
        """Every word of the slot area, read once (one aligned load per word).  The slot area only:
        up to OFF_NAMES it took in the ring too, 17 times the words (~0.3 ms a call, where the
        fleet manager looks at its slots dozens of times per config write)."""
        words: list[int] = self.words[OFF_SLOTS // 8 : OFF_RING // 8].tolist()
        return words

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], *, create: bool, stores: int = MAX_STORES) -> Segment:
        """Map the segment of ``run_dir``; create it if missing and ``create`` is true (with a store
        table of ``stores`` entries, see :func:`table_size`).

        Raises :class:`SegmentError` with a message naming what is wrong.
        """
        name = segment_name(run_dir)
        lock_file = lock_path(run_dir)
        try:  # a valid segment needs no lock to open: its magic is written last
            return cls._open_locked(name, lock_file, create=False)
        except SegmentError as err:
            if not create or not isinstance(err, _Uninitialised):
                raise
        with _flock(lock_file, WRITER_LOCK_TIMEOUT):
            return cls._open_locked(name, lock_file, create, stores)

    @classmethod
    def _open_locked(cls, name: str, lock_file: str, create: bool, stores: int = MAX_STORES) -> Segment:
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            if not create:
                raise _Uninitialised(f"shared memory {name} does not exist") from None
            return cls._create_locked(name, lock_file, stores=stores)
        except posix_ipc.PermissionsError as err:
            raise SegmentError(f"shared memory {name}: permission denied ({err})") from None
        try:
            size = os.fstat(shm.fd).st_size
            header = b""
            if size >= PAGE:  # a page is what can be mapped of it whatever its size
                with mmap.mmap(shm.fd, PAGE) as mm:
                    header = bytes(mm[:_HEADER_BYTES])
        finally:
            shm.close_fd()
        if header[:8] == bytes(8):
            if create:  # a creator died before it finished: initialise it again
                return cls._create_locked(name, lock_file, replace=True, stores=stores)
            raise _Uninitialised(f"shared memory {name} is not initialised")
        problem = _header_problem(name, size, header)
        if problem is not None and problem.kind is not ProblemKind.RETIRED:  # a retired one: check() says so
            raise SegmentError(problem.message)
        stores = int.from_bytes(header[OFF_MAX_STORES : OFF_MAX_STORES + 8], "little")
        return cls(name, lock_file, *_map(name, segment_size(stores)), stores=stores)

    @classmethod
    def _create_locked(cls, name: str, lock_file: str, replace: bool = False, stores: int = MAX_STORES) -> Segment:
        if replace:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(name)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o660, size=segment_size(stores))
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError) as err:
            raise SegmentError(f"cannot create shared memory {name}: {err}") from None
        try:
            os.fchmod(shm.fd, 0o660)  # the umask must not take the group's access away
        finally:
            shm.close_fd()
        seg = cls(name, lock_file, *_map(name, segment_size(stores)), stores=stores)
        w = seg.words
        w[OFF_VERSION // 8] = LAYOUT_VERSION
        w[OFF_SIZE // 8] = seg.size
        w[OFF_STATE // 8] = STATE_ACTIVE
        w[OFF_MAX_SLOTS // 8] = MAX_SLOTS
        w[OFF_MAX_STORES // 8] = stores
        w[OFF_RING_SIZE // 8] = RING_SIZE
        w[OFF_CREATED // 8] = time.time_ns()
        w[OFF_CREATOR // 8] = os.getpid()
        # distinct from any value a process may have cached from an older segment
        base = time.time_ns() & MASK64
        for i in range(NUM_GENERATIONS):
            w[OFF_GENERATIONS // 8 + i] = base
        seg.mm[OFF_MAGIC : OFF_MAGIC + 8] = MAGIC  # last: the segment is now valid
        return seg

    def close(self) -> None:
        self._name_cache.clear()
        with contextlib.suppress(BufferError):
            self.words.release()
        with contextlib.suppress(BufferError):
            self.mm.close()

    # -- the writers' lock -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer_lock(self, timeout: float = WRITER_LOCK_TIMEOUT) -> Iterator[None]:
        """Serialise writers (bumps, slot claims, name inserts).  Released by the kernel on death."""
        with _flock(self.lock_file, timeout):
            yield

    # -- header and generations ------------------------------------------------------------------

    @property
    def retired(self) -> bool:
        return self.words[OFF_STATE // 8] != STATE_ACTIVE

    def generation(self, which: int = GEN_DATASTORE) -> int:
        """Lock-free read of a generation counter."""
        return self.words[OFF_GENERATIONS // 8 + which]

    def bump_generation(self, which: int = GEN_DATASTORE, expected: int | None = None) -> int:
        """Increment a generation under the writers' lock and return the value now current.

        With ``expected``, bump only if the counter still equals it: several processes noticing the
        same manual edit then cause one bump, not one each.
        """
        i = OFF_GENERATIONS // 8 + which
        with self.writer_lock():
            current = self.words[i]
            if expected is not None and current != expected:
                return current
            new = (current + 1) & MASK64
            self.words[i] = new
            return new

    # -- process slots -----------------------------------------------------------------------------

    def slot_base(self, index: int) -> int:
        """Word index of slot ``index``'s first field."""
        return (OFF_SLOTS + index * SLOT_SIZE) // 8

    def claim_slot(
        self, role: Role, pid: int | None = None, *, origin: int = -1, carried: dict[int, tuple[int, int]] | None = None
    ) -> int:
        """Claim a free (or dead) slot for ``pid`` (default: this process); return its index.

        A process moving over from a retired segment passes its old slot as ``origin`` and its
        operations as ``carried`` (``{store index: (read, write)}`` in this segment): they are in
        the counters before the pid makes the slot count, so the move is atomic for a reader of
        both segments (:func:`moving_totals`).
        """
        pid = os.getpid() if pid is None else pid
        start = start_time(pid)
        if start is None:
            raise SegmentError(f"cannot read the start time of pid {pid}")
        w = self.words
        with self.writer_lock():
            for index in range(MAX_SLOTS):
                base = self.slot_base(index)
                owner = w[base + SLOT_PID]
                if owner != 0 and is_alive(owner, w[base + SLOT_START]):
                    continue
                w[base + SLOT_PID] = 0
                self._zero_counters(index)
                for k in range(1, SLOT_WORDS):
                    w[base + k] = 0
                w[base + SLOT_START] = start
                w[base + SLOT_ROLE] = int(role)
                w[base + SLOT_HEARTBEAT] = time.monotonic_ns()
                w[base + SLOT_ORIGIN] = origin + 1 if 0 <= origin < MAX_SLOTS else 0
                for store, (read, write) in (carried or {}).items():
                    i = self.counter_index(index, store)
                    w[i], w[i + 1] = read, write
                w[base + SLOT_PID] = pid  # last: the slot is now claimed
                return index
        raise SegmentError(f"all {MAX_SLOTS} process slots of {self.name} are taken by live processes")

    def free_slot(self, index: int, pid: int | None = None) -> None:
        """Give a slot back (only if ``pid``, default this process, still owns it)."""
        pid = os.getpid() if pid is None else pid
        base = self.slot_base(index)
        if self.words[base + SLOT_PID] == pid:
            # pid first: from now on nobody counts this slot's operations
            self.words[base + SLOT_PID] = 0

    def free_slots_of(self, pid: int) -> int:
        """Free every slot ``pid`` holds (a dead worker's, so that its operations vanish from the
        totals at once); returns how many it held."""
        w = self.words
        held = [index for index in range(MAX_SLOTS) if w[self.slot_base(index) + SLOT_PID] == pid]
        for index in held:
            self.free_slot(index, pid)
        return len(held)

    def slot_pid(self, index: int) -> int:
        """The pid that holds slot ``index`` now (0: free) -- a process checks that its slot is still its own."""
        pid: int = self.words[self.slot_base(index) + SLOT_PID]
        return pid

    # -- a slot's status words: written by its owner only, without a lock ----------------------------

    def beat(self, index: int) -> None:
        """The owner's sign of life: the heartbeat the master watches to find hung workers."""
        self.words[self.slot_base(index) + SLOT_HEARTBEAT] = time.monotonic_ns()

    def set_booted(self, index: int, booted: bool = True) -> None:
        self.words[self.slot_base(index) + SLOT_BOOTED] = int(booted)

    def acknowledge(self, index: int, generation: int, *, reloads: int, config_errors: int) -> None:
        """The owner serves ``generation`` now -- stored only after it loaded that config (see
        "Ordering rules"); with the registry's figures and a heartbeat."""
        base = self.slot_base(index)
        w = self.words
        w[base + SLOT_GENERATION] = generation
        w[base + SLOT_HEARTBEAT] = time.monotonic_ns()
        w[base + SLOT_RELOADS] = reloads
        w[base + SLOT_CONFIG_ERRORS] = config_errors

    def publish_stats(
        self, index: int, *, lookups: int, cache_hits: int, lookup_errors: int, config_errors: int, booted: bool
    ) -> None:
        """The owner's statistics (a daemon worker's tick), with a heartbeat."""
        base = self.slot_base(index)
        w = self.words
        w[base + SLOT_LOOKUPS] = lookups
        w[base + SLOT_CACHE_HITS] = cache_hits
        w[base + SLOT_LOOKUP_ERRORS] = lookup_errors
        w[base + SLOT_CONFIG_ERRORS] = config_errors
        w[base + SLOT_BOOTED] = int(booted)
        w[base + SLOT_HEARTBEAT] = time.monotonic_ns()

    def _zero_counters(self, index: int) -> None:
        start = self.off_counters + index * self.block_size
        try:
            self.mm.madvise(mmap.MADV_REMOVE, start, self.block_size)  # hole punch: zeroes, frees
        except (OSError, AttributeError, ValueError):
            self.mm[start : start + self.block_size] = bytes(self.block_size)

    def claimed_slots(self) -> list[SlotInfo]:
        """Snapshots of the claimed slots whose words pass the range checks (liveness unchecked).

        A slot that fails them is garbage: not alive, its counters ignored (``check()`` reports it
        and the manager replaces the segment).  ~10 us with a few slots claimed: no system call.
        """
        vals = self._slot_words()
        start_limit, clock_limit = start_time_limit(CLOCK_MARGIN), _clock_limit()
        out = []
        for index, pid in enumerate(vals[SLOT_PID::SLOT_WORDS]):
            if pid == 0:
                continue
            v = vals[index * SLOT_WORDS : (index + 1) * SLOT_WORDS]
            if _slot_garbage(v, start_limit, clock_limit) is not None:
                continue
            out.append(SlotInfo(index, v[0], v[1], v[2], bool(v[3]), v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]))
        return out

    def slots(self) -> list[SlotInfo]:
        """Snapshots of the sound slots whose process is alive (checks liveness: a slow call --
        ~30 us per slot, unless :attr:`liveness` keeps pidfds: then one ``poll``)."""
        claimed = self.claimed_slots()
        if self.liveness is None:
            return [s for s in claimed if is_alive(s.pid, s.start)]
        alive = self.liveness.alive([(s.pid, s.start) for s in claimed])
        return [s for s in claimed if (s.pid, s.start) in alive]

    def heartbeats(self, role: Role | None = None) -> dict[int, int]:
        """``{pid: heartbeat (CLOCK_MONOTONIC ns)}`` of the sound claimed slots (of ``role`` if
        given); liveness unchecked, so a hung process is in it -- the master's watch."""
        return {s.pid: s.heartbeat_ns for s in self.claimed_slots() if role is None or s.role == role}

    def lagging(
        self, generation: int, exclude: frozenset[int] = frozenset(), roles: frozenset[int] | None = None
    ) -> list[SlotInfo]:
        """The live slots (but ``exclude``; only ``roles`` if given) not serving ``generation`` yet."""
        return [
            s
            for s in self.slots()
            if s.slot not in exclude and (roles is None or s.role in roles) and s.generation != generation
        ]

    # -- store names and operation counters ---------------------------------------------------------

    def store_index(self, name: str, create: bool = False) -> int | None:
        """Index of ``name`` in the store table; with ``create``, add it if missing."""
        index = self._name_cache.get(name)
        if index is not None:
            return index
        raw = name.encode()
        if not raw or len(raw) > NAME_BYTES:
            raise SegmentError(f"store name {name!r} does not fit the store table")
        index = self._probe(raw)
        if index is None and create:
            with self.writer_lock():
                index = self._probe(raw, insert=True)
        if index is not None:
            self._name_cache[name] = index
        return index

    def register_stores(self, names: Iterable[str]) -> None:
        """Give every name a store-table entry, taking the writers' lock once for all missing ones.

        A registry calls this when it loads a config, so that the first lookup of each of 1,000
        stores does not take the lock 1,000 times.
        """
        missing = []
        for name in names:
            if name in self._name_cache:
                continue
            raw = name.encode()
            if not raw or len(raw) > NAME_BYTES:
                continue  # store_index() reports it on use
            index = self._probe(raw)
            if index is None:
                missing.append((name, raw))
            else:
                self._name_cache[name] = index
        if missing:
            with self.writer_lock():
                for name, raw in missing:
                    index = self._probe(raw, insert=True)
                    if index is not None:
                        self._name_cache[name] = index

    def _probe(self, raw: bytes, insert: bool = False) -> int | None:
        h = _name_hash(raw)
        tag = (h << 1) | 1
        padded = raw.ljust(NAME_BYTES, b"\0")
        w, mm, stores = self.words, self.mm, self.max_stores
        for step in range(stores):
            index = (h + step) % stores
            off = OFF_NAMES + index * NAME_ENTRY_SIZE
            entry_tag = w[off // 8]
            if entry_tag == 0:
                if not insert:
                    return None
                mm[off + 8 : off + 8 + NAME_BYTES] = padded
                w[off // 8] = tag  # last: readers see the name before the tag
                return index
            if entry_tag == tag and mm[off + 8 : off + 8 + NAME_BYTES] == padded:
                return index
        if insert:
            raise SegmentError(f"the store table of {self.name} is full ({stores} names)")
        return None

    def counter_index(self, slot: int, store: int) -> int:
        """Word index of slot ``slot``'s READ counter for store ``store`` (WRITE is the next word)."""
        return (self.off_counters + slot * self.block_size + store * 16) // 8

    def active_operations(self, name: str) -> tuple[int, int]:
        """``(read, write)`` summed over live, sound slots; a count out of range is ignored."""
        read = write = 0
        for r, wr in self.operations_by_slot(name).values():
            read += r
            write += wr
        return read, write

    def operations_by_slot(self, name: str, slots: list[SlotInfo] | None = None) -> dict[int, tuple[int, int]]:
        """``{slot: (read, write)}`` of the live, sound slots (of ``slots`` if given) on ``name``."""
        store = self.store_index(name)
        if store is None:
            return {}
        out = {}
        w = self.words
        for s in self.slots() if slots is None else slots:
            i = self.counter_index(s.slot, store)
            r, wr = w[i], w[i + 1]
            if r < OPERATIONS_LIMIT and wr < OPERATIONS_LIMIT:  # else garbage: check() reports it
                out[s.slot] = (r, wr)
        return out

    def held_operations(self, slot: int) -> dict[str, tuple[int, int]]:
        """The operations slot ``slot`` counts, ``{name: (read, write)}``, for the names this
        process has resolved -- which are all it ever counted (its move to a new segment)."""
        w = self.words
        out = {}
        for name, store in self._name_cache.items():
            i = self.counter_index(slot, store)
            r, wr = w[i], w[i + 1]
            if (r or wr) and r < OPERATIONS_LIMIT and wr < OPERATIONS_LIMIT:
                out[name] = (r, wr)
        return out

    # -- the invalidation ring ---------------------------------------------------------------------

    def publish(
        self,
        changes: Sequence[tuple[ChangeKind, str]],
        expected: int | None = None,
        revision: int | None = None,
    ) -> int:
        """Record ``changes`` in the ring and bump the datastore generation (publish after write:
        the entries are complete before the bump makes them current).  With ``expected``, only
        if the generation still equals it (like :meth:`bump_generation`).  Returns the generation
        now current.  More changes than a quarter of the ring, or a name that does not fit, are
        recorded as one ``EVERYTHING``.  With ``revision`` (fleet mode), the fleet record names
        the new generation and that etcd revision, written before the generation word."""
        many = len(changes) > RING_SIZE // 4  # (100,000 names of a full read are not encoded first)
        raws = [] if many else [(kind, name.encode()) for kind, name in changes]
        if many or any(not 0 < len(raw) <= NAME_BYTES for _, raw in raws):
            raws = [(ChangeKind.EVERYTHING, b"")]
        i = OFF_GENERATIONS // 8 + GEN_DATASTORE
        w, mm = self.words, self.mm
        with self.writer_lock():
            current = w[i]
            if expected is not None and current != expected:
                return current
            new = (current + 1) & MASK64
            head = w[OFF_RING_HEAD // 8]
            if head >= MASK64 - RING_SIZE:  # garbage: start over (readers then find no entry)
                head = 0
            for kind, raw in raws:
                base = OFF_RING + (head % RING_SIZE) * RING_ENTRY_SIZE
                w[base // 8 + RING_SEQ] = 0  # first: a reader of the old entry sees it change
                w[base // 8 + RING_GENERATION] = new
                w[base // 8 + RING_KIND] = int(kind)
                mm[base + OFF_RING_NAME : base + RING_ENTRY_SIZE] = raw.ljust(NAME_BYTES, b"\0")
                head += 1
                w[base // 8 + RING_SEQ] = head  # last: entry number head - 1 is complete
            w[OFF_RING_HEAD // 8] = head
            if revision is not None:
                self._write_fleet(revision=revision, generation=new)
            w[i] = new
            return new

    # -- the fleet record --------------------------------------------------------------------------

    def fleet(self) -> FleetRecord | None:
        """The fleet record, or None outside fleet mode (and when it is torn or garbage)."""
        w, base = self.words, OFF_FLEET // 8
        for _ in range(64):
            seq = w[base + FLEET_SEQ]
            if seq == 0:
                return None
            v = w[base : base + FLEET_WORDS].tolist()
            if seq % 2 or w[base + FLEET_SEQ] != seq or v[FLEET_SEQ] != seq:
                continue  # being written: look again
            if _fleet_garbage(v) is not None:
                return None
            since = v[FLEET_DISCONNECTED]
            return FleetRecord(
                v[FLEET_REVISION],
                v[FLEET_GENERATION],
                FleetState(v[FLEET_STATE]),
                since / 1000 if since else None,
                v[FLEET_HAND_EDITS],
            )
        return None

    def fleet_sequence(self) -> int:
        """The record's sequence word: unchanged means the record is unchanged (one load)."""
        seq: int = self.words[OFF_FLEET // 8 + FLEET_SEQ]
        return seq

    def set_fleet(
        self,
        *,
        revision: int | None = None,
        generation: int | None = None,
        state: FleetState | None = None,
        disconnected_since: float | None = None,
        hand_edits: int | None = None,
    ) -> None:
        """Manager only: change the fleet record (the words not given keep their values; a
        record written for the first time starts connected at revision 0)."""
        with self.writer_lock():
            self._write_fleet(revision, generation, state, disconnected_since, hand_edits)

    def _write_fleet(
        self,
        revision: int | None = None,
        generation: int | None = None,
        state: FleetState | None = None,
        disconnected_since: float | None = None,
        hand_edits: int | None = None,
    ) -> None:
        """The seqlock write (the caller holds the writers' lock)."""
        w, base = self.words, OFF_FLEET // 8
        v = w[base : base + FLEET_WORDS].tolist()
        if v[FLEET_SEQ] == 0 or v[FLEET_SEQ] % 2 or v[FLEET_SEQ] >= MASK64 - 2 or _fleet_garbage(v) is not None:
            v = [0, 0, self.generation(), int(FleetState.CONNECTED), 0, 0]  # first write, or over garbage
        if revision is not None:
            v[FLEET_REVISION] = min(max(revision, 0), REVISION_LIMIT - 1)
        if generation is not None:
            v[FLEET_GENERATION] = generation & MASK64
        if state is not None:
            v[FLEET_STATE] = int(state)
            if state in CONNECTED_STATES:
                v[FLEET_DISCONNECTED] = 0
        if disconnected_since is not None and v[FLEET_STATE] not in CONNECTED_STATES:
            v[FLEET_DISCONNECTED] = min(max(int(disconnected_since * 1000), 1), STAT_LIMIT - 1)
        if hand_edits is not None:
            v[FLEET_HAND_EDITS] = min(max(hand_edits, 0), STAT_LIMIT - 1)
        seq = v[FLEET_SEQ] + 1  # v[FLEET_SEQ] is even here
        values = array.array("Q", v[1:])
        # three stores with no call or loop between them: no other thread of this process runs
        # in the middle (the GIL is only handed over at those), so readers see the odd sequence
        # for the time of one memcpy, not of a thread switch
        w[base + FLEET_SEQ] = seq  # odd: readers look again
        w[base + 1 : base + FLEET_WORDS] = values
        w[base + FLEET_SEQ] = seq + 1  # even: complete

    def changes_since(self, generation: int, now: int) -> frozenset[str] | None:
        """The stores that changed from ``generation`` to ``now`` (a generation read before), or
        None when the ring does not tell: an ``EVERYTHING``, a bump without entries, entries
        already overwritten (fell off the ring), or words that are not what a writer writes.

        Lock-free: an entry counts only if its sequence word names it before and after it was
        read (a seqlock).  What it returns is a hint, never trusted for an answer: the registry
        verifies the file against it (see :mod:`dsproxy.registry`).
        """
        span = (now - generation) & MASK64
        if span == 0:
            return frozenset()
        if span > RING_SIZE:
            return None
        w, mm = self.words, self.mm
        head = w[OFF_RING_HEAD // 8]
        if head >= MASK64 - RING_SIZE:
            return None
        names: set[str] = set()
        seen: set[int] = set()
        for k in range(head - 1, max(head - RING_SIZE, 0) - 1, -1):
            base = OFF_RING + (k % RING_SIZE) * RING_ENTRY_SIZE
            seq = w[base // 8 + RING_SEQ]
            gen, kind = w[base // 8 + RING_GENERATION], w[base // 8 + RING_KIND]
            raw = bytes(mm[base + OFF_RING_NAME : base + RING_ENTRY_SIZE])
            if seq != k + 1 or w[base // 8 + RING_SEQ] != seq:
                return None  # being written, or overwritten by a later lap
            ahead = (gen - generation) & MASK64
            if ahead == 0 or ahead > 2**63:
                break  # older than what we have: every later entry was read
            if ahead > span:
                continue  # published after ``now`` was read
            if kind not in _KINDS or kind == ChangeKind.EVERYTHING:
                return None
            name = raw.rstrip(b"\0")
            if not name or b"\0" in name:
                return None
            try:
                names.add(name.decode())
            except UnicodeDecodeError:
                return None
            seen.add(gen)
        else:
            if head > RING_SIZE:
                return None  # the entries before the oldest one read are gone
        return frozenset(names) if len(seen) == span else None

    # -- replacement ---------------------------------------------------------------------------------

    def retire(self) -> None:
        """Mark this segment replaced and bump its generations so that every process reopens."""
        with self.writer_lock():
            w = self.words
            w[OFF_STATE // 8] = STATE_RETIRED
            for i in range(NUM_GENERATIONS):
                w[OFF_GENERATIONS // 8 + i] = (w[OFF_GENERATIONS // 8 + i] + 1) & MASK64


# -- the header --------------------------------------------------------------------------------------

_HEADER_BYTES: Final = OFF_GENERATIONS  # magic .. creator: what a header check reads


def _header_problem(name: str, size: int, header: bytes) -> SegmentProblem | None:
    """What is wrong with ``name``, an object of ``size`` bytes starting with ``header`` (empty if
    it is too short to hold one), or None.

    The one decoder of the header, for :meth:`Segment.check` (of its mapping) and
    :meth:`Segment.open` (of a page it mapped).  A short object is ``TRUNCATED`` whatever its
    header says: a mapping of it must not be touched past its end (SIGBUS), nor be retired.
    """
    magic = header[:8]
    foreign = f"is foreign: magic {magic.hex()}, expected {MAGIC.hex()}"
    version, declared, state, slots, stores, ring = (
        int.from_bytes(header[off : off + 8], "little")
        for off in (OFF_VERSION, OFF_SIZE, OFF_STATE, OFF_MAX_SLOTS, OFF_MAX_STORES, OFF_RING_SIZE)
    )
    expected = segment_size(stores) if _sound_table_size(stores) else SEGMENT_SIZE
    if size < expected:
        what = f"{foreign}; size {size}" if magic and magic != MAGIC else f"has size {size}, expected {expected}"
        return SegmentProblem(ProblemKind.TRUNCATED, f"shared memory {name} {what} (truncated)")
    if magic != MAGIC:
        return SegmentProblem(ProblemKind.OVERWRITTEN, f"shared memory {name} {foreign}")
    if version != LAYOUT_VERSION:
        return SegmentProblem(
            ProblemKind.OVERWRITTEN,
            f"shared memory {name} has layout version {version}, this dsproxy uses {LAYOUT_VERSION}",
        )
    if declared != expected or slots != MAX_SLOTS or not _sound_table_size(stores) or ring != RING_SIZE:
        return SegmentProblem(
            ProblemKind.OVERWRITTEN,
            f"shared memory {name} was overwritten: size {declared}, {slots} slots, {stores} store entries, "
            f"{ring} ring entries (expected {expected}, {MAX_SLOTS}, a power of two in {MAX_STORES}..{STORES_LIMIT}, "
            f"{RING_SIZE})",
        )
    if state == STATE_RETIRED:
        return SegmentProblem(ProblemKind.RETIRED, f"shared memory {name} is retired")
    if state != STATE_ACTIVE:
        return SegmentProblem(ProblemKind.OVERWRITTEN, f"shared memory {name} was overwritten: state {state}")
    return None


# -- range checks of untrusted contents (see "Untrusted contents" in the module essay) -----------------

_SLOT_STATS: Final = {
    SLOT_LOOKUPS: "lookups",
    SLOT_CACHE_HITS: "cache hits",
    SLOT_RELOADS: "reloads",
    SLOT_CONFIG_ERRORS: "config errors",
    SLOT_LOOKUP_ERRORS: "lookup errors",
}
_SLOT_RESERVED: Final = slice(SLOT_ORIGIN + 1, SLOT_WORDS)


def _clock_limit() -> int:
    return time.monotonic_ns() + int(CLOCK_MARGIN * 1e9)


def _slot_garbage(v: Sequence[int], start_limit: int, clock_limit: int) -> str | None:
    """What is wrong with the words ``v`` of a claimed slot (pid != 0), or None.

    Generations are compared for equality only, so any value is fine there.
    """
    pid = v[SLOT_PID]
    if not valid_pid(pid):
        return f"pid {pid} is out of range (1..{PID_MAX})"
    if v[SLOT_START] > start_limit:
        return f"pid {pid}: start time {v[SLOT_START]} lies in the future"
    if v[SLOT_ROLE] not in _ROLES:
        return f"pid {pid}: unknown role {v[SLOT_ROLE]}"
    if v[SLOT_BOOTED] > 1:
        return f"pid {pid}: booted flag {v[SLOT_BOOTED]}"
    if v[SLOT_HEARTBEAT] > clock_limit:
        return f"pid {pid}: heartbeat {v[SLOT_HEARTBEAT]} lies in the future"
    for k, what in _SLOT_STATS.items():
        if v[k] >= STAT_LIMIT:
            return f"pid {pid}: {what} {v[k]} out of range"
    if v[SLOT_ORIGIN] > MAX_SLOTS:
        return f"pid {pid}: origin {v[SLOT_ORIGIN]} is not a slot"
    if any(v[_SLOT_RESERVED]):
        return f"pid {pid}: reserved words are not zero"
    return None


def _byte_map(pred: Iterable[bool]) -> bytes:
    """A ``bytes.translate`` table: 0xff where ``pred`` holds for the byte value, else 0."""
    return bytes(255 if p else 0 for p in pred)


_EVEN: Final = _byte_map(b % 2 == 0 for b in range(256))
_EVEN_SET: Final = _byte_map(b % 2 == 0 and b != 0 for b in range(256))
_ODD: Final = _byte_map(b % 2 == 1 for b in range(256))
_ZERO: Final = _byte_map(b == 0 for b in range(256))
_ABOVE_ONE: Final = _byte_map(b > 1 for b in range(256))


def _names_garbage(table: bytes | bytearray, first: int = 0) -> str | None:
    """Range-check every tag of ``table`` (entries from ``first`` on) at once; ~0.6 ms for 65,536.

    A tag is 0 (empty) or ``crc32(name) << 1 | 1``: odd, below 2**33, with a non-empty name.
    The check works a byte column at a time (``table[k::48]``: byte ``k`` of every entry) and
    combines the columns as big integers, one byte per entry, so no Python loop runs per entry.
    """
    col = [int.from_bytes(table[k::NAME_ENTRY_SIZE], "little") for k in (1, 2, 3, 5, 6, 7)]
    low = table[0::NAME_ENTRY_SIZE]
    high = int.from_bytes(table[4::NAME_ENTRY_SIZE].translate(_ABOVE_ONE), "little")
    even = int.from_bytes(low.translate(_EVEN), "little")
    odd = int.from_bytes(low.translate(_ODD), "little")
    unnamed = int.from_bytes(table[8::NAME_ENTRY_SIZE].translate(_ZERO), "little")
    b4 = int.from_bytes(table[4::NAME_ENTRY_SIZE], "little")
    even_set = int.from_bytes(low.translate(_EVEN_SET), "little")
    bad = col[3] | col[4] | col[5] | high | even_set | (even & (col[0] | col[1] | col[2] | b4)) | (odd & unnamed)
    if not bad:
        return None
    index = ((bad & -bad).bit_length() - 1) // 8
    tag = int.from_bytes(table[index * NAME_ENTRY_SIZE : index * NAME_ENTRY_SIZE + 8], "little")
    return f"entry {first + index}: tag {tag:#x} is not a tag"


def _names_crc_garbage(table: bytes, indexes: Iterable[int], stores: int = MAX_STORES, first: int = 0) -> str | None:
    """Recompute the tags of the entries ``indexes`` of ``table`` (which starts at entry ``first``)
    from their names (a window per check)."""
    for index in indexes:
        off = (index % stores) * NAME_ENTRY_SIZE
        tag = int.from_bytes(table[off : off + 8], "little")
        if tag == 0:
            continue
        raw = table[off + 8 : off + 8 + NAME_BYTES]
        name = raw.rstrip(b"\0")
        if not name or b"\0" in name or tag != (_name_hash(name) << 1) | 1:
            return f"entry {first + index % stores}: tag {tag:#x} does not match the name {name[:NAME_BYTES]!r}"
    return None


_OPERATIONS_BYTES: Final = (OPERATIONS_LIMIT.bit_length() - 1) // 8  # the low bytes a count may use


def _counters_garbage(block: bytes | bytearray, first: int = 0) -> str | None:
    """Every counter of (a window of) one block below :data:`OPERATIONS_LIMIT` (its high bytes
    all zero); the window starts with the counters of store entry ``first``."""
    for k in range(_OPERATIONS_BYTES, 8):
        if block[k::8].count(0) != len(block) // 8:
            counters = memoryview(block).cast("Q")
            index, value = next((i, c) for i, c in enumerate(counters) if c >= OPERATIONS_LIMIT)
            kind = "write" if index % 2 else "read"
            return f"{kind} count {value} of store entry {first + index // 2} out of range"
    return None


def total_operations(
    name: str, segment: Segment | None, files: FileCounters, previous: Segment | None = None
) -> tuple[int, int]:
    """``(read, write)`` operations on ``name`` of every live process: those counted here (the
    processes with ``cache=on``) and those in the counter files (``cache=config|off``, degraded).
    What a maintenance transition reports and what a remove refuses on.  While processes move
    to ``segment`` from the retired ``previous`` one, both count (:func:`moving_totals`)."""
    read, write = files.totals(name)
    if segment is not None:
        r, w = segment.active_operations(name) if previous is None else moving_totals(name, segment, previous)
        read, write = read + r, write + w
    return read, write


def moving_totals(name: str, new: Segment, old: Segment) -> tuple[int, int]:
    """``(read, write)`` on ``name`` while processes move from ``old`` to ``new``.

    A moving process claims its new slot with its operations already in it and the old slot as
    its origin, then frees the old one.  So: read the old slots first, then the new ones; an old
    slot that a new slot names as its origin is counted there instead.  Whatever moment a move
    happens at, each operation is counted once.
    """
    before = old.operations_by_slot(name)
    slots = new.slots()
    after = new.operations_by_slot(name, slots)
    moved = {s.slot: s.origin - 1 for s in slots if s.origin}
    read = sum(r for r, _ in after.values())
    write = sum(w for _, w in after.values())
    superseded = set(moved.values())
    for slot, (r, w) in before.items():
        if slot not in superseded:
            read, write = read + r, write + w
    return read, write


def move_size(segment: Segment, configured: int) -> int | None:
    """The store-table size the manager should move everyone to, or None (see "Store names").

    A table must hold every configured name at no more than half load; it is moved when that no
    longer holds, when it is three quarters full, or when it is more than half full with mostly
    dead names (``names_used`` -- as :meth:`Segment.check` last counted -- at least twice the
    configured count).  The new size is :func:`table_size` of the configured count: after the
    move only live names are registered again.
    """
    used, size = segment.names_used, segment.max_stores
    wanted = table_size(configured)
    if wanted > size or used * 4 > size * 3 or (used * 2 > size and configured * 2 < used):
        return wanted
    return None


def recreate(run_dir: str | os.PathLike[str], mapped: Segment | None = None, stores: int = MAX_STORES) -> Segment:
    """Manager only: replace whatever is under the name with a fresh segment.

    The segment the processes share -- ``mapped`` (the manager's own mapping, which still reaches
    the old object even when the name was removed or the header scribbled over), else whatever
    valid segment the name holds -- is retired first: its generations move, so every process takes
    its slow path, sees it retired and reopens the new one.  A truncated object is not touched
    (SIGBUS); its users die on their next access and are restarted by their supervisors.
    Foreign objects are unlinked without being written.
    """
    name = segment_name(run_dir)
    lock_file = lock_path(run_dir)
    old = mapped
    if old is not None and (problem := old.check(contents=False)) is not None and problem.kind is ProblemKind.TRUNCATED:
        old = None
    if old is None:
        try:
            old = Segment.open(run_dir, create=False)
        except SegmentError:
            old = None
    if old is not None:
        old.retire()
        if old is not mapped:  # the caller's own mapping stays usable (a move counts in it meanwhile)
            old.close()
    with _flock(lock_file, WRITER_LOCK_TIMEOUT):
        return Segment._create_locked(name, lock_file, replace=True, stores=stores)


def unlink(run_dir: str | os.PathLike[str]) -> None:
    """Remove the segment's name (mappings stay valid).  Used by tests and ``dsproxy`` cleanup."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(segment_name(run_dir))


def _map(name: str, size: int) -> tuple[mmap.mmap, int]:
    shm = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shm.fd, size), os.fstat(shm.fd).st_ino
    finally:
        shm.close_fd()


@contextlib.contextmanager
def _flock(path: str, timeout: float) -> Iterator[None]:
    try:
        with flock.exclusive(path, timeout, replace_unsafe=True):  # the run dir is group-writable
            yield
    except flock.LockTimeout as err:
        raise SegmentError(f"the writers' lock: {err}") from None
    except OSError as err:
        raise SegmentError(f"cannot open the writers' lock {path}: {err.strerror}") from None
