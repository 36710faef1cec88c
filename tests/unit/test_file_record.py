"""The file record the manager keeps with each datastore.cfg it writes (dsproxy.config.record)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dsproxy.config import record as file_record
from dsproxy.config import replace_file
from dsproxy.config.record import FileRecord, new_token


def _read(path: Path) -> FileRecord | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return file_record.read(fd)
    finally:
        os.close(fd)


def test_a_written_file_carries_its_record_with_its_own_stamp(tmp_path: Path) -> None:
    """The record is on the file from the moment it exists (set on the temp file), and names the
    stamp the file has -- what a worker compares with its own fstat."""
    path = tmp_path / "datastore.cfg"
    first = FileRecord(new_token())
    written = replace_file(path, b"datastore: a\n\tpath /a\n", record=first)
    assert written.recorded
    st = os.stat(path)
    assert written.stamp == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert _read(path) == first._replace(new=written.stamp)
    second = FileRecord(new_token(), (0, 0, 0), first.token, written.stamp, 14, 8)
    again = replace_file(path, [b"datastore: a\n", b"\tpath /b\n"], record=second, sync=False)
    back = _read(path)
    assert back is not None and back.token != first.token
    assert back == second._replace(new=again.stamp)


def test_a_file_written_without_one_has_none(tmp_path: Path) -> None:
    """PBS, an editor, or any other writer leaves no record: the worker reads such a file whole."""
    path = tmp_path / "datastore.cfg"
    assert not replace_file(path, b"x\n").recorded
    assert _read(path) is None
    path.write_bytes(b"y\n")
    assert _read(path) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("magic", b"XXXX"),
        ("version", 2),
        ("token", bytes(16)),  # zero: "none"
        ("new_size", 2**40),  # no datastore.cfg is a terabyte
        ("old_mtime", 2**63),
        ("prefix", 4000),  # more shared than the old file (3000 bytes) holds
        ("suffix", 4500),  # more than the new one (5000) holds with the prefix
    ],
)
def test_a_garbage_record_reads_as_none(tmp_path: Path, field: str, value: object) -> None:
    fields: dict[str, object] = {
        "magic": file_record.MAGIC,
        "version": file_record.VERSION,
        "token": b"t" * 16,
        "new_ino": 11,
        "new_size": 5000,
        "new_mtime": 1_700_000_000_000_000_000,
        "old_token": b"o" * 16,
        "old_ino": 10,
        "old_size": 3000,
        "old_mtime": 1_699_000_000_000_000_000,
        "prefix": 1000,
        "suffix": 1000,
    }
    good = file_record._FORMAT.pack(*fields.values())
    assert FileRecord.unpack(good) == FileRecord(
        b"t" * 16, (11, 5000, 1_700_000_000_000_000_000), b"o" * 16, (10, 3000, 1_699_000_000_000_000_000), 1000, 1000
    )
    fields[field] = value
    assert FileRecord.unpack(file_record._FORMAT.pack(*fields.values())) is None
    assert FileRecord.unpack(good[:-1]) is None and FileRecord.unpack(good + b"\0") is None
    path = tmp_path / "f"
    path.write_bytes(b"")
    os.setxattr(path, file_record.NAME, b"\xff" * 1000 if field == "magic" else good[:10])
    assert _read(path) is None  # another size: not a record


@pytest.mark.parametrize(
    "code",
    [
        errno.ENOTSUP,  # a file system without user xattrs (logged once)
        errno.EDQUOT,  # a quota hit by the xattr's block (logged each time)
    ],
)
def test_an_error_setting_the_record_leaves_it_out_not_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The record is an optimisation: no error setting it refuses a config write; the file then
    has none, and its workers read it whole."""

    def refuse(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "setxattr", refuse)
    path = tmp_path / "datastore.cfg"
    written = replace_file(path, b"z\n", record=FileRecord(new_token()))
    assert not written.recorded and path.read_bytes() == b"z\n"
    monkeypatch.undo()
    assert _read(path) is None
