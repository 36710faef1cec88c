"""The invalidation ring and the splice it drives: they may make a reload cheaper, never different."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy.config import Value, dump, parse
from dsproxy.config import splice as splice_mod
from dsproxy.config.splice import Regions, edited_names, region_start, splice
from dsproxy.ipc import shm

Kind = shm.ChangeKind


@pytest.fixture
def seg(tmp_path: Path) -> Iterator[shm.Segment]:
    segment = shm.Segment.open(tmp_path, create=True)
    try:
        yield segment
    finally:
        segment.close()
        shm.unlink(tmp_path)


def test_the_ring_names_what_changed_between_two_generations(seg: shm.Segment) -> None:
    g0 = seg.generation()
    g1 = seg.publish([(Kind.CREATED, "alpha")])
    g2 = seg.publish([(Kind.UPDATED, "beta"), (Kind.REMOVED, "gamma")])
    assert seg.changes_since(g0, g2) == frozenset({"alpha", "beta", "gamma"})
    assert seg.changes_since(g1, g2) == frozenset({"beta", "gamma"})
    assert seg.changes_since(g0, g1) == frozenset({"alpha"})  # a later publish is not part of it
    assert seg.changes_since(g2, g2) == frozenset()


def test_the_ring_does_not_tell_across_a_hand_edit_a_bare_bump_or_a_lap(seg: shm.Segment) -> None:
    g0 = seg.generation()
    g1 = seg.publish([(Kind.EVERYTHING, "*")])
    assert seg.changes_since(g0, g1) is None
    g2 = seg.bump_generation()  # a registry noticing a hand edit: no entry
    g3 = seg.publish([(Kind.UPDATED, "alpha")])
    assert seg.changes_since(g1, g3) is None
    assert seg.changes_since(g2, g3) == frozenset({"alpha"})
    for i in range(shm.RING_SIZE):
        seg.publish([(Kind.UPDATED, f"s{i}")])
    assert seg.changes_since(g3, seg.generation()) is None  # fell off the ring
    assert seg.changes_since(seg.generation() - 3, seg.generation()) is not None


def test_a_scribbled_ring_entry_makes_the_ring_silent_not_wrong(seg: shm.Segment) -> None:
    g0 = seg.generation()
    g1 = seg.publish([(Kind.UPDATED, "alpha")])
    entry = shm.OFF_RING // 8
    for word, value in ((shm.RING_SEQ, 77), (shm.RING_KIND, 99), (shm.RING_SEQ, 2**64 - 1)):
        saved = seg.words[entry + word]
        seg.words[entry + word] = value
        assert seg.changes_since(g0, g1) is None
        seg.words[entry + word] = saved
    seg.words[shm.OFF_RING_HEAD // 8] = 2**64 - 2
    assert seg.changes_since(g0, g1) is None
    seg.publish([(Kind.UPDATED, "beta")])  # the writer starts over from a garbage head


def _config(rng: random.Random, names: list[str]) -> dict[str, dict[str, Value]]:
    return {n: _props(rng, n) for n in names}


def _props(rng: random.Random, name: str) -> dict[str, Value]:
    props: dict[str, Value] = {"path": f"/srv/{name}"}
    if rng.random() < 0.5:
        props["comment"] = rng.choice(["", "a comment", "x" * rng.randrange(1, 40)])
    if rng.random() < 0.3:
        props["maintenance-mode"] = rng.choice(["offline", "read-only"])
    return props


def _variant(rng: random.Random, text: str) -> str:
    """A hand edit's kind of difference: what a splice must notice (or parse identically)."""
    choice = rng.randrange(6)
    if choice == 0:
        return text.replace("\n\n", "\n\n\n", 1)
    if choice == 1:
        return text.replace("\tpath", "  path", 1)
    if choice == 2:
        return text.replace("\n\n", "\n \n", 1)
    if choice == 3:
        return text + "\n"
    if choice == 4:
        return text.replace("datastore: ", "datastore:  ", 1)
    return text.replace("\n", "\r\n")


