"""The shared-memory segment is a file format: its layout is pinned, foreign segments are refused."""

from __future__ import annotations

import mmap
import os
import resource
import time
from pathlib import Path

import posix_ipc
import pytest

from dsproxy.ipc import shm


def test_layout_is_pinned() -> None:
    assert shm.MAGIC == b"DSPXSHM1"
    assert shm.LAYOUT_VERSION == 3
    assert (shm.OFF_MAGIC, shm.OFF_VERSION, shm.OFF_SIZE, shm.OFF_STATE) == (0, 8, 16, 24)
    assert (shm.OFF_MAX_SLOTS, shm.OFF_MAX_STORES, shm.OFF_CREATED, shm.OFF_CREATOR) == (32, 40, 48, 56)
    assert (shm.OFF_GENERATIONS, shm.NUM_GENERATIONS, shm.GEN_DATASTORE, shm.GEN_TOKEN) == (128, 16, 0, 1)
    assert (shm.OFF_SLOTS, shm.SLOT_SIZE, shm.MAX_SLOTS) == (4096, 128, 128)
    assert (shm.SLOT_PID, shm.SLOT_START, shm.SLOT_ROLE, shm.SLOT_BOOTED, shm.SLOT_HEARTBEAT) == (0, 1, 2, 3, 4)
    assert (shm.SLOT_GENERATION, shm.SLOT_LOOKUPS, shm.SLOT_CACHE_HITS, shm.SLOT_RELOADS) == (5, 6, 7, 8)
    assert (shm.SLOT_CONFIG_ERRORS, shm.SLOT_LOOKUP_ERRORS, shm.SLOT_ORIGIN, shm.SLOT_WORDS) == (9, 10, 11, 16)
    assert (shm.OFF_RING_SIZE, shm.OFF_RING_HEAD) == (64, 72)
    assert (shm.OFF_RING, shm.RING_SIZE, shm.RING_ENTRY_SIZE) == (20480, 4096, 64)
    assert (shm.RING_SEQ, shm.RING_GENERATION, shm.RING_KIND, shm.OFF_RING_NAME) == (0, 1, 2, 24)
    assert [int(k) for k in shm.ChangeKind] == [1, 2, 3, 4]
    assert (shm.OFF_FLEET, shm.FLEET_WORDS) == (80, 6)
    assert [int(r) for r in shm.Role] == [1, 3, 4]  # 2 (once the master's) is never claimed
    assert (shm.OFF_NAMES, shm.NAME_ENTRY_SIZE, shm.MAX_STORES, shm.STORES_LIMIT) == (282624, 48, 65536, 2**21)
    assert (shm.OFF_COUNTERS, shm.COUNTER_BLOCK_SIZE) == (3428352, 1048576)
    assert shm.SEGMENT_SIZE == shm.segment_size(65536) == 137646080
    # the table is sized for the configuration: a power of two, at least twice the stores
    assert [shm.table_size(n) for n in (0, 32768, 32769, 100_000, 200_000)] == [65536, 65536, 131072, 262144, 524288]
    assert shm.segment_size(262144) == 282624 + 262144 * 48 + 128 * 262144 * 16
    assert shm.OFF_COUNTERS % mmap.PAGESIZE == 0  # counter blocks are hole-punched page-wise


@pytest.fixture
def run_dir(tmp_path: Path):
    d = tmp_path / "run"
    d.mkdir()
    yield d
    shm.unlink(d)


def _raw_segment(run_dir: Path, size: int, header: bytes) -> None:
    mem = posix_ipc.SharedMemory(shm.segment_name(run_dir), posix_ipc.O_CREX, size=size)
    with mmap.mmap(mem.fd, size) as mm:
        mm[: len(header)] = header
    mem.close_fd()


