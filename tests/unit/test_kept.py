"""The manager's kept config (dsproxy.daemon.kept): a write made of the kept blocks is byte for byte
the full dump of the new config, whatever the changes, wherever the stores sit, whatever the block size."""

from __future__ import annotations

import random

import pytest

from dsproxy.config import Value, digest, dump, parse
from dsproxy.daemon import kept as kept_mod
from dsproxy.daemon.kept import Change, KeptConfig
from dsproxy.ipc.shm import ChangeKind


def _props(rng: random.Random, name: str) -> dict[str, Value]:
    props: dict[str, Value] = {"path": f"/srv/{name}"}
    if rng.random() < 0.6:
        props["comment"] = rng.choice(["", "a comment", "x" * rng.randrange(1, 60)])
    if rng.random() < 0.2:
        props["maintenance-mode"] = "read-only"
    return props


def _batch(rng: random.Random, expected: dict[str, dict[str, Value]], serial: int) -> list[Change]:
    """Up to 10 changes (creates, updates, removes; sometimes one store twice), applied to
    ``expected`` as the file should then say."""
    changes: list[Change] = []
    for i in range(rng.randrange(1, 11)):
        op = rng.random()
        if op < 0.35 or not expected:
            name = f"new{serial}x{i}" if rng.random() < 0.8 or not changes else changes[-1][0]
            props: dict[str, Value] | None = _props(rng, name)
        elif op < 0.75:
            name = rng.choice(list(expected))
            props = _props(rng, name)
        else:
            name = rng.choice(list(expected))
            props = None
        if props is None:
            del expected[name]
        else:
            expected[name] = props  # an update keeps its place (dict assignment), a create appends
        changes.append((name, props))
    return changes


