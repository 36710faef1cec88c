"""The shared-memory segment is a file format: its layout is pinned, foreign segments are refused."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import posix_ipc
import pytest

from dsproxy.ipc import shm


def test_layout_is_pinned() -> None:
    assert shm.MAGIC == b"DSPXSHM1"
    assert shm.LAYOUT_VERSION == 1
    assert (shm.OFF_MAGIC, shm.OFF_VERSION, shm.OFF_SIZE, shm.OFF_STATE) == (0, 8, 16, 24)
    assert (shm.OFF_MAX_SLOTS, shm.OFF_MAX_STORES, shm.OFF_CREATED, shm.OFF_CREATOR) == (32, 40, 48, 56)
    assert (shm.OFF_GENERATIONS, shm.NUM_GENERATIONS, shm.GEN_DATASTORE, shm.GEN_TOKEN) == (128, 16, 0, 1)
    assert (shm.OFF_SLOTS, shm.SLOT_SIZE, shm.MAX_SLOTS) == (4096, 128, 128)
    assert (shm.SLOT_PID, shm.SLOT_START, shm.SLOT_ROLE, shm.SLOT_BOOTED, shm.SLOT_HEARTBEAT) == (0, 1, 2, 3, 4)
    assert (shm.SLOT_GENERATION, shm.SLOT_REQUESTS, shm.SLOT_CACHE_HITS, shm.SLOT_RELOADS, shm.SLOT_ERRORS) == (
        5,
        6,
        7,
        8,
        9,
    )
    assert (shm.OFF_NAMES, shm.NAME_ENTRY_SIZE, shm.MAX_STORES) == (20480, 48, 65536)
    assert (shm.OFF_COUNTERS, shm.COUNTER_BLOCK_SIZE) == (3166208, 1048576)
    assert shm.SEGMENT_SIZE == 137383936
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
    _raw_segment(run_dir, shm.SEGMENT_SIZE, shm.MAGIC + (2).to_bytes(8, "little"))
    with pytest.raises(shm.SegmentError, match="layout version 2, this dsproxy uses 1"):
        shm.Segment.open(run_dir, create=True)


def test_truncated_segment_is_refused(run_dir: Path) -> None:
    header = shm.MAGIC + (1).to_bytes(8, "little") + shm.SEGMENT_SIZE.to_bytes(8, "little")
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
        (shm.SLOT_REQUESTS, 2**60, "requests"),
        (12, 1, "reserved words"),
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
    assert problem is not None and problem.kind == "garbage"
    assert f"process slot {other}" in problem.message and found in problem.message
    # readers: not alive, its counters ignored -- and nothing raises
    assert [s.slot for s in seg.slots()] == [mine]
    assert seg.active_operations("store1") == (0, 1)
    assert seg.lagging(seg.generation()) == seg.lagging(seg.generation(), exclude=frozenset({other}))
    assert seg.check(contents=False) is None  # the header is sound: workers keep their mapping


def test_random_bytes_over_the_slot_area_do_not_stop_a_claim(seg: shm.Segment) -> None:
    seg.mm[shm.OFF_SLOTS : shm.OFF_SLOTS + 4096] = os.urandom(4096)
    problem = seg.check()
    assert problem is not None and problem.kind == "garbage"
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