def test_fresh_segment_has_header_and_starts_generations_apart_from_zero(run_dir: Path) -> None:
    seg = shm.Segment.open(run_dir, create=True)
    try:
        assert bytes(seg.mm[:8]) == shm.MAGIC
        assert seg.words[1] == shm.LAYOUT_VERSION and seg.words[2] == shm.SEGMENT_SIZE
        gen = seg.generation()
        assert gen != 0
        assert seg.bump_generation() == gen + 1
        assert seg.bump_generation(expected=gen) == gen + 1  # somebody else bumped already: no second bump
    finally:
        seg.close()


def test_missing_segment_is_not_created_by_a_process_that_must_not_create(run_dir: Path) -> None:
    with pytest.raises(shm.SegmentError, match="does not exist"):
        shm.Segment.open(run_dir, create=False)


def test_foreign_magic_is_refused_and_named(run_dir: Path) -> None:
    _raw_segment(run_dir, shm.SEGMENT_SIZE, b"NOTOURS!")
    with pytest.raises(shm.SegmentError, match="foreign: magic 4e4f544f55525321"):
        shm.Segment.open(run_dir, create=True)


def test_other_layout_version_is_refused(run_dir: Path) -> None:
    _raw_segment(run_dir, shm.SEGMENT_SIZE, shm.MAGIC + (1).to_bytes(8, "little"))
    with pytest.raises(shm.SegmentError, match="layout version 1, this dsproxy uses 3"):
        shm.Segment.open(run_dir, create=True)


def test_truncated_segment_is_refused(run_dir: Path) -> None:
    header = shm.MAGIC + shm.LAYOUT_VERSION.to_bytes(8, "little") + shm.SEGMENT_SIZE.to_bytes(8, "little")
    _raw_segment(run_dir, 8192, header)
    with pytest.raises(shm.SegmentError, match="has size 8192"):
        shm.Segment.open(run_dir, create=True)


def test_recreate_replaces_a_foreign_segment_and_retires_an_old_one(run_dir: Path) -> None:
    _raw_segment(run_dir, 4096, b"NOTOURS!")
    seg = shm.recreate(run_dir)
    old_gen = seg.generation()
    newer = shm.recreate(run_dir)
    try:
        assert seg.retired and not newer.retired
        assert seg.generation() != old_gen  # every holder of the old one takes its slow path
    finally:
        seg.close()
        newer.close()


def test_store_names_get_stable_indexes(run_dir: Path) -> None:
    seg = shm.Segment.open(run_dir, create=True)
    other = shm.Segment.open(run_dir, create=False)
    try:
        assert seg.store_index("store1") is None
        a = seg.store_index("store1", create=True)
        b = seg.store_index("store2", create=True)
        assert a is not None and b is not None and a != b
        assert other.store_index("store1") == a  # another mapping finds it without a lock
        with pytest.raises(shm.SegmentError):
            seg.store_index("x" * 41, create=True)
    finally:
        seg.close()
        other.close()


# -- untrusted contents: every word is range-checked, garbage is found by check() -------------------


@pytest.fixture
def seg(run_dir: Path):
    segment = shm.Segment.open(run_dir, create=True)
    yield segment
    segment.close()


def _slot_word(seg: shm.Segment, slot: int, field: int) -> int:
    return seg.slot_base(slot) + field


