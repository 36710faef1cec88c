"""The manager's kept copy of ``datastore.cfg``: writes in O(changed) (issue 9).

A write used to read, parse, mutate, render and re-parse the whole file under the config lock:
~6 ms per 1,000 sections, 0.6 s at 100,000.  The manager is the only writer, so it keeps what it
last wrote -- the typed config, each section's canonical text (:func:`render_section`), the
digest of the file, and an index of the store paths for the nesting check -- and a write

1. trusts the kept copy while the file's stat signature (inode, size, mtime, ctime) is the one
   taken right after the last write or watch check -- a rename or a write in place changes it --
   and otherwise reads and hashes the file (a hand edit is detected by its digest, as before),
   re-parsing the whole file only when the digest is not the kept one.  Measured at 100,000
   sections on the loaded project machine: the read and the two SHA-256 (what was read, what is
   written) were ~20 ms of a ~70 ms write.  What the signature cannot see: an edit in place of
   the same size within one tick of the kernel's file clock (~4 ms) after a write or check; the
   workers still notice it (their splice compares every byte), the next write would not;
2. validates and renders only the changed sections, and re-parses each changed section's bytes
   (the issue-8 safety net, now per section: bytes that do not parse back to what was meant never
   reach the disk);
3. keeps the file's bytes in *blocks* of :data:`BLOCK_SECTIONS` consecutive sections, each the
   join of its texts, and joins again only the blocks the write changed (an update in place, a
   remove, a create at the end of the last block or in a new one); the file goes out as the list
   of block buffers with one separator between two (``writev``), so it is byte-identical to the
   join a full ``dump()`` makes of the same texts (tests compare them), and the digest is hashed
   from the same buffers by a helper thread while they are written and synced
   (:mod:`dsproxy.daemon.writer`) -- from the first changed block on, starting from the SHA-256
   state kept there by the write before (:meth:`KeptConfig.hash`).  A whole hash of 14 MB is
   ~8 ms of a core, and beside the write it made ``replace_file`` 3-5 ms slower on this 2-core
   machine (12.6-13.6 -> 15.8-19.1 ms); from the change on, it is half of that on average, and
   next to nothing for a create (the last block).  The kept state is updated in place once the file is written
   (:meth:`KeptConfig.commit`).  Before the blocks, a write spliced the changed sections into
   one kept ``bytes`` of the whole file: a ``find`` of each old section (~1.4 ms at 100,000
   stores, 14 MB) and one 14 MB join into fresh memory whose page faults made it 1-10 ms on the
   project machine, alternating with the allocator's reuse, plus ~1.3 ms to free the old one --
   about a third of the floor (the ``replace_file`` alone).  A block join is ~36 KB.

The whole file is parsed and rendered once at start (the watch's first check), not in the first
write: that was the 1.7 s p99 of bench-scale at 100,000 stores.

The nesting check (a store inside another's path, or containing one) used to compare the new path
with every configured one; :class:`PathIndex` answers it from the path's components in O(depth)
and only on a conflict falls back to the full scan, for the message naming the other store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Final, cast

from ..config import PropertyError, SectionConfig, Value, digest, parse
from ..config.file import reparse
from ..config.record import Stamp
from ..config.schema import format_value
from ..config.section import SECTION_SEPARATOR, SECTION_TYPE, render_section
from ..config.splice import common_prefix, common_suffix
from ..fsutil import components
from ..ipc.shm import RING_SIZE, ChangeKind

_SEPARATOR = SECTION_SEPARATOR.encode()

#: a change to apply: ``(name, typed properties)``, or ``(name, None)`` to remove the store
Change = tuple[str, dict[str, Value] | None]


def _key(parts: Sequence[str]) -> str:
    return "\0".join(parts)


@dataclass
class PathIndex:
    """The configured stores' paths by components: which path is taken, and which prefixes."""

    exact: dict[str, int] = field(default_factory=dict)  # a store's own components: how many stores
    prefixes: dict[str, int] = field(default_factory=dict)  # every prefix (itself included): how many

    def add(self, path: str, step: int = 1) -> None:
        if not path:
            return
        parts = components(path)
        _count(self.exact, _key(parts), step)
        for n in range(len(parts) + 1):
            _count(self.prefixes, _key(parts[:n]), step)

    def conflicts(self, path: str) -> bool:
        """Whether ``path`` is inside a configured store's path or contains one (or is one)."""
        parts = components(path)
        if _key(parts) in self.prefixes:
            return True
        return any(_key(parts[:n]) in self.exact for n in range(len(parts) + 1))