@pytest.mark.parametrize("seed", range(40))
def test_a_splice_is_a_fresh_parse_or_nothing(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"st{i:03d}" for i in range(rng.randrange(1, 30))]
    old_cfg = _config(rng, names)
    old_text = dump(old_cfg)
    if rng.random() < 0.2:
        old_text = _variant(rng, old_text)
    old = parse(old_text)
    new_cfg = {n: dict(p) for n, p in old_cfg.items()}
    changed = set()
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(3)
        if op == 0:
            name = f"new{rng.randrange(100)}"
            new_cfg.pop(name, None)
            new_cfg[name] = _props(rng, name)
        elif op == 1 and new_cfg:
            name = rng.choice(list(new_cfg))
            new_cfg[name] = _props(rng, name)
        elif new_cfg:
            name = rng.choice(list(new_cfg))
            del new_cfg[name]
        else:
            continue
        changed.add(name)
    new_text = dump(new_cfg)
    if rng.random() < 0.2:
        new_text = _variant(rng, new_text)
    named = set(changed) if rng.random() < 0.8 else set(list(changed)[:-1])  # the ring may miss one
    result = splice(b"\n" + old_text.encode(), old, b"\n" + new_text.encode(), named)
    fresh = parse(new_text)
    if result is None:  # refused: the old config is as it was (the caller parses the file instead)
        assert old == parse(old_text) and list(old) == list(parse(old_text))
    if result is not None:
        config, props = result
        assert config == fresh and list(config) == list(fresh)
        assert set(props) == named
        assert all(props[n] == fresh.get(n) for n in named)
    elif new_text == dump(new_cfg) and old_text == dump(old_cfg) and named == changed and old:
        pytest.fail("a canonical write the ring fully names must splice")


@pytest.mark.parametrize("seed", range(40))
def test_the_stores_a_hand_edit_changed_are_found_and_proven(seed: int) -> None:
    """What a worker does with a hand edit (the ring says "everything"): the stores where the texts
    differ, spliced.  The answer is the fresh parse or nothing, and an edit of stores next to each
    other in a canonical file is always found."""
    rng = random.Random(seed)
    names = [f"st{i:03d}" for i in range(rng.randrange(2, 40))]
    old_cfg = _config(rng, names)
    old_text = dump(old_cfg)
    old = parse(old_text)
    new_cfg = {n: dict(p) for n, p in old_cfg.items()}
    at = rng.randrange(len(names))
    touched = names[at : at + rng.randrange(1, 4)]
    for name in touched:
        op = rng.randrange(3)
        if op == 0:
            new_cfg[name] = {**new_cfg[name], "comment": f"hand {seed}"}
        elif op == 1:
            del new_cfg[name]
        else:
            new_cfg[name] = _props(rng, name)
    if rng.random() < 0.3:
        new_cfg[f"added{seed}"] = _props(rng, f"added{seed}")
    new_text = dump(new_cfg)
    canonical = True
    if rng.random() < 0.3:
        new_text, canonical = _variant(rng, new_text), False
    a, b = b"\n" + old_text.encode(), b"\n" + new_text.encode()
    guessed = edited_names(a, b)
    assert guessed is not None
    result = splice(a, old, b, guessed)
    fresh = parse(new_text)
    if result is not None:
        config, _ = result
        assert config == fresh and list(config) == list(fresh)
    elif canonical:
        pytest.fail(f"a canonical edit of {touched} was not found: guessed {sorted(guessed)}")


def test_a_hand_edit_spanning_too_many_stores_is_left_to_a_full_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {f"st{i:03d}": {"path": f"/srv/st{i:03d}"} for i in range(50)}
    old = b"\n" + dump(cfg).encode()
    cfg["st001"] = {"path": "/srv/st001", "comment": "first"}
    cfg["st048"] = {"path": "/srv/st048", "comment": "last"}
    new = b"\n" + dump(cfg).encode()
    guessed = edited_names(old, new)
    assert guessed is not None and {"st001", "st048"} <= guessed
    monkeypatch.setattr(splice_mod, "EDITED_MAX", 10)
    assert edited_names(old, new) is None
    assert edited_names(old, old) == frozenset()


