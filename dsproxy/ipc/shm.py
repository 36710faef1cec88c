"""The shared-memory segment: generation counters, process slots, operation counters.

Design note
===========

Every dsproxy process of one instance (manager, proxy master, workers, library users) maps one
POSIX shared-memory segment.  Its name derives from the instance's run directory
(``/dsproxy.<sha256(realpath(run_dir))[:24]>``), so two instances -- and parallel tests -- never
share one.  Next to it, ``<run_dir>/shm.lock`` is the *writers' lock* (see "Locks" below).

Layout (version 1; little-endian; every field a u64 unless noted; offsets in bytes; a unit test
pins all of them)::

    0         header, one page
      0         magic, 8 bytes  b"DSPXSHM1"
      8         layout version (1)
      16        segment size in bytes
      24        state: 1 = active, 2 = retired (a newer segment replaced this one; reopen)
      32        number of process slots (128)
      40        number of store entries (65536)
      48        creation time, unix ns
      56        pid of the creator
      128       generation counters, 16 words: [0] datastore, [1] token, [2..15] reserved
    4096      process slots, 128 x 128 bytes, word index within a slot:
      0 pid (0 = free)   1 start time (ticks, /proc field 22)   2 role   3 booted
      4 heartbeat (CLOCK_MONOTONIC ns)   5 generation of the config this process serves
      6 requests   7 cache hits   8 slow-path reloads   9 errors   10..15 reserved
    20480     store-name table, 65536 x 48 bytes: u64 tag (0 = empty), 40-byte NUL-padded name
    3166208   operation counters, one 1 MiB block per slot: 65536 stores x (read u64, write u64)
    137383936 end (the segment is sparse on tmpfs: only touched pages cost memory)

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
  Totals are sums over live slots, so a dead process's operations vanish with it.
* The store-name table maps a datastore name to the index of its counters in every block.  Entries
  are added under the writers' lock (name bytes first, tag last) and never removed, so readers probe
  it without a lock.

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
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import mmap
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

import posix_ipc

from . import flock
from .proc import is_alive, start_time

MAGIC: Final = b"DSPXSHM1"
LAYOUT_VERSION: Final = 1
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
OFF_GENERATIONS: Final = 128
NUM_GENERATIONS: Final = 16
GEN_DATASTORE: Final = 0
GEN_TOKEN: Final = 1

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
SLOT_REQUESTS: Final = 6
SLOT_CACHE_HITS: Final = 7
SLOT_RELOADS: Final = 8
SLOT_ERRORS: Final = 9
SLOT_WORDS: Final = SLOT_SIZE // 8

MAX_STORES: Final = 65536
NAME_ENTRY_SIZE: Final = 48
NAME_BYTES: Final = 40
OFF_NAMES: Final = OFF_SLOTS + MAX_SLOTS * SLOT_SIZE
COUNTER_BLOCK_SIZE: Final = MAX_STORES * 16
OFF_COUNTERS: Final = OFF_NAMES + MAX_STORES * NAME_ENTRY_SIZE
SEGMENT_SIZE: Final = OFF_COUNTERS + MAX_SLOTS * COUNTER_BLOCK_SIZE

MASK64: Final = (1 << 64) - 1
WRITER_LOCK_TIMEOUT: Final = 10.0


class Role(enum.IntEnum):
    MANAGER = 1
    MASTER = 2
    WORKER = 3
    LIBRARY = 4


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


class SegmentProblem(NamedTuple):
    """What :meth:`Segment.check` found: ``kind`` is one of removed, replaced, truncated,
    overwritten, retired (a truncated mapping must not be touched again); ``message`` says it."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


class SlotInfo(NamedTuple):
    """A snapshot of one live process slot."""

    slot: int
    pid: int
    start: int
    role: int
    booted: bool
    heartbeat_ns: int
    generation: int
    requests: int
    cache_hits: int
    reloads: int
    errors: int