def _count(counts: dict[str, int], key: str, step: int) -> None:
    n = counts.get(key, 0) + step
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


#: sections per block of the kept file bytes (see the module): a write joins again only the blocks
#: it changed -- ~36 KB each -- and the file goes out as one ``writev`` of ~400 blocks at 100,000 stores
BLOCK_SECTIONS: Final = 256


class _Block:
    """A run of consecutive sections of the file and their canonical bytes, joined."""

    __slots__ = ("data", "names")

    def __init__(self, names: list[str], data: bytes) -> None:
        self.names = names
        self.data = data  # _SEPARATOR.join of the names' texts


@dataclass
class PendingWrite:
    """What :meth:`KeptConfig.prepare` made of a write: the file as buffers and what commit applies."""

    pieces: list[bytes]  # the file's bytes, in order: write them, hash them (no join of the whole)
    size: int
    records: list[tuple[ChangeKind, str]]
    #: per changed store, its new (canonical bytes, typed properties), or None once removed
    sections: dict[str, tuple[bytes, dict[str, Value]] | None]
    #: the stores that go to the end of the file (created, or removed and created again), in
    #: order, with the block each goes to
    appended: dict[str, _Block]
    #: per block changed, its new names and bytes; new blocks at the end, in order
    blocks: dict[_Block, tuple[list[str], bytes]]
    new_blocks: list[_Block]
    #: the first block (of the kept ones; their count: only new blocks) whose bytes change: the
    #: file is the same up to its start, and so is the SHA-256 state there
    first: int

    @property
    def data(self) -> bytes:
        """The whole file as one ``bytes`` (for tests; the writer writes :attr:`pieces`)."""
        return b"".join(self.pieces)


@dataclass
class Hashed:
    """The digest of a pending write's file, and the SHA-256 states it passed at each block start
    from :attr:`PendingWrite.first` on (what the next write starts hashing from)."""

    digest: str
    first: int  # the block it started hashing at
    states: list[Any]  # hashlib objects, one a block from ``first`` on


def _hashed(pieces: list[bytes], start: Any, first: int) -> Hashed:
    """Hash ``pieces`` from the ``first`` block on (pieces ``2 * first``...: a block, a separator,
    ...), starting from ``start``, the state of everything before; a copy of the state at each
    block start is kept."""
    h = start.copy()
    states = []
    for k in range(2 * first, len(pieces)):
        if k % 2 == 0:
            states.append(h.copy())
        h.update(pieces[k])
    return Hashed(h.hexdigest(), first, states)