@pytest.mark.parametrize(
    ("field", "value", "found"),
    [
        (shm.SLOT_PID, 2**64 - 1, "pid 18446744073709551615 is out of range"),
        (shm.SLOT_PID, 2**22 + 1, "out of range"),
        (shm.SLOT_START, 2**63, "start time"),
        (shm.SLOT_ROLE, 99, "unknown role 99"),
        (shm.SLOT_BOOTED, 7, "booted flag 7"),
        (shm.SLOT_HEARTBEAT, 2**64 - 1, "heartbeat"),
        (shm.SLOT_LOOKUPS, 2**60, "lookups"),
        (shm.SLOT_CONFIG_ERRORS, 2**53, "config errors"),
        (shm.SLOT_LOOKUP_ERRORS, 2**53, "lookup errors"),
        (shm.SLOT_ORIGIN, shm.MAX_SLOTS + 1, "is not a slot"),
        (shm.SLOT_ORIGIN + 1, 1, "reserved words"),
    ],
)
def test_a_scribbled_slot_word_is_garbage_to_readers_and_found_by_check(
    seg: shm.Segment, field: int, value: int, found: str
) -> None:
    mine = seg.claim_slot(shm.Role.LIBRARY)
    other = seg.claim_slot(shm.Role.WORKER)  # this process twice: a live slot to scribble on
    index = seg.store_index("store1", create=True)
    assert index is not None
    seg.words[seg.counter_index(mine, index) + 1] = 1
    seg.words[seg.counter_index(other, index) + 1] = 5
    assert seg.check() is None
    seg.words[_slot_word(seg, other, field)] = value
    problem = seg.check()
    assert problem is not None and problem.kind is shm.ProblemKind.GARBAGE
    assert f"process slot {other}" in problem.message and found in problem.message
    # readers: not alive, its counters ignored -- and nothing raises
    assert [s.slot for s in seg.slots()] == [mine]
    assert seg.active_operations("store1") == (0, 1)
    assert seg.lagging(seg.generation()) == seg.lagging(seg.generation(), exclude=frozenset({other}))
    assert seg.check(contents=False) is None  # the header is sound: workers keep their mapping


def test_random_bytes_over_the_slot_area_do_not_stop_a_claim(seg: shm.Segment) -> None:
    seg.mm[shm.OFF_SLOTS : shm.OFF_SLOTS + 4096] = os.urandom(4096)
    problem = seg.check()
    assert problem is not None and problem.kind is shm.ProblemKind.GARBAGE
    assert seg.slots() == [] and seg.active_operations("store1") == (0, 0)
    slot = seg.claim_slot(shm.Role.WORKER)  # a garbage slot is free to be claimed
    assert [s.slot for s in seg.slots()] == [slot]


def test_an_operation_count_out_of_range_is_ignored_and_found(seg: shm.Segment) -> None:
    a, b = seg.claim_slot(shm.Role.LIBRARY), seg.claim_slot(shm.Role.WORKER)
    index = seg.store_index("store1", create=True)
    assert index is not None
    seg.words[seg.counter_index(a, index)] = 2
    seg.words[seg.counter_index(b, index) + 1] = 2**64 - 1
    assert seg.active_operations("store1") == (2, 0)
    problems = {str(seg.check()) for _ in range(shm.MAX_SLOTS)}  # one block per call, round robin
    assert any(f"operation counters of process slot {b}: write count {2**64 - 1}" in p for p in problems)