@pytest.mark.parametrize("seed", range(40))
def test_a_write_is_the_full_dump_of_the_new_config(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(kept_mod, "BLOCK_SECTIONS", rng.choice([1, 2, 3, 7, 256]))
    expected = {f"s{i:03d}": _props(rng, f"s{i:03d}") for i in range(rng.randrange(0, 25))}
    kept = KeptConfig.read(dump(expected).encode(), "datastore.cfg")
    for serial in range(15):
        before, texts = kept.joined(), dict(kept.texts)
        changes = _batch(rng, expected, serial)
        pending = kept.prepare(changes, "datastore.cfg")
        assert kept.joined() == before and kept.texts == texts  # nothing changes before the commit
        assert pending.data == dump(expected).encode()
        assert {name for _, name in pending.records} == {name for name, _ in changes}
        if rng.random() < 0.4:  # fleet mode: no hash beside the write, the digest when asked
            kept.commit(pending, None)
            assert not kept.digested
            if rng.random() < 0.5:  # (asked now, or after more writes)
                assert kept.digest == digest(pending.data) and kept.digested
        else:
            hashed = kept.hash(pending)
            assert hashed.digest == digest(pending.data)  # hashed from the first change on
            kept.commit(pending, hashed)
            assert kept.digest == hashed.digest
        if rng.random() < 0.3:
            assert kept.digest == digest(pending.data)
        assert kept.config == parse(pending.data) and list(kept.config) == list(expected)
        assert kept.joined() == pending.data and pending.size == len(pending.data)
        assert list(kept.texts) == list(expected)
    assert kept.digest == digest(kept.joined())


def test_a_hand_edited_file_is_written_canonically_from_the_first_change() -> None:
    text = b"datastore: aaa\n  path /srv/a\n\n\n\ndatastore: bbb\n\tpath /srv/b\n"
    kept = KeptConfig.read(text, "datastore.cfg")
    pending = kept.prepare([("bbb", {"path": "/srv/b", "comment": "x"})], "datastore.cfg")
    assert pending.data == dump({"aaa": {"path": "/srv/a"}, "bbb": {"path": "/srv/b", "comment": "x"}}).encode()
    assert pending.records == [(ChangeKind.UPDATED, "bbb")]


def test_the_path_index_follows_spliced_writes() -> None:
    kept = KeptConfig.read(dump({"aaa": {"path": "/srv/a"}}).encode(), "datastore.cfg")
    pending = kept.prepare([("bbb", {"path": "/srv/b"})], "datastore.cfg")
    kept.commit(pending, kept.hash(pending))
    assert kept.paths.conflicts("/srv/b/inner") and kept.paths.conflicts("/srv")
    pending = kept.prepare([("bbb", None)], "datastore.cfg")
    kept.commit(pending, kept.hash(pending))
    assert not kept.paths.conflicts("/srv/b/inner") and kept.paths.conflicts("/srv/a/x")


@pytest.mark.parametrize("seed", range(6))
def test_an_empty_file_filled_with_verified_texts_is_the_same_write_cut_at_once(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new host's first read of etcd: the blocks cut at once (``_fill``) -- the very pending write
    one put per store makes, and a kept config that goes on the same way after its commit."""
    rng = random.Random(seed)
    monkeypatch.setattr(kept_mod, "BLOCK_SECTIONS", rng.choice([1, 3, 7, 256]))
    count = rng.randrange(kept_mod.BLOCK_SECTIONS + 1, 3 * kept_mod.BLOCK_SECTIONS + 40)
    wanted = {f"s{i:04d}": _props(rng, f"s{i:04d}") for i in range(count)}
    texts = {n: kept_mod.canonical_text(n, parse(dump({n: p}).encode())[n]) for n, p in wanted.items()}
    changes: list[Change] = [(n, parse(texts[n])[n]) for n in wanted]
    filled, put = (KeptConfig(parse(b""), {}, digest(b"")) for _ in range(2))
    pending = filled.prepare(changes, "datastore.cfg", texts)
    assert pending.blocks == {}  # (the bulk path: the general one touches every new block)
    reference = put._edit(changes, "datastore.cfg", texts)
    assert pending.data == reference.data == dump(wanted).encode()
    assert pending.records == reference.records and pending.sections == reference.sections
    assert [b.names for b in pending.new_blocks] == [reference.blocks[b][0] for b in reference.new_blocks]
    filled.commit(pending, filled.hash(pending))
    put.commit(reference, put.hash(reference))
    assert filled.joined() == put.joined() and filled.config == put.config and filled.digest == put.digest
    assert list(filled.config) == list(filled.texts) == list(parse(filled.joined())) == list(put.config)
    more: list[Change] = [("s0001", {"path": "/srv/x", "comment": "moved"}), ("s0002", None), ("new", {"path": "/n"})]
    assert filled.prepare(more, "datastore.cfg").data == put.prepare(more, "datastore.cfg").data
    # a store twice in one fill: the general way, the same file as a dump
    twice: list[Change] = [*changes, changes[0]]
    assert filled.prepare([], "x").data == put.prepare([], "x").data
    empty = KeptConfig(parse(b""), {}, digest(b""))
    assert empty.prepare(twice, "datastore.cfg", texts).data == dump(wanted).encode()


def test_a_store_removed_and_created_again_in_the_first_write_keeps_the_files_order() -> None:
    """An empty kept config's first write that removes a store and creates it again: the kept
    config's order is the file's (it goes last), as a later splice and the regions expect."""
    empty = KeptConfig(parse(b""), {}, digest(b""))
    changes: list[Change] = [
        ("aaa", {"path": "/a"}),
        ("bbb", {"path": "/b"}),
        ("aaa", None),
        ("aaa", {"path": "/a2"}),
    ]
    pending = empty.prepare(changes, "datastore.cfg")
    empty.commit(pending, empty.hash(pending))
    on_disk = parse(empty.joined())
    assert list(on_disk) == ["bbb", "aaa"]
    assert list(empty.config) == list(empty.texts) == list(on_disk) and empty.config == on_disk
