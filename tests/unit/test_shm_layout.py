"""The shared-memory segment is a file format: its layout is pinned, foreign segments are refused."""

from __future__ import annotations

import mmap
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