class KeptConfig:
    """The file as this manager last wrote (or read) it."""

    def __init__(
        self, config: SectionConfig, texts: dict[str, bytes], file_digest: str, paths: PathIndex | None = None
    ) -> None:
        self.config = config  # typed, in file order; read-only for callers
        self.texts = texts  # canonical text of each section, same order
        self._digest: str | None = file_digest  # of the file on disk (not canonical after a read); see digest
        self._paths = paths  # built on first use (a create's nesting check): ~0.3 s at 100,000 stores
        names = list(texts)
        self.blocks = [
            _Block(chunk, _SEPARATOR.join([texts[n] for n in chunk]))
            for chunk in (names[i : i + BLOCK_SECTIONS] for i in range(0, len(names), BLOCK_SECTIONS))
        ]
        self.block_of = {name: block for block in self.blocks for name in block.names}
        #: SHA-256 of the kept bytes before each block (once a write hashed them: from that write's
        #: first changed block on, the next write hashes only what follows its own first change)
        self.states: list[Any] = []
        #: the token and stamp of the file this manager wrote from these blocks, with its record
        #: (its bytes are exactly :meth:`pieces`: :mod:`dsproxy.config.record`), or None: read
        #: from a file, which need not be canonical, or written without a record
        self.identity: tuple[bytes, Stamp] | None = None

    @property
    def digest(self) -> str:
        """SHA-256 of the file: given at :meth:`read`, hashed by the writer beside each local write
        (:meth:`hash`), or -- after a :meth:`commit` without one (fleet mode: no fsync to hash
        beside, and a watch batch at 100,000 stores then paid ~5 ms of a core for a digest nobody
        asked for, on each host) -- computed when first asked, from the last block whose hash
        state is still kept (the watch's next pass asks: one hash for a burst of writes)."""
        if self._digest is None:
            pieces, states = self.pieces(), self.states
            first = len(states) - 1
            if first >= 0 and 2 * first < len(pieces):
                hashed = _hashed(pieces, states[first], first)
            else:
                hashed = _hashed(pieces, hashlib.sha256(), 0)
            self.states = [*states[: hashed.first], *hashed.states]
            self._digest = hashed.digest
        return self._digest

    @property
    def digested(self) -> bool:
        """Whether :attr:`digest` is known without hashing."""
        return self._digest is not None

    @property
    def paths(self) -> PathIndex:
        """The index of the configured stores' paths (built from the config the first time)."""
        if self._paths is None:
            self._paths = PathIndex()
            for props in self.config.values():
                self._paths.add(str(props.get("path", "")))
        return self._paths

    @classmethod
    def read(cls, data: bytes, filename: str) -> KeptConfig:
        """Parse a whole file (raises ``ParseError``) and render each section canonically: O(n),
        once at start and after each hand edit.  The values are the parser's, checked by the very
        checkers :func:`render_section` would run again, so each text is :func:`canonical_text`
        (a property test holds the two equal for whatever parses): at 100,000 stores 0.27-0.30 s
        against 0.93-0.95 s, and the read 0.9 s against 1.5 s -- what the manager pays once after
        each hand edit, in its writer thread, before its next write."""
        config = parse(data, filename=filename)
        texts = {name: canonical_text(name, props) for name, props in config.items()}
        return cls(config, texts, digest(data))

    def pieces(self) -> list[bytes]:
        """The canonical file of the kept texts, as buffers: what a full ``dump()`` writes."""
        return _pieces(self.blocks, {})

    def joined(self) -> bytes:
        """The canonical file of the kept texts in one ``bytes`` (for tests)."""
        return b"".join(self.pieces())

    def prepare(
        self, changes: Sequence[Change], filename: str, verified: Mapping[str, bytes] | None = None
    ) -> PendingWrite:
        """The file after ``changes`` (applied in order) and the ring's records; ``self`` is not
        modified (the write may still fail): :meth:`commit` applies it once the file is written.

        Only the changed sections are validated, rendered and parsed back, and only the blocks
        that hold them joined again: an update keeps its place, a create goes to the last block
        (or a new one once it is full), a remove leaves its block.  ``verified`` holds canonical
        texts already known to parse to their change's properties (fleet mode's full read: the
        values from etcd, parsed there), used as they are.
        """
        known = verified or {}
        if not self.texts and len(changes) > BLOCK_SECTIONS:
            filled = self._fill(changes, known)
            if filled is not None:
                return filled
        return self._edit(changes, filename, known)

    def _edit(self, changes: Sequence[Change], filename: str, known: Mapping[str, bytes]) -> PendingWrite:
        """:meth:`prepare` the general way: one :class:`_Edit` step per change."""
        edit = _Edit(self)
        for name, props in changes:
            if props is None:
                edit.remove(name)
            elif name in known:
                edit.put(name, known[name], props)
            else:
                edit.put(name, *section_bytes(name, props, filename))
        return edit.pending()

    def _fill(self, changes: Sequence[Change], known: Mapping[str, bytes]) -> PendingWrite | None:
        """:meth:`prepare` of an empty file filled with verified texts (a new host's first read
        of etcd): the blocks cut at once, not one :class:`_Edit` put per store -- those were
        0.5 s of a 100,000-store host's cold start (py-spy); the same pending write.  None when
        a store comes twice, is removed or has no verified text (then the general way).  Its
        loops over the stores are ``map``/``zip`` (C), not Python: 0.15 s against 0.06 s at
        100,000 (cProfile)."""
        names = list(map(_first, changes))
        props = list(map(_second, changes))
        if None in props or not known.keys() >= set(names):
            return None
        texts = list(map(known.__getitem__, names))
        sections: dict[str, tuple[bytes, dict[str, Value]] | None] = dict(
            zip(names, zip(texts, props, strict=True), strict=True)
        )
        if len(sections) != len(names):  # a store twice
            return None
        new_blocks = [
            _Block(names[i : i + BLOCK_SECTIONS], _SEPARATOR.join(texts[i : i + BLOCK_SECTIONS]))
            for i in range(0, len(names), BLOCK_SECTIONS)
        ]
        appended = dict(zip(names, chain.from_iterable(repeat(b, len(b.names)) for b in new_blocks), strict=True))
        if len(sections) > RING_SIZE // 4:  # what the ring records of that many (one look at it)
            records = [(ChangeKind.EVERYTHING, "*")]
        else:
            created = ChangeKind.CREATED
            records = [(created, name) for name in sections]
        pieces = _pieces(new_blocks, {})
        return PendingWrite(pieces, sum(map(len, pieces)), records, sections, appended, {}, new_blocks, 0)

    def hash(self, pending: PendingWrite) -> Hashed:
        """The digest of ``pending``'s file (in the writer's helper thread, while it is written).

        SHA-256 cannot be updated in the middle, but the file is the same up to the write's first
        changed block, and so is the hash state there: the write hashes only the rest (on
        average half of the 14 MB of 100,000 stores, ~4 of 8 ms of a core; a create at the end,
        one block).  The kept states are only read here: :meth:`commit` replaces them."""
        first, states = pending.first, self.states
        if first < len(states) and 2 * first < len(pending.pieces):  # (not: the file ends before it)
            return _hashed(pending.pieces, states[first], first)
        return _hashed(pending.pieces, hashlib.sha256(), 0)

    def window(self, pending: PendingWrite) -> tuple[int, int]:
        """How many bytes at the start and at the end the file of ``pending`` shares with the kept
        one (:meth:`pieces`; before :meth:`commit`): what the file record tells the workers.

        The pieces the two have in common are the same objects (an unchanged block's bytes, the
        one separator), so the walk from either end compares identities, then the bytes of the
        first piece that differs (one block, ~36 KB): a few us."""
        old, new = self.pieces(), pending.pieces
        old_size = sum(map(len, old))
        limit = min(old_size, pending.size)
        prefix = i = 0
        while i < len(old) and i < len(new) and old[i] is new[i]:
            prefix += len(old[i])
            i += 1
        if i < len(old) and i < len(new):
            prefix += common_prefix(old[i], new[i])
        prefix = min(prefix, limit)
        suffix, j = 0, 1
        while j <= len(old) - i and j <= len(new) - i and old[-j] is new[-j]:
            suffix += len(old[-j])
            j += 1
        if j <= len(old) and j <= len(new):
            suffix += common_suffix(old[-j], new[-j], min(len(old[-j]), len(new[-j])))
        return prefix, min(suffix, limit - prefix)

    def commit(self, pending: PendingWrite, hashed: Hashed | None, identity: tuple[bytes, Stamp] | None = None) -> None:
        """Make the kept state what ``pending`` wrote (hashed as ``hashed``, or None: the digest is
        computed when asked; the file's token and stamp if it is known to hold exactly these bytes,
        :attr:`identity`): O(changed) and the blocks' list."""
        config, texts, block_of, appended = self.config, self.texts, self.block_of, pending.appended
        config.duplicates = 0  # (the file written from the blocks has each section once)
        paths = self._paths  # (None: built from the config when first needed)
        if not config and paths is None and appended.keys() == pending.sections.keys():
            # an empty config filled (_fill: a new host's first read): every store appended, in
            # the file's order (appended's) -- the loops in C (0.15 s of Python loops at 100,000)
            sections = cast(dict[str, tuple[bytes, dict[str, Value]]], pending.sections)
            ordered = list(map(sections.__getitem__, appended))
            texts.update(zip(appended, map(_first, ordered), strict=True))
            config.update(zip(appended, map(_second, ordered), strict=True))
            block_of.update(appended)
        else:
            self._commit_edit(pending)
        for block, (names, data) in pending.blocks.items():
            block.names, block.data = names, data
        self.blocks.extend(pending.new_blocks)
        if any(not block.names for block in pending.blocks):
            self.blocks = [block for block in self.blocks if block.names]
        if hashed is None:
            self.states = self.states[: pending.first + 1]  # the bytes before the first change are the same
            self._digest = None
        else:
            self.states = [*self.states[: hashed.first], *hashed.states]
            self._digest = hashed.digest
        self.identity = identity

    def _commit_edit(self, pending: PendingWrite) -> None:
        """:meth:`commit`'s stores, one at a time: removed, updated in place, or appended."""
        config, texts, block_of, appended = self.config, self.texts, self.block_of, pending.appended
        paths = self._paths
        for name, section in pending.sections.items():
            old = config.get(name)
            if paths is not None:
                if old is not None:
                    paths.add(str(old.get("path", "")), -1)
                if section is not None:
                    paths.add(str(section[1].get("path", "")))
            if section is None or name in appended:  # gone, or goes to the end: out of its place
                if old is not None:
                    del config[name], texts[name], block_of[name]
            else:  # an update keeps its place: dict assignment, as in the bytes
                texts[name], config[name] = section
        for name, block in appended.items():
            section = pending.sections[name]
            assert section is not None
            texts[name], config[name] = section
            block_of[name] = block