@pytest.mark.parametrize(
    ("tag", "name", "found"),
    [
        (2, b"store1", "is not a tag"),  # even
        (2**40 | 1, b"store1", "is not a tag"),  # above 2**33
        (1, b"", "is not a tag"),  # no name
        ((12345 << 1) | 1, b"store1", "does not match the name"),  # a valid-looking tag of another name
    ],
)
def test_a_scribbled_store_table_entry_is_found(seg: shm.Segment, tag: int, name: bytes, found: str) -> None:
    seg.register_stores(["store1", "store2"])
    assert seg.check() is None
    index = 777
    off = shm.OFF_NAMES + index * shm.NAME_ENTRY_SIZE
    seg.mm[off + 8 : off + 8 + shm.NAME_BYTES] = name.ljust(shm.NAME_BYTES, b"\0")
    seg.words[off // 8] = tag
    problems = [seg.check() for _ in range(shm.MAX_STORES // shm.NAME_CRC_WINDOW + 1)]
    assert any(p is not None and f"entry {index}" in p.message and found in p.message for p in problems)
    assert seg.store_index("store2") is not None  # probes still work


def test_check_of_a_full_store_table_stays_cheap(seg: shm.Segment) -> None:
    """The manager runs check() every 0.5 s: with all 65,536 names it must stay far below that."""
    names = [f"store{i:06d}" for i in range(shm.MAX_STORES)]
    seg.register_stores(names)
    slots = [seg.claim_slot(shm.Role.WORKER) for _ in range(8)]
    for slot in slots:
        for name in names[::7]:
            seg.words[seg.counter_index(slot, seg.store_index(name) or 0)] = 1
    assert seg.check() is None
    timings = []
    for _ in range(40):
        start = time.perf_counter()
        assert seg.check() is None
        timings.append(time.perf_counter() - start)
    # ~1 ms on the project machine; the bound leaves room for a busy CI box
    assert sorted(timings)[len(timings) // 2] < 0.010, timings


def test_the_check_of_a_large_table_costs_what_a_small_one_does_and_still_sees_all_of_it(run_dir: Path) -> None:
    """At 100,000 stores (a 262,144-entry table, 12 MB) the manager's 0.5 s check reads one window
    of the table and of one counter block per call, so it costs the same as at 65,536 entries; a
    scribble anywhere is still found within a turn of the windows, and every name in use is counted."""
    (run_dir / "small").mkdir()
    small = shm.Segment.open(run_dir / "small", create=True)
    try:
        small.register_stores([f"store{i:06d}" for i in range(30_000)])
        small.claim_slot(shm.Role.WORKER)
        small_median = _check_median(small)
    finally:
        small.close()
        shm.unlink(run_dir / "small")
    stores = 4 * shm.MAX_STORES
    seg = shm.Segment.open(run_dir, create=True, stores=stores)
    try:
        names = [f"store{i:06d}" for i in range(100_000)]
        seg.register_stores(names)
        slot = seg.claim_slot(shm.Role.WORKER)
        turn = stores // shm.NAME_CHECK_WINDOW
        assert all(seg.check() is None for _ in range(turn))
        assert seg.names_used == len(names)
        # ~0.9 against ~0.7 ms on the project machine; reading the whole table each call was ~4x
        assert _check_median(seg) < 2.5 * small_median + 0.0005, small_median
        index = stores - 5  # in the last window
        off = shm.OFF_NAMES + index * shm.NAME_ENTRY_SIZE
        seg.words[off // 8] = 2  # an even tag is not a tag
        problems = [seg.check() for _ in range(turn)]
        assert any(p is not None and f"entry {index}: tag 0x2 is not a tag" in p.message for p in problems)
        seg.words[off // 8] = 0
        entry = seg.store_index(names[-1])
        assert entry is not None
        seg.words[seg.counter_index(slot, entry) + 1] = 2**50  # a write count out of range
        blocks = stores // shm.COUNTER_CHECK_WINDOW
        problems = [seg.check() for _ in range(blocks)]
        assert any(p is not None and f"write count {2**50} of store entry {entry}" in p.message for p in problems)
    finally:
        seg.close()


def _check_median(seg: shm.Segment, calls: int = 40) -> float:
    timings = []
    for _ in range(calls):
        start = time.perf_counter()
        assert seg.check() is None
        timings.append(time.perf_counter() - start)
    return sorted(timings)[calls // 2]


# -- the slot words are the segment's: owners write them through methods, readers get snapshots -------


def test_each_figure_of_a_slot_has_its_own_word_and_one_name(seg: shm.Segment) -> None:
    slot = seg.claim_slot(shm.Role.WORKER)
    seg.acknowledge(slot, 42, reloads=3, config_errors=1)  # the registry's figures
    seg.publish_stats(slot, lookups=10, cache_hits=7, lookup_errors=2, config_errors=1, booted=True)
    (info,) = seg.slots()
    assert (info.generation, info.lookups, info.cache_hits, info.reloads) == (42, 10, 7, 3)
    assert (info.config_errors, info.lookup_errors, info.errors, info.booted) == (1, 2, 3, True)
    base = seg.slot_base(slot)
    assert seg.words[base + shm.SLOT_CONFIG_ERRORS] == 1 and seg.words[base + shm.SLOT_LOOKUP_ERRORS] == 2
    assert seg.check() is None  # what owners write is sound
    seg.set_booted(slot, False)
    assert not seg.slots()[0].booted


def test_free_slots_of_frees_every_slot_of_a_pid_and_no_other(seg: shm.Segment) -> None:
    mine = {seg.claim_slot(shm.Role.WORKER), seg.claim_slot(shm.Role.WORKER)}
    init = seg.claim_slot(shm.Role.WORKER, pid=1)  # another live process
    before = seg.heartbeats()
    assert set(before) == {os.getpid(), 1}
    assert seg.free_slots_of(os.getpid()) == 2
    assert [s.slot for s in seg.slots()] == [init] and seg.slot_pid(init) == 1
    assert all(seg.slot_pid(s) == 0 for s in mine)
    time.sleep(0.001)
    seg.beat(init)
    assert seg.heartbeats()[1] > before[1]


def _scribble_word(seg: shm.Segment, offset: int, value: int) -> None:
    seg.words[offset // 8] = value


@pytest.mark.parametrize(
    ("offset", "value", "kind", "found"),
    [
        (shm.OFF_MAGIC, int.from_bytes(b"NOTOURS!", "little"), "overwritten", "foreign: magic"),
        (shm.OFF_VERSION, 1, "overwritten", "layout version 1, this dsproxy uses 3"),
        (shm.OFF_SIZE, 4096, "overwritten", "size 4096"),
        (shm.OFF_MAX_SLOTS, 7, "overwritten", "7 slots"),
        (shm.OFF_MAX_STORES, 9, "overwritten", "9 store entries"),
        (shm.OFF_STATE, 9, "overwritten", "state 9"),
    ],
)
def test_check_and_open_decode_a_scribbled_header_alike(
    run_dir: Path, offset: int, value: int, kind: str, found: str
) -> None:
    seg = shm.Segment.open(run_dir, create=True)
    try:
        _scribble_word(seg, offset, value)
        problem = seg.check(contents=False)
        assert problem is not None and problem.kind == kind and found in problem.message
        with pytest.raises(shm.SegmentError) as refused:
            shm.Segment.open(run_dir, create=False)
        assert str(refused.value) == problem.message  # one decoder, one message
    finally:
        seg.close()


def test_a_retired_segment_opens_and_check_says_retired(run_dir: Path) -> None:
    seg = shm.Segment.open(run_dir, create=True)
    seg.retire()
    again = shm.Segment.open(run_dir, create=False)  # a process opening it in the moment before the swap
    try:
        for s in (seg, again):
            problem = s.check(contents=False)
            assert problem is not None and problem.kind is shm.ProblemKind.RETIRED
    finally:
        again.close()
        seg.close()


def test_a_segment_moved_away_from_checks_retired_not_replaced(run_dir: Path) -> None:
    """After a move the name points to the new object: a process that checks before it noticed
    the bump must move (carrying its operations), not run degraded (dropping them)."""
    seg = shm.Segment.open(run_dir, create=True)
    new = shm.recreate(run_dir, mapped=seg, stores=shm.MAX_STORES * 2)
    try:
        problem = seg.check(contents=False)
        assert problem is not None and problem.kind is shm.ProblemKind.RETIRED
    finally:
        new.close()
        seg.close()


def test_a_check_without_a_free_descriptor_says_nothing_is_wrong(seg: shm.Segment) -> None:
    """A connection flood can use up a worker's descriptors; the periodic check must then not raise
    (an uncaught OSError there ended the worker, and repeated, the whole proxy)."""

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with pytest.raises(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        assert seg.check() is None
        assert seg.check(contents=True) is None
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert seg.check(contents=True) is None
