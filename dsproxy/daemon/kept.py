"""The manager's kept copy of ``datastore.cfg``: writes in O(changed) (issue 9).

A write used to read, parse, mutate, render and re-parse the whole file under the config lock:
~6 ms per 1,000 sections, 0.6 s at 100,000.  The manager is the only writer, so it keeps what it
last wrote -- the typed config, each section's canonical text (:func:`render_section`), the
digest of the file, and an index of the store paths for the nesting check -- and a write

1. reads and hashes the file (a hand edit is detected by its digest, as before: ~7 ms at 100,000
   sections, C speed), re-parsing the whole file only when the digest is not the kept one;
2. validates and renders only the changed sections, and re-parses each changed section's bytes
   (the issue-8 safety net, now per section: bytes that do not parse back to what was meant never
   reach the disk);
3. writes the file from the kept texts, ``"\\n".join(texts)`` -- what :func:`render` joins too,
   so the file is byte-identical to a full ``dump()`` by construction (and a test compares them).

The nesting check (a store inside another's path, or containing one) used to compare the new path
with every configured one; :class:`PathIndex` answers it from the path's components in O(depth)
and only on a conflict falls back to the full scan, for the message naming the other store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import ParseError, PropertyError, SectionConfig, Value, digest, parse
from ..config.section import SECTION_SEPARATOR, render_section
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


class KeptConfig:
    """The file as this manager last wrote (or read) it."""

    def __init__(self, config: SectionConfig, texts: dict[str, bytes], file_digest: str, paths: PathIndex) -> None:
        self.config = config  # typed, in file order; read-only for callers
        self.texts = texts  # canonical text of each section, same order
        self.digest = file_digest
        self.paths = paths

    @classmethod
    def read(cls, data: bytes, filename: str) -> KeptConfig:
        """Parse a whole file (raises ``ParseError``) and render each section canonically: O(n),
        once at start and after each hand edit."""
        config = parse(data, filename=filename)
        texts = {name: render_section(name, props, filename)[0].encode() for name, props in config.items()}
        paths = PathIndex()
        for props in config.values():
            paths.add(str(props.get("path", "")))
        return cls(config, texts, digest(data), paths)

    def apply(self, changes: Iterable[Change], filename: str) -> tuple[KeptConfig, bytes, list[tuple[ChangeKind, str]]]:
        """The kept state after ``changes``, the file bytes to write, and the ring's records.

        Only the changed sections are validated, rendered and parsed back.  ``self`` is not
        modified (the write may still fail): the path index is updated by :meth:`commit`.
        """
        config = SectionConfig(self.config)
        texts = dict(self.texts)
        records: list[tuple[ChangeKind, str]] = []
        for name, props in changes:
            if props is None:
                del config[name], texts[name]
                records.append((ChangeKind.REMOVED, name))
                continue
            raw, typed = _section_bytes(name, props, filename)
            records.append((ChangeKind.UPDATED if name in config else ChangeKind.CREATED, name))
            config[name], texts[name] = typed, raw
        data = _SEPARATOR.join(texts.values())
        return KeptConfig(config, texts, digest(data), self.paths), data, records

    def commit(self, before: KeptConfig, records: Iterable[tuple[ChangeKind, str]]) -> None:
        """Bring the shared path index from ``before``'s config to this one's (after the write)."""
        for _, name in records:
            old, new = before.config.get(name), self.config.get(name)
            if old is not None:
                self.paths.add(str(old.get("path", "")), -1)
            if new is not None:
                self.paths.add(str(new.get("path", "")))


def _section_bytes(name: str, props: dict[str, Value], filename: str) -> tuple[bytes, dict[str, Value]]:
    """One section's canonical bytes, checked to parse back to exactly its typed properties."""
    text, typed = render_section(name, props, filename)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # the checkers refuse surrogates; this is the last line of defence
        raise PropertyError("value", "not representable in UTF-8") from None
    try:
        again = parse(raw, filename)
    except ParseError as err:
        raise PropertyError("value", f"the value would not parse back: {err.errors[0][1]}") from None
    if again != {name: typed}:
        got = again.get(name, {})
        key = next((k for k in sorted(set(typed) | set(got)) if typed.get(k) != got.get(k)), "name")
        raise PropertyError(key, "the value would not read back as written")
    return raw, typed