_first, _second = itemgetter(0), itemgetter(1)


class _Edit:
    """The changes of one write applied, in order, to copies of the blocks they touch."""

    def __init__(self, kept: KeptConfig) -> None:
        self.kept = kept
        self.records: list[tuple[ChangeKind, str]] = []
        self.sections: dict[str, tuple[bytes, dict[str, Value]] | None] = {}
        self.where: dict[str, _Block | None] = {}  # a store's block after the changes so far (None: gone)
        self.names: dict[_Block, list[str]] = {}  # the blocks touched: their names after the changes
        self.new_blocks: list[_Block] = []
        self.appended: dict[str, _Block] = {}

    def _block(self, name: str) -> _Block | None:
        return self.where[name] if name in self.where else self.kept.block_of.get(name)

    def _names(self, block: _Block) -> list[str]:
        names = self.names.get(block)
        if names is None:
            names = self.names[block] = list(block.names)
        return names

    def remove(self, name: str) -> None:
        block = self._block(name)
        if block is None:
            raise KeyError(name)
        self._names(block).remove(name)  # O(BLOCK_SECTIONS)
        self.appended.pop(name, None)
        self.where[name] = None
        self.sections[name] = None
        self.records.append((ChangeKind.REMOVED, name))

    def put(self, name: str, raw: bytes, typed: dict[str, Value]) -> None:
        block = self._block(name)
        self.sections[name] = (raw, typed)
        if block is not None:
            self._names(block)  # joined again
            self.records.append((ChangeKind.UPDATED, name))
            return
        last = self.new_blocks[-1] if self.new_blocks else (self.kept.blocks[-1] if self.kept.blocks else None)
        if last is None or len(self._names(last)) >= BLOCK_SECTIONS:
            last = _Block([], b"")
            self.new_blocks.append(last)
        self._names(last).append(name)
        self.where[name] = self.appended[name] = last
        self.records.append((ChangeKind.CREATED, name))

    def pending(self) -> PendingWrite:
        texts, sections = self.kept.texts, self.sections
        blocks: dict[_Block, tuple[list[str], bytes]] = {}
        for block, names in self.names.items():
            parts = [texts[n] if (s := sections.get(n)) is None else s[0] for n in names]
            blocks[block] = (names, _SEPARATOR.join(parts))
        kept_blocks = self.kept.blocks
        pieces = _pieces([*kept_blocks, *self.new_blocks], blocks)
        touched = [i for i, block in enumerate(kept_blocks) if block in blocks] if blocks else []
        first = touched[0] if touched else len(kept_blocks)
        return PendingWrite(
            pieces, sum(map(len, pieces)), self.records, sections, self.appended, blocks, self.new_blocks, first
        )