@pytest.mark.parametrize("seed", range(30))
def test_the_region_index_follows_a_chain_of_splices(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker keeps where each store's region starts through every change it applies, so that
    it never has to search the file for one: after each splice of a chain of canonical writes
    (creates, updates, removes, a store removed and created again), the index still gives every
    store's place exactly, and the splice is the fresh parse."""
    rng = random.Random(seed)
    monkeypatch.setattr(Regions, "CHUNK", rng.choice([1, 2, 5, 256]))
    cfg = _config(rng, [f"st{i:03d}" for i in range(rng.randrange(1, 40))])
    text = b"\n" + dump(cfg).encode()
    config = parse(text)
    regions = Regions.of(text, config)
    assert regions is not None
    for serial in range(25):
        changed = set()
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            if op == 0 or not cfg:
                name = f"new{serial}x{rng.randrange(3)}"
                cfg.pop(name, None)
                cfg[name] = _props(rng, name)
            elif op == 1:
                name = rng.choice(list(cfg))
                cfg[name] = _props(rng, name)
            elif op == 2 and len(cfg) > 1:
                name = rng.choice(list(cfg))
                del cfg[name]
            else:  # removed and created again: it moves to the end
                name = rng.choice(list(cfg))
                cfg[name] = cfg.pop(name)
            changed.add(name)
        new_text = b"\n" + dump(cfg).encode()
        result = splice(text, config, new_text, changed, regions)
        assert result is not None
        config, text = result[0], new_text
        fresh = parse(new_text)
        assert config == fresh and list(config) == list(fresh)
        assert {n: regions.offset(n) for n in cfg} == {n: region_start(text, n) for n in cfg}


def test_a_file_whose_regions_are_not_one_store_each_gets_no_index() -> None:
    text = b"\ndatastore: aaa\n\tpath /a\n\n\n\ndatastore: bbb\n\tpath /b\n"
    assert Regions.of(text, parse(text)) is not None  # extra blank lines are fine
    for odd in (
        b"\ndatastore: aaa\n\tpath /a\n \ndatastore: bbb\n\tpath /b\n",  # a blank line with a space
        b"\n\ndatastore: aaa\n\tpath /a\n",  # a blank line first
    ):
        assert Regions.of(odd, parse(odd)) is None


def _shared(a: bytes, b: bytes) -> tuple[int, int]:
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix


@pytest.mark.parametrize("seed", range(120))
def test_a_patch_is_a_fresh_parse_or_nothing(seed: int) -> None:
    """What a worker does with the manager's file record: the bytes between a shared start and a
    shared end put into its copy.  Whatever the two texts (a canonical write, a hand edit, an odd
    layout) and however much of the shared start and end the record claims, the result is the
    fresh parse of the new text, byte for byte in the copy -- or nothing, copy and config untouched.
    Canonical writes (updates in place, removes, creates at the end) are always patched."""
    rng = random.Random(seed)
    names = [f"st{i:03d}" for i in range(rng.randrange(1, 30))]
    old_cfg = _config(rng, names)
    old_text = dump(old_cfg)
    odd = rng.random() < 0.15
    if odd:
        old_text = _variant(rng, old_text)
    new_cfg = {n: dict(p) for n, p in old_cfg.items()}
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        if op == 0:
            name = f"new{rng.randrange(100)}"
            if name not in new_cfg:
                new_cfg[name] = _props(rng, name)
        elif op == 1 and new_cfg:
            name = rng.choice(list(new_cfg))
            new_cfg[name] = _props(rng, name)
        elif len(new_cfg) > 1:
            del new_cfg[rng.choice(list(new_cfg))]
    items = list(new_cfg.items())
    if items and rng.random() < 0.3:  # what only a hand edit does: a store created or moved mid-file
        odd = True
        moved = (
            (f"mid{seed}", _props(rng, f"mid{seed}")) if rng.random() < 0.5 else items.pop(rng.randrange(len(items)))
        )
        items.insert(rng.randrange(len(items) + 1), moved)
        new_cfg = dict(items)
    new_text = dump(new_cfg)
    if items and rng.random() < 0.1:  # ... or a store defined twice
        odd = True
        name, props = rng.choice(items)
        new_text += "\n" + dump({name: {**props, "comment": "twice"}})
    if rng.random() < 0.15:
        new_text, odd = _variant(rng, new_text), True
    old_b, new_b = b"\n" + old_text.encode(), b"\n" + new_text.encode()
    prefix, suffix = _shared(old_b[1:], new_b[1:])
    if rng.random() < 0.3:  # a record may claim less than is shared (the manager's block-wise walk)
        prefix = rng.randrange(prefix + 1)
        suffix = rng.randrange(suffix + 1)
    text = bytearray(old_b)
    old = parse(old_text)
    before = dict(old)
    start, end = 1 + prefix, len(text) - suffix
    changed = splice_mod.patch(text, old, start, end, new_b[1 + prefix : len(new_b) - suffix])
    if changed is None:
        assert bytes(text) == old_b and old == before and list(old) == list(before)
        assert odd or not old_cfg, "a canonical write must patch"
        return
    fresh = parse(new_text)
    assert bytes(text) == new_b
    assert old == fresh and list(old) == list(fresh) and not fresh.duplicates
    assert {n: fresh.get(n) for n in changed} == changed
    assert all(before.get(n) == fresh.get(n) for n in set(before) | set(fresh) if n not in changed)


@pytest.mark.parametrize("seed", range(20))
def test_the_manager_tells_what_a_write_shares_with_the_file_before(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window a write's file record names: the file before and after really share that many
    bytes at the start and the end, and the patch it leads to is the write -- through a chain of
    writes with blocks filled, emptied and added."""
    from dsproxy.daemon import kept as kept_mod
    from dsproxy.daemon.kept import KeptConfig

    rng = random.Random(seed)
    monkeypatch.setattr(kept_mod, "BLOCK_SECTIONS", rng.choice([1, 3, 256]))
    cfg = _config(rng, [f"st{i:03d}" for i in range(rng.randrange(1, 30))])
    kept = KeptConfig.read(dump(cfg).encode(), "datastore.cfg")
    text = bytearray(b"\n" + kept.joined())
    config = parse(bytes(text))
    regions = Regions.of(text, config)
    for serial in range(15):
        changes: list[tuple[str, dict[str, Value] | None]] = []
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            live = [n for n in kept.config if all(n != c for c, _ in changes)]
            if op == 0 or not live:
                changes.append((f"new{serial}x{len(changes)}", {"path": f"/srv/n{serial}x{len(changes)}"}))
            elif op == 1:
                name = rng.choice(live)
                changes.append((name, {**kept.config[name], "comment": f"c{serial}"}))
            elif len(live) > 1:
                changes.append((rng.choice(live), None))
        pending = kept.prepare(changes, "datastore.cfg")
        before, after = kept.joined(), pending.data
        prefix, suffix = kept.window(pending)
        assert before[:prefix] == after[:prefix] and prefix + suffix <= min(len(before), len(after))
        assert before[len(before) - suffix :] == after[len(after) - suffix :]
        kept.commit(pending, kept.hash(pending))
        middle = after[prefix : len(after) - suffix]
        assert splice_mod.patch(text, config, 1 + prefix, len(text) - suffix, middle, regions) is not None
        assert bytes(text) == b"\n" + after
        fresh = parse(after)
        assert config == fresh and list(config) == list(fresh)
        assert regions is not None and {n: regions.offset(n) for n in fresh} == {
            n: region_start(text, n) for n in fresh
        }