class Segment:
    """One mapped segment.  Use :meth:`open`; the hot path reads :attr:`words` directly."""

    def __init__(self, name: str, lock_file: str, mm: mmap.mmap, inode: int = 0) -> None:
        self.name = name
        self.lock_file = lock_file
        self.mm = mm
        self.inode = inode  # of the object mapped: tells whether the name still points to it
        #: the whole segment as u64 words -- ``words[i]`` is one untearable 8-byte load/store
        self.words = memoryview(mm).cast("Q")
        self._name_cache: dict[str, int] = {}

    def check(self) -> SegmentProblem | None:
        """What is wrong with this segment now, or None.  Cheap (one ``shm_open`` + ``fstat``).

        The size is checked on a fresh descriptor *before* the mapping is read: touching a mapping
        whose object was truncated kills with SIGBUS.  Found: the name removed or pointing to
        another object, the object truncated, the header scribbled over (magic, version, size),
        the segment retired by the manager.
        """
        name = self.name
        try:
            handle = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            return SegmentProblem("removed", f"shared memory {name} was removed")
        except posix_ipc.Error as err:
            return SegmentProblem("removed", f"shared memory {name} cannot be opened: {err}")
        try:
            st = os.fstat(handle.fd)
        finally:
            handle.close_fd()
        if self.inode and st.st_ino != self.inode:
            return SegmentProblem("replaced", f"shared memory {name} was replaced by another object")
        if st.st_size < SEGMENT_SIZE:
            return SegmentProblem("truncated", f"shared memory {name} was truncated to {st.st_size} bytes")
        header = bytes(self.mm[:OFF_GENERATIONS])
        if header[:8] != MAGIC:
            return SegmentProblem("overwritten", f"shared memory {name} was overwritten: magic {header[:8].hex()}")
        version = int.from_bytes(header[OFF_VERSION : OFF_VERSION + 8], "little")
        size = int.from_bytes(header[OFF_SIZE : OFF_SIZE + 8], "little")
        if version != LAYOUT_VERSION or size != SEGMENT_SIZE:
            return SegmentProblem(
                "overwritten", f"shared memory {name} was overwritten: version {version}, size {size}"
            )
        state = int.from_bytes(header[OFF_STATE : OFF_STATE + 8], "little")
        if state == STATE_RETIRED:
            return SegmentProblem("retired", f"shared memory {name} is retired")
        if state != STATE_ACTIVE:
            return SegmentProblem("overwritten", f"shared memory {name} was overwritten: state {state}")
        return None

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], *, create: bool) -> Segment:
        """Map the segment of ``run_dir``; create it if missing and ``create`` is true.

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
            return cls._open_locked(name, lock_file, create)

    @classmethod
    def _open_locked(cls, name: str, lock_file: str, create: bool) -> Segment:
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            if not create:
                raise _Uninitialised(f"shared memory {name} does not exist") from None
            return cls._create_locked(name, lock_file)
        except posix_ipc.PermissionsError as err:
            raise SegmentError(f"shared memory {name}: permission denied ({err})") from None
        try:
            size = os.fstat(shm.fd).st_size
            if size < PAGE:
                raise SegmentError(f"shared memory {name} is truncated: {size} bytes, expected {SEGMENT_SIZE}")
            mm = mmap.mmap(shm.fd, PAGE)
        finally:
            shm.close_fd()
        try:
            header = bytes(mm[:OFF_GENERATIONS])
        finally:
            mm.close()
        magic = header[:8]
        if magic == b"\0" * 8:
            if create:  # a creator died before it finished: initialise it again
                return cls._create_locked(name, lock_file, replace=True)
            raise _Uninitialised(f"shared memory {name} is not initialised")
        if magic != MAGIC:
            raise SegmentError(f"shared memory {name} is foreign: magic {magic.hex()}, expected {MAGIC.hex()}")
        version = int.from_bytes(header[OFF_VERSION : OFF_VERSION + 8], "little")
        if version != LAYOUT_VERSION:
            raise SegmentError(f"shared memory {name} has layout version {version}, this dsproxy uses {LAYOUT_VERSION}")
        declared = int.from_bytes(header[OFF_SIZE : OFF_SIZE + 8], "little")
        if declared != SEGMENT_SIZE or size < SEGMENT_SIZE:
            raise SegmentError(
                f"shared memory {name} has size {size} (header says {declared}), expected {SEGMENT_SIZE}"
            )
        return cls(name, lock_file, *_map(name))

    @classmethod
    def _create_locked(cls, name: str, lock_file: str, replace: bool = False) -> Segment:
        if replace:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(name)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o660, size=SEGMENT_SIZE)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError) as err:
            raise SegmentError(f"cannot create shared memory {name}: {err}") from None
        try:
            os.fchmod(shm.fd, 0o660)  # the umask must not take the group's access away
        finally:
            shm.close_fd()
        seg = cls(name, lock_file, *_map(name))
        w = seg.words
        w[OFF_VERSION // 8] = LAYOUT_VERSION
        w[OFF_SIZE // 8] = SEGMENT_SIZE
        w[OFF_STATE // 8] = STATE_ACTIVE
        w[OFF_MAX_SLOTS // 8] = MAX_SLOTS
        w[OFF_MAX_STORES // 8] = MAX_STORES
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

    def claim_slot(self, role: Role, pid: int | None = None) -> int:
        """Claim a free (or dead) slot for ``pid`` (default: this process); return its index."""
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

    def _zero_counters(self, index: int) -> None:
        start = OFF_COUNTERS + index * COUNTER_BLOCK_SIZE
        try:
            self.mm.madvise(mmap.MADV_REMOVE, start, COUNTER_BLOCK_SIZE)  # hole punch: zeroes, frees
        except (OSError, AttributeError, ValueError):
            self.mm[start : start + COUNTER_BLOCK_SIZE] = bytes(COUNTER_BLOCK_SIZE)

    def slots(self) -> list[SlotInfo]:
        """Snapshots of the slots whose process is alive (checks liveness: a slow call)."""
        out = []
        w = self.words
        for index in range(MAX_SLOTS):
            base = self.slot_base(index)
            pid = w[base + SLOT_PID]
            if pid == 0:
                continue
            start = w[base + SLOT_START]
            if not is_alive(pid, start):
                continue
            out.append(
                SlotInfo(
                    slot=index,
                    pid=pid,
                    start=start,
                    role=w[base + SLOT_ROLE],
                    booted=bool(w[base + SLOT_BOOTED]),
                    heartbeat_ns=w[base + SLOT_HEARTBEAT],
                    generation=w[base + SLOT_GENERATION],
                    requests=w[base + SLOT_REQUESTS],
                    cache_hits=w[base + SLOT_CACHE_HITS],
                    reloads=w[base + SLOT_RELOADS],
                    errors=w[base + SLOT_ERRORS],
                )
            )
        return out

    def wait_for_generation(
        self, generation: int, timeout: float, exclude: frozenset[int] = frozenset()
    ) -> list[SlotInfo]:
        """Wait until every live slot (but ``exclude``) serves ``generation``.

        Returns the slots that still had not acknowledged when ``timeout`` passed (empty on success).
        """
        deadline = time.monotonic() + timeout
        while True:
            lagging = self.lagging(generation, exclude)
            if not lagging or time.monotonic() >= deadline:
                return lagging
            time.sleep(0.005)

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
        w, mm = self.words, self.mm
        for step in range(MAX_STORES):
            index = (h + step) % MAX_STORES
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
            raise SegmentError(f"the store table of {self.name} is full ({MAX_STORES} names)")
        return None

    def counter_index(self, slot: int, store: int) -> int:
        """Word index of slot ``slot``'s READ counter for store ``store`` (WRITE is the next word)."""
        return (OFF_COUNTERS + slot * COUNTER_BLOCK_SIZE + store * 16) // 8

    def active_operations(self, name: str) -> tuple[int, int]:
        """``(read, write)`` summed over live slots."""
        store = self.store_index(name)
        if store is None:
            return 0, 0
        read = write = 0
        w = self.words
        for index in range(MAX_SLOTS):
            base = self.slot_base(index)
            pid = w[base + SLOT_PID]
            if pid == 0 or not is_alive(pid, w[base + SLOT_START]):
                continue
            i = self.counter_index(index, store)
            read += w[i]
            write += w[i + 1]
        return read, write

    # -- replacement ---------------------------------------------------------------------------------

    def retire(self) -> None:
        """Mark this segment replaced and bump its generations so that every process reopens."""
        with self.writer_lock():
            w = self.words
            w[OFF_STATE // 8] = STATE_RETIRED
            for i in range(NUM_GENERATIONS):
                w[OFF_GENERATIONS // 8 + i] = (w[OFF_GENERATIONS // 8 + i] + 1) & MASK64


def recreate(run_dir: str | os.PathLike[str], mapped: Segment | None = None) -> Segment:
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
    if old is not None and (problem := old.check()) is not None and problem.kind == "truncated":
        old = None
    if old is None:
        try:
            old = Segment.open(run_dir, create=False)
        except SegmentError:
            old = None
    if old is not None:
        old.retire()
        old.close()
    with _flock(lock_file, WRITER_LOCK_TIMEOUT):
        return Segment._create_locked(name, lock_file, replace=True)


def unlink(run_dir: str | os.PathLike[str]) -> None:
    """Remove the segment's name (mappings stay valid).  Used by tests and ``dsproxy`` cleanup."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(segment_name(run_dir))


def _map(name: str) -> tuple[mmap.mmap, int]:
    shm = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shm.fd, SEGMENT_SIZE), os.fstat(shm.fd).st_ino
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
