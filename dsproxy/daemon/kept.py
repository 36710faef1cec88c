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
3. writes the kept file bytes with the changed sections spliced in (:func:`_splice`: a few large
   slices, one join) -- the join :func:`render` makes of the same texts, so the file is
   byte-identical to a full ``dump()`` (tests compare them); a join of all 100,000 kept texts
   was ~3 ms, two dict copies ~2 ms more.  The digest of those bytes is computed by a helper
   thread while they are written and synced (:mod:`dsproxy.daemon.writer`).  The kept state is
   updated in place once the file is written (:meth:`KeptConfig.commit`).

The whole file is parsed and rendered once at start (the watch's first check), not in the first
write: that was the 1.7 s p99 of bench-scale at 100,000 stores.

The nesting check (a store inside another's path, or containing one) used to compare the new path
with every configured one; :class:`PathIndex` answers it from the path's components in O(depth)
and only on a conflict falls back to the full scan, for the message naming the other store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ..config import PropertyError, SectionConfig, Value, digest, parse
from ..config.file import reparse
from ..config.schema import format_value
from ..config.section import SECTION_SEPARATOR, SECTION_TYPE, render_section
from ..fsutil import components
from ..ipc.shm import ChangeKind

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


#: at most this many changes are spliced into the kept file bytes; more (a demo-store batch) join
#: every kept text again -- one ``find`` per change against one join of all the texts
SPLICE_LIMIT: Final = 8


@dataclass
class PendingWrite:
    """What :meth:`KeptConfig.prepare` made of a write: the file bytes and what commit applies."""

    data: bytes
    records: list[tuple[ChangeKind, str]]
    #: per changed store, its new (canonical bytes, typed properties), or None once removed
    sections: dict[str, tuple[bytes, dict[str, Value]] | None]
    #: the new config and texts when the write was not spliced (built as copies), else None
    rebuilt: tuple[SectionConfig, dict[str, bytes]] | None = None


class KeptConfig:
    """The file as this manager last wrote (or read) it."""

    def __init__(
        self, config: SectionConfig, texts: dict[str, bytes], file_digest: str, paths: PathIndex | None = None
    ) -> None:
        self.config = config  # typed, in file order; read-only for callers
        self.texts = texts  # canonical text of each section, same order
        self.digest = file_digest  # of the file on disk (which need not be canonical after a read)
        self._paths = paths  # built on first use (a create's nesting check): ~0.3 s at 100,000 stores
        self._joined: bytes | None = None  # _SEPARATOR.join(texts.values()), once needed

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
        once at start and after each hand edit."""
        config = parse(data, filename=filename)
        texts = {name: render_section(name, props, filename)[0].encode() for name, props in config.items()}
        return cls(config, texts, digest(data))

    def joined(self) -> bytes:
        """The canonical file of the kept texts: what a full ``dump()`` writes."""
        if self._joined is None:
            self._joined = _SEPARATOR.join(self.texts.values())
        return self._joined

    def prepare(
        self, changes: Sequence[Change], filename: str, verified: Mapping[str, bytes] | None = None
    ) -> PendingWrite:
        """The file bytes after ``changes`` and the ring's records; ``self`` is not modified (the
        write may still fail): :meth:`commit` applies it once the file is written.

        Only the changed sections are validated, rendered and parsed back; the bytes are the kept
        file with those sections spliced in (:func:`_splice`), or -- for many changes, or one
        store changed twice -- a join of every text, as before.  ``verified`` holds canonical
        texts already known to parse to their change's properties (fleet mode's full read: the
        values from etcd, parsed there), used as they are.
        """
        if len(changes) > SPLICE_LIMIT or len({name for name, _ in changes}) < len(changes):
            return self._rebuild(changes, filename, verified or {})
        records: list[tuple[ChangeKind, str]] = []
        sections: dict[str, tuple[bytes, dict[str, Value]] | None] = {}
        for name, props in changes:
            if props is None:
                if name not in self.config:
                    raise KeyError(name)
                records.append((ChangeKind.REMOVED, name))
                sections[name] = None
                continue
            raw, typed = section_bytes(name, props, filename)
            records.append((ChangeKind.UPDATED if name in self.config else ChangeKind.CREATED, name))
            sections[name] = (raw, typed)
        data = _splice(self.joined(), self.texts, sections)
        if data is None:  # the kept bytes do not hold a kept text where expected: cannot happen
            return self._rebuild(changes, filename, verified or {})
        return PendingWrite(data, records, sections)

    def _rebuild(self, changes: Iterable[Change], filename: str, verified: Mapping[str, bytes]) -> PendingWrite:
        config = SectionConfig(self.config)
        texts = dict(self.texts)
        records: list[tuple[ChangeKind, str]] = []
        for name, props in changes:
            if props is None:
                del config[name], texts[name]
                records.append((ChangeKind.REMOVED, name))
                continue
            known = verified.get(name)
            raw, typed = (known, props) if known is not None else section_bytes(name, props, filename)
            records.append((ChangeKind.UPDATED if name in config else ChangeKind.CREATED, name))
            config[name], texts[name] = typed, raw
        sections = {name: (texts[name], config[name]) if name in config else None for _, name in records}
        return PendingWrite(_SEPARATOR.join(texts.values()), records, sections, (config, texts))

    def commit(self, pending: PendingWrite, file_digest: str) -> None:
        """Make the kept state what ``pending`` wrote (in place: O(changed) when it was spliced)."""
        paths = self._paths
        if paths is not None:  # (else it is built from the config when first needed)
            for name, section in pending.sections.items():
                old = self.config.get(name)
                if old is not None:
                    paths.add(str(old.get("path", "")), -1)
                if section is not None:
                    paths.add(str(section[1].get("path", "")))
        if pending.rebuilt is not None:
            self.config, self.texts = pending.rebuilt
        else:
            for name, section in pending.sections.items():
                if section is None:
                    del self.config[name], self.texts[name]
                else:  # an update keeps its place, a create goes to the end: as in the bytes
                    self.texts[name], self.config[name] = section
        self._joined = pending.data
        self.digest = file_digest


def _splice(
    data: bytes, texts: dict[str, bytes], sections: dict[str, tuple[bytes, dict[str, Value]] | None]
) -> bytes | None:
    """``data`` (the join of ``texts``) with ``sections`` replaced, removed or appended: the join
    the new texts would give, built from a few large slices (no copy of the 100,000 texts).

    ``data`` is a sequence of sections with one separator between two; a changed store's section
    is found by its old text after an empty line (a header line is unique: a value line starts
    with a tab).  The unchanged runs between the changed sections go out whole, without the
    separators at their ends, and the one join puts the separators back.
    """
    view = memoryview(data)
    cuts: list[tuple[int, int, bytes | None]] = []
    created: list[bytes] = []
    for name, section in sections.items():
        raw = None if section is None else section[0]
        old = texts.get(name)
        if old is None:
            assert raw is not None  # prepare() refused to remove a store that is not there
            created.append(raw)
            continue
        at = _section_at(data, old)
        if at < 0:
            return None
        cuts.append((at, at + len(old), raw))
    cuts.sort(key=lambda cut: cut[0])
    runs: list[bytes | memoryview] = []
    pos = 0  # where the next unchanged section starts
    for start, end, raw in cuts:
        if start > pos:
            runs.append(view[pos : start - len(_SEPARATOR)])
        if raw is not None:
            runs.append(raw)
        pos = end + len(_SEPARATOR)  # past the separator after it
    if pos < len(data):
        runs.append(view[pos:])
    runs.extend(created)
    return _SEPARATOR.join(runs)


def _section_at(data: bytes, text: bytes) -> int:
    """Where the section ``text`` starts in ``data``: at 0, or after an empty line; -1 if nowhere."""
    if data.startswith(text):
        return 0
    at = data.find(b"\n" + _SEPARATOR + text)  # the end of the section before, the separator
    return at if at < 0 else at + 1 + len(_SEPARATOR)


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
