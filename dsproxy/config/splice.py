"""Apply a few changed sections to a parsed config without re-parsing the rest (issue 9).

A worker that knows which stores changed (the shared invalidation ring) still reads the whole file
-- the file is the single source of truth -- but :func:`splice` parses only the changed sections'
bytes and proves that everything else is byte-identical to the file it parsed last.  The result is
always exactly ``parse(new_file)``, or ``None`` (then the caller parses the whole file):

* **Sections compose at blank lines.**  An empty line always ends a section, so the parser is in
  the same state after one whatever came before; the file is cut into *regions*, each an empty
  line followed by one section (the first region's empty line is virtual: both files get a
  ``"\\n"`` in front).  The config of a file is the union of its regions' configs, except for a
  name that two regions define (last wins) -- refused below -- and error messages (a region that
  does not parse returns None, and the full parse reports).
* **Verification.**  A changed store's old region is found by its header (``\\ndatastore: NAME\\n``,
  one ``find``; the old file has no duplicate names, else no splice), must parse alone to exactly
  that store, and is cut out; the unchanged bytes between must appear in the new file in the same
  order, byte for byte (``startswith`` at an offset: a ``memcmp``, no copy).  What the new file has
  at a changed store's place, and after the last unchanged byte (created stores), must be regions
  that each parse alone to exactly one changed store.  Any other difference -- a hand edit, a
  change the ring did not name, a non-canonical layout -- returns None.
* **Order.**  A changed store present in both files at the same place keeps its place in the
  mapping; one that appears after the last unchanged byte goes to the end, in file order; that is
  where :func:`parse` puts them too.

Cost at 100,000 sections (14 MB), one changed store: the compares (~0.3 ms, a ``memcmp``), the
parse of one section, and finding the changed store's old region -- against ~700 ms for a full
parse.  That find was a ``bytes.find`` of the header from the start of the file, 0.1-3.3 ms by
where the store sits (the whole apply was 1-5 ms, its largest part); :class:`Regions` now tells
where each region starts, kept through every splice in O(changed) and asked in ~O(sqrt n) (a few
``sum`` of int lists), and checked against the text before it is believed (``find`` otherwise).
``old`` is updated in place once everything is proven (the caller drops the old cache): the copy
of a 100,000-entry dict it saves was ~2 ms of a ~6 ms apply on the loaded project machine (cProfile).

**What a hand edit changed** (:func:`edited_names`): when the ring does not name the changes (a
hand edit is published as ``EVERYTHING``), the names are taken from where the two texts differ --
the longest common prefix and suffix (compared a block at a time: ``startswith`` at an offset,
a ``memcmp``), widened to whole regions, every section header inside in either text.  That set
is only a guess; :func:`splice` proves the result as for the ring's names (a wrong guess: None,
a full parse).  At 100,000 stores a worker parsed the whole 14 MB for each hand edit (~1 s, two
workers and the manager on 2 cores: a hand edit showed 2.0-2.2 s after it, past the stress run's
2 s); the guess and the splice of one edited store take a few ms.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from .errors import ParseError
from .schema import Value
from .section import SECTION_TYPE, SectionConfig, parse

_HEADER = b"\n" + SECTION_TYPE.encode() + b": "


class Regions:
    """Where each store's region starts in a text (with its leading ``"\\n"``), by store name.

    Each store has an ordinal (its place in the file when the index was built, later creates
    after it) and a *span*: the bytes from its region's start to the next region's start.  A
    start is the first region's offset plus the spans before it: a sum over whole chunks of
    :data:`CHUNK` ordinals and one within a chunk.  A splice changes the spans of the stores it
    changed: in O(changed), no offset after them is rewritten.  A removed store keeps its ordinal
    with what is left of its span (the bytes after its region, if any), without a name.  Every
    answer is checked against the text; an index that is ever wrong knows no store from then on
    (each start is then found by :func:`region_start`, until the next full parse builds a new one).
    """

    CHUNK = 256

    def __init__(self, names: Iterable[str], starts: list[int], end: int) -> None:
        self.base = starts[0] if starts else 0
        self.ordinal = {name: i for i, name in enumerate(names)}
        self.spans = [b - a for a, b in zip(starts, [*starts[1:], end], strict=True)]
        c = self.CHUNK
        self.chunks = [sum(self.spans[i : i + c]) for i in range(0, len(self.spans), c)]

    @classmethod
    def of(cls, text: bytes | bytearray, config: SectionConfig) -> Regions | None:
        """The regions of ``text``, which parses to ``config``; None if they are not one region a
        store, each after a blank line, in the order of ``config`` (no splice then needs them)."""
        if config.duplicates or not config or not text.startswith(_HEADER):
            return None
        starts = [0, *(m.start() + 1 for m in _REGION_HEADER.finditer(text))]
        if len(starts) != len(config):
            return None
        return cls(config, starts, len(text))

    def offset(self, name: str) -> int | None:
        """Where the index says ``name``'s region starts (None: it does not know the store)."""
        i = self.ordinal.get(name)
        if i is None:
            return None
        c = i // self.CHUNK
        return self.base + sum(self.chunks[:c]) + sum(self.spans[c * self.CHUNK : i])

    def start(self, text: bytes | bytearray, name: str) -> int:
        """Where ``name``'s region starts in ``text`` (checked there), else :func:`region_start`'s
        answer -- a ``find`` over the text."""
        at = self.offset(name)
        if at is not None:
            if text.startswith(_HEADER + name.encode() + b"\n", at) and (at == 0 or text[at - 1] == 0x0A):
                return at
            self.ordinal.clear()  # lost track (cannot happen for the text it follows): every start is found
        return region_start(text, name)

    def _grow(self, i: int, step: int) -> None:
        self.spans[i] += step
        self.chunks[i // self.CHUNK] += step

    def spliced(self, cuts: list[tuple[int, int, str]], found: _Found, in_place: set[str]) -> None:
        """Follow a splice (see :func:`splice`): ``cuts`` the changed regions of the old text,
        ``found`` the changed regions of the new one, ``in_place`` those at their old place."""
        ordinal = self.ordinal
        for start, end, name in cuts:
            i = ordinal.get(name)
            if i is None:  # not indexed (found by a find): the index lost track
                ordinal.clear()
                return
            if name in in_place:
                self._grow(i, found[name][2] - (end - start))
            else:  # removed, or moved to the end: its bytes go, what followed them stays
                self._grow(i, start - end)
                del ordinal[name]
        for name, (_, _, size) in found.items():
            if name not in in_place:
                if len(self.spans) % self.CHUNK == 0:
                    self.chunks.append(0)
                ordinal[name] = len(self.spans)
                self.spans.append(0)
                self._grow(ordinal[name], size)


_REGION_HEADER = re.compile(re.escape(b"\n" + _HEADER))
_NAMED = re.compile(re.escape(_HEADER) + rb"([^\n]*)")
#: past this many stores in the edited span, a full parse (the guess would parse most of the file)
EDITED_MAX: Final = 2000
_BLOCK = 1 << 16


def common_prefix(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """How many leading bytes ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    view = memoryview(a)
    i = 0
    while i < n:
        j = min(i + _BLOCK, n)
        if not b.startswith(view[i:j], i):
            while j - i > 1:  # equal before i, a difference before j
                mid = (i + j) // 2
                if b.startswith(view[i:mid], i):
                    i = mid
                else:
                    j = mid
            return i
        i = j
    return n


def common_suffix(a: bytes | bytearray, b: bytes | bytearray, limit: int) -> int:
    """How many trailing bytes ``a`` and ``b`` share, at most ``limit``."""
    la, lb = len(a), len(b)
    view = memoryview(a)
    k = 0
    while k < limit:
        m = min(k + _BLOCK, limit)
        if not b.startswith(view[la - m : la - k], lb - m):
            while m - k > 1:  # equal in the last k, a difference in the last m
                mid = (k + m) // 2
                if b.startswith(view[la - mid : la - k], lb - mid):
                    k = mid
                else:
                    m = mid
            return k
        k = m
    return limit


def edited_names(old_text: bytes | bytearray, new_text: bytes | bytearray) -> frozenset[str] | None:
    """The stores whose sections differ between the two texts (see the module) -- a guess for
    :func:`splice` to prove -- or None when more than :data:`EDITED_MAX` would need a look."""
    start = common_prefix(old_text, new_text)
    if start == len(old_text) == len(new_text):
        return frozenset()
    limit = min(len(old_text), len(new_text)) - start
    tail = common_suffix(old_text, new_text, limit)
    # the region the first difference is in: the last region start at or before it
    lo = old_text.rfind(b"\n" + _HEADER, 0, start + len(_HEADER) + 1) + 1
    names: set[str] = set()
    for text in (old_text, new_text):
        end = len(text) - tail
        hi = region_end(text, max(end - 1, lo))
        for m in _NAMED.finditer(text, lo, hi):
            try:
                names.add(bytes(m.group(1)).decode())
            except UnicodeDecodeError:
                return None
            if len(names) > EDITED_MAX:
                return None
    return frozenset(names)


def region_start(text: bytes | bytearray, name: str, start: int = 0) -> int:
    """Where the region of ``name`` starts in ``text`` (a file with a ``\\n`` in front), or -1."""
    at = text.find(_HEADER + name.encode() + b"\n", start)
    if at > 0 and text[at - 1] != 0x0A:  # not after an empty line: not a region (no splice)
        return -1
    return at


def region_end(text: bytes | bytearray, start: int) -> int:
    """Where the region starting at ``start`` ends: at the next empty line, or the end."""
    blank = text.find(b"\n\n", start + 1)
    return len(text) if blank < 0 else blank + 1


#: the most bytes :func:`patch` takes between the shared start and end (else: the read and compare)
PATCH_MAX: Final = 1 << 20


def _split(window: bytes) -> list[tuple[str, int, int]] | None:
    """``window`` (whole regions) as ``(name, start, end)`` per region, or None if it is not
    regions of one section each (a blank line too many, a comment, a name that is not UTF-8)."""
    out = []
    at = 0
    while at < len(window):
        eol = window.find(b"\n", at + 1)
        if eol < 0 or not window.startswith(_HEADER, at):
            return None
        end = region_end(window, at)
        try:
            out.append((window[at + len(_HEADER) : eol].decode(), at, end))
        except UnicodeDecodeError:
            return None
        at = end
    return out


def patch(
    text: bytearray, old: SectionConfig, start: int, end: int, middle: bytes, regions: Regions | None = None
) -> dict[str, dict[str, Value] | None] | None:
    """Make ``text`` (``parse``'d as ``old``; with the virtual leading ``"\\n"``) the new file,
    ``text[:start] + middle + text[end:]``, with ``old`` updated to its parse -- both in place --
    and return, per store that changed, its new properties (None: removed); or None, with both
    untouched, when the change is not one this can prove (then the caller reads the whole file).

    The caller knows that the rest of the file is unchanged (the manager's file record,
    :mod:`dsproxy.config.record`); what is proven here is the part that changed, widened to whole
    regions on both sides: each region of the new part parses alone to exactly one store, every
    one of the old part is the store the config has, the stores kept appear in the same order,
    and stores that are new come after them at the end of the file (where :func:`parse` puts
    them in the mapping) and are not defined elsewhere.  Cost: the regions around the change
    parsed, and a ``memmove`` of the text after it (~0.2 ms for 7 MB) -- no read of the file.
    """
    if old.duplicates or not old or not 0 < start <= end <= len(text):
        return None
    lo = text.rfind(b"\n" + _HEADER, 0, start + len(_HEADER) + 1) + 1  # the region the change starts in
    hi = region_end(text, max(end - 1, lo))  # the end of the region it ends in
    old_part = bytes(text[lo:hi])
    new_part = bytes(text[lo:start]) + middle + bytes(text[end:hi])
    at_end = hi == len(text)
    if not (at_end or new_part.endswith(b"\n")):
        return None  # the next region would not start after a line end
    olds, news = _split(old_part), _split(new_part)
    if olds is None or news is None:
        return None
    old_names = [name for name, _, _ in olds]
    was = set(old_names)
    found: _Found = {}
    for name, a, b in news:
        props = _section(new_part[a:b], name)
        if props is None or name in found:
            return None
        found[name] = (0, props, b - a)
    kept = [name for name in found if name in was]
    if kept != [name for name in old_names if name in found]:
        return None  # reordered
    added = [name for name in found if name not in was]
    if added and (not at_end or list(found)[len(kept) :] != added or any(name in old for name in added)):
        return None  # a store new here that parse() would put elsewhere, or a second definition
    for name, a, b in olds:
        if name not in old or _section(old_part[a:b], name) != old[name]:
            return None
    changed: dict[str, dict[str, Value] | None] = {name: None for name in old_names if name not in found}
    changed.update((name, props) for name, (_, props, _) in found.items() if old.get(name) != props)
    cuts = [(lo + a, lo + b, name) for name, a, b in olds]
    in_place = set(kept)
    if regions is not None:
        regions.spliced(cuts, found, in_place)
    _merged(old, cuts, found, set(), in_place)
    text[start:end] = middle
    return changed


def _section(text: bytes, name: str) -> dict[str, Value] | None:
    """The properties of ``name`` if ``text`` (one region) parses to exactly that store, else None."""
    try:
        config = parse(text)
    except ParseError:
        return None
    if len(config) != 1 or name not in config or config.duplicates:
        return None
    return config[name]


def splice(
    old_text: bytes | bytearray,
    old: SectionConfig,
    new_text: bytes | bytearray,
    changed: Iterable[str],
    regions: Regions | None = None,
) -> tuple[SectionConfig, dict[str, dict[str, Value] | None]] | None:
    """``parse(new_text)`` computed from ``old`` (which is ``parse(old_text)``), or None.

    Both texts carry the virtual leading ``"\\n"``.  Returns the new config -- ``old`` itself,
    updated in place; untouched when the answer is None -- and, per changed store, its new
    properties (None: removed): what the caller rebuilds.  ``regions`` (of ``old_text``), if
    given, finds the changed stores' old regions, and follows the splice to ``new_text`` (in
    place, only when the answer is not None).
    """
    if old.duplicates or not old:
        return None  # no splice of a file with a name twice, or into an empty one (cheap to parse)
    cuts = []
    for name in changed:
        if name in old:
            start = region_start(old_text, name) if regions is None else regions.start(old_text, name)
            if start < 0:
                return None
            end = region_end(old_text, start)
            if _section(bytes(old_text[start:end]), name) != old[name]:
                return None
            cuts.append((start, end, name))
    cuts.sort()
    names = set(changed)
    found: _Found = {}
    o = n = unchanged = 0
    for start, end, name in cuts:
        if start < o or not new_text.startswith(memoryview(old_text)[o:start], n):
            return None
        n += start - o
        unchanged += start - o
        o = end
        if new_text.startswith(_HEADER + name.encode() + b"\n", n):
            n = _take(new_text, n, name, unchanged, found)
            if n < 0:
                return None
    if not new_text.startswith(memoryview(old_text)[o:], n):
        return None
    n += len(old_text) - o
    unchanged += len(old_text) - o
    while n < len(new_text):  # what follows the last unchanged byte: created (or moved) stores
        if new_text.count(b"\n", n) == len(new_text) - n:
            break  # blank lines at the end (an editor's): nothing to parse, no region
        eol = new_text.find(b"\n", n + 1)
        if eol < 0 or not new_text.startswith(_HEADER, n):
            return None
        name = new_text[n + len(_HEADER) : eol].decode("utf-8", "replace")
        if name not in names or name in found:
            return None
        n = _take(new_text, n, name, unchanged, found)
        if n < 0:
            return None
    in_place = {name for _, _, name in cuts if name in found and found[name][0] < unchanged}
    if regions is not None:
        regions.spliced(cuts, found, in_place)
    return _merged(old, cuts, found, names, in_place)


#: name -> (unchanged bytes before its region, its properties, the region's size)
_Found = dict[str, tuple[int, dict[str, Value], int]]


def _take(text: bytes | bytearray, start: int, name: str, unchanged: int, found: _Found) -> int:
    end = region_end(text, start)
    props = _section(bytes(text[start:end]), name)
    if props is None:
        return -1
    found[name] = (unchanged, props, end - start)
    return end


def _merged(
    old: SectionConfig, cuts: list[tuple[int, int, str]], found: _Found, names: set[str], in_place: set[str]
) -> tuple[SectionConfig, dict[str, dict[str, Value] | None]]:
    config = old  # in place: every check has passed, nothing below can fail
    for _, _, name in cuts:
        if name not in in_place:
            del config[name]
    for name, (_, props, _) in found.items():  # dict order: in-place ones first, then the tail in file order
        config[name] = props
    return config, {name: (found[name][1] if name in found else None) for name in names}