def _pieces(blocks: Iterable[_Block], changed: dict[_Block, tuple[list[str], bytes]]) -> list[bytes]:
    """The file: each non-empty block's bytes (``changed``'s where given), a separator between two."""
    pieces: list[bytes] = []
    for block in blocks:
        names, data = changed.get(block, (block.names, block.data))
        if names:
            if pieces:
                pieces.append(_SEPARATOR)
            pieces.append(data)
    return pieces


def canonical_text(name: str, typed: Mapping[str, Value]) -> bytes:
    """The canonical text :func:`render_section` gives for properties that are already typed
    and checked (a parse's), without checking them again: to tell a canonical value at a glance."""
    lines = [f"{SECTION_TYPE}: {name}\n"]
    lines += [f"\t{key} {format_value(typed[key])}\n" for key in sorted(typed)]
    return "".join(lines).encode()


def section_bytes(name: str, props: dict[str, Value], filename: str) -> tuple[bytes, dict[str, Value]]:
    """One section's canonical bytes, checked to parse back to exactly its typed properties."""
    text, typed = render_section(name, props, filename)
    raw, again = reparse(text, filename, lambda line: "value")
    if again != {name: typed}:
        got = again.get(name, {})
        key = next((k for k in sorted(set(typed) | set(got)) if typed.get(k) != got.get(k)), "name")
        raise PropertyError(key, "the value would not read back as written")
    return raw, typed
