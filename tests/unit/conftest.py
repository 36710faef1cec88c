"""Fixtures of the writer tests: an instance's directories and its shared-memory segment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy.ipc import shm
from dsproxy.paths import Paths


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    p = Paths.resolve(tmp_path / "base")
    p.ensure()
    try:
        yield p
    finally:
        shm.unlink(p.run_dir)


@pytest.fixture
def seg(paths: Paths) -> Iterator[shm.Segment]:
    segment = shm.Segment.open(paths.run_dir, create=True)
    try:
        yield segment
    finally:
        segment.close()
