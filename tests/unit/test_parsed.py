"""The manager's parse left beside ``datastore.cfg`` (:mod:`dsproxy.config.parsed`): taken only
for the exact bytes it was made of, only from the config file's owner, and never in a shape other
than a parse; the writer leaves one at a large file's start and none for a small one."""

from __future__ import annotations

import hashlib
import marshal
import os
from pathlib import Path

import pytest

from dsproxy.config import Value, digest, dump, parse, parsed, read_raw, replace_file
from dsproxy.daemon.writer import ConfigWriter
from dsproxy.ipc import shm
from dsproxy.paths import Paths

NOBODY = 65534


def _file(paths: Paths, count: int = 3, comment: str = "c") -> bytes:
    cfg: dict[str, dict[str, Value]] = {
        f"st{i}": {"path": str(paths.data_dir / f"st{i}"), "comment": f"{comment} {i}", "keep-daily": i + 1}
        for i in range(count)
    }
    replace_file(paths.config_file, dump(parse(dump(cfg))).encode())
    return read_raw(paths.config_file)


def _save(paths: Paths, data: bytes) -> None:
    parsed.save(paths.config_file, digest(data), parse(data))


def _load(paths: Paths, data: bytes) -> object:
    return parsed.load(paths.config_file, digest(data), len(data))


def test_a_saved_parse_is_taken_for_the_same_bytes_and_equals_the_parse(paths: Paths) -> None:
    data = _file(paths)
    _save(paths, data)
    got = _load(paths, data)
    assert got == parse(data) and list(got) == ["st0", "st1", "st2"]  # (file order)
    assert got["st2"]["keep-daily"] == 3 and type(got).__name__ == "SectionConfig"


def test_a_duplicate_count_survives(paths: Paths) -> None:
    data = b"datastore: aaa\n\tpath /a\n\ndatastore: aaa\n\tpath /b\n"
    replace_file(paths.config_file, data)
    _save(paths, data)
    got = parsed.load(paths.config_file, digest(data), len(data))
    assert got is not None and got.duplicates == 1 and got["aaa"]["path"] == "/b"


def test_a_parse_of_other_bytes_is_not_taken(paths: Paths) -> None:
    old = _file(paths, comment="old")
    _save(paths, old)
    new = _file(paths, comment="new")  # the file changed since: that parse is stale
    assert _load(paths, new) is None
    assert _load(paths, old) is not None  # (what it was made of)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda p: os.chown(p, NOBODY, NOBODY), id="another-owner"),
        pytest.param(lambda p: os.chmod(p, 0o646), id="writable-by-others"),
        pytest.param(lambda p: os.chmod(p, 0o660), id="writable-by-the-group"),
        pytest.param(lambda p: _flip(p, len(parsed.MAGIC)), id="another-build"),
        pytest.param(lambda p: _flip(p, os.path.getsize(p) - 1), id="torn-body"),
        pytest.param(lambda p: _truncate(p, -10), id="truncated"),
        pytest.param(lambda p: _rewrite(p, lambda raw: b"X" + raw[1:]), id="bad-magic"),
        pytest.param(lambda p: _body(p, b"\xff\x00garbage"), id="not-marshal"),
        pytest.param(lambda p: _body(p, marshal.dumps(["s0", "s1"])), id="not-a-pair"),
        pytest.param(lambda p: _body(p, marshal.dumps(({"s0": "path"}, 0))), id="section-not-a-dict"),
        pytest.param(lambda p: _body(p, marshal.dumps(({1: {}}, 0))), id="name-not-a-string"),
        pytest.param(lambda p: _body(p, marshal.dumps(({}, "0"))), id="duplicates-not-an-int"),
        pytest.param(lambda p: _body(p, b"\0" * (4 * 1024 * 1024)), id="too-large"),
        pytest.param(lambda p: _link(p), id="a-symlink"),
        pytest.param(lambda p: _dir(p), id="a-directory"),
    ],
)
def test_anything_but_the_owners_parse_of_these_bytes_reads_as_none(paths: Paths, spoil: object) -> None:
    data = _file(paths)
    _save(paths, data)
    spoil(parsed.path_beside(paths.config_file))  # type: ignore[operator]
    assert _load(paths, data) is None


def test_a_missing_parse_or_config_file_reads_as_none(paths: Paths) -> None:
    data = _file(paths)
    assert _load(paths, data) is None
    _save(paths, data)
    paths.config_file.unlink()
    assert _load(paths, data) is None


def _rewrite(path: str, edit: object) -> None:
    raw = Path(path).read_bytes()
    Path(path).write_bytes(edit(raw))  # type: ignore[operator]


def _truncate(path: str, by: int) -> None:
    _rewrite(path, lambda raw: raw[:by])


def _body(path: str, body: bytes) -> None:
    """Another body, with its own hash in the header (the shape checks, not the hash, refuse it)."""
    head = parsed._HEAD
    _rewrite(path, lambda raw: raw[: head - 32] + hashlib.sha256(body).digest() + body)


def _flip(path: str, offset: int) -> None:
    _rewrite(path, lambda raw: raw[:offset] + bytes([raw[offset] ^ 1]) + raw[offset + 1 :])


def _link(path: str) -> None:
    real = path + ".real"
    os.rename(path, real)
    os.symlink(real, path)


def _dir(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)


# -- the writer leaves it ----------------------------------------------------------------------------


def test_the_writer_leaves_the_parse_of_a_large_file_as_read(
    paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ConfigWriter, "PARSED_MIN_STORES", 5)
    data = _file(paths, count=6)
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.leave_parse()
    assert _load(paths, data) == parse(data)


def test_the_writer_leaves_a_fleet_hosts_first_mirror_parse(
    paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ConfigWriter, "PARSED_MIN_STORES", 5)
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.enable_fleet()
    sections = parse(
        dump({f"mirror{i}": {"path": str(paths.data_dir / f"mirror{i}"), "comment": f"mirrored {i}"} for i in range(8)})
    )
    w.mirror_replace(dict(sections), {n: 2 for n in sections}, 2, defer_layout=True)
    w.leave_parse()
    data = read_raw(paths.config_file)
    got = _load(paths, data)
    assert got is not None and got == parse(data) and len(got) == 8


def test_a_small_file_gets_no_parse_and_an_old_one_goes(
    paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _file(paths, count=6)
    _save(paths, data)  # left by an earlier start, when the file was large
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.leave_parse()  # (6 stores: below PARSED_MIN_STORES)
    assert not os.path.lexists(parsed.path_beside(paths.config_file))


def test_the_fingerprint_is_of_the_parsers_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade's parser may type or refuse a value differently: its parse is not the old one's."""
    from dsproxy.config import schema

    before = parsed.fingerprint()
    parsed.fingerprint.cache_clear()
    monkeypatch.setattr(schema, "__file__", parsed.__file__)  # (another source for the schema)
    try:
        assert parsed.fingerprint() != before
    finally:
        parsed.fingerprint.cache_clear()


def test_a_restart_that_continues_an_overlay_leaves_no_parse(
    paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its kept config holds the overlay's stores, which are not in the file: a parse of it would
    be keyed by bytes that are nowhere (and an earlier start's goes too)."""
    monkeypatch.setattr(ConfigWriter, "PARSED_MIN_STORES", 5)
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()
    w.enable_fleet()
    sections = parse(dump({f"mirror{i}": {"path": str(paths.data_dir / f"mirror{i}")} for i in range(8)}))
    w.mirror_replace(dict(sections), dict.fromkeys(sections, 2), 2)
    w.mirror_apply({"mirror0": {**sections["mirror0"], "comment": "in the overlay"}}, {"mirror0": 3}, 3)
    assert w.overlay is not None and w.overlay.stores
    _save(paths, read_raw(paths.config_file))
    w.leave_parse()
    assert not os.path.lexists(parsed.path_beside(paths.config_file))


def test_a_file_with_duplicates_once_written_leaves_a_parse_without_them(
    paths: Paths, seg: shm.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ConfigWriter, "PARSED_MIN_STORES", 1)
    replace_file(paths.config_file, b"datastore: aaa\n\tpath /a\n\ndatastore: aaa\n\tpath /b\n")
    w = ConfigWriter(paths, lambda: seg)
    w.check_file()  # (read: 1 duplicate)
    w.update("aaa", {"comment": "written"})  # the file written canonically: each section once
    w.leave_parse()
    data = read_raw(paths.config_file)
    got = _load(paths, data)
    assert got is not None and got == parse(data) and got.duplicates == parse(data).duplicates == 0
