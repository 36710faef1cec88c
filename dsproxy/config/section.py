"""Parser and canonical writer of the section-config format of ``datastore.cfg`` (docs/design.md §3.1).

The grammar is proxmox-section-config's default syntax, so a file written by Proxmox Backup
Server (4.x included) parses unchanged:

* ``datastore: NAME`` starts a section (type and id split at the first ``:``, both trimmed; the
  line must start with a letter);
* property lines start with whitespace and are ``key value``, split at the first white space, the
  value trimmed -- so ``\tcomment `` (key, one space, nothing) is ``comment`` with an empty value,
  as PBS's own create writes it, while ``\tcomment`` alone is a syntax error;
* a blank (or whitespace-only) line ends a section; so does the end of the file;
* lines end in ``\n`` or ``\r\n``; there is no comment syntax;
* a section name that appears twice is accepted and **the last one wins** (as in PBS, whose
  parser stores sections in a map); it keeps the place of the first in the file order, which is
  where the writer puts it.  Everything downstream sees a mapping, so names are unique there.

Values go through :func:`~dsproxy.config.schema.check_value` and, once a section is complete,
:func:`~dsproxy.config.schema.check_section_rules` (``path`` absolute, or relative for a
removable store) -- the very checkers API writes use.

Every bad line is collected and :class:`~dsproxy.config.errors.ParseError` is raised once at the
end, in line order, so an admin sees all mistakes of an edit at once.  After a bad header the
parser recovers at the next header, so one typo does not drown the report in follow-up errors.
Whatever the input -- text with lone surrogates, 5,000-digit numbers, deep quoting -- ``parse``
raises nothing but ``ParseError``.

The writer is canonical: sections in mapping order, keys sorted, one tab before each property, one
blank line between sections, none at the end, an empty config as an empty file.  It validates
every section with the same checkers and refuses any control character, so for every config it
accepts ``parse(dump(cfg)) == cfg`` (and :func:`~dsproxy.config.file.update_config` re-parses the
exact bytes before they replace the file, to make that a checked fact rather than a promise).

Speed: a 1,000-section file (~180 KB) parses in a few milliseconds; validated values are memoised
(per process, bounded) because most stores share schedules and property strings, and every
worker re-parses the same file on each reload.  :func:`parse` first tries a lean pass that takes
only plainly written files (what dsproxy and PBS write: :func:`_fast`), and hands anything else
to the full parser, which reports errors by line.  At 100,000 stores (bench-scale's 14 MB file,
this 2-core VM, quiet, best of 4): 0.59 s against 0.92 s for the full parser (the rest is the
check of each unique value, ``path`` and ``comment``, ~0.3 s); it is what a worker's full
reload, a proxy's start and a fleet host's cold start (manager and workers) each pay.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, TypeVar

from .errors import ParseError, PropertyError
from .schema import (
    CONTROL_RE,
    REQUIRED_KEYS,
    SECTION_SCHEMA,
    SchemaError,
    Value,
    check_name,
    check_section_rules,
    check_value,
    format_value,
    is_name,
    show,
)

SECTION_TYPE = "datastore"

K = TypeVar("K")
V = TypeVar("V")

# Validated values by (key, raw text), shared by every parse of this process: a reload re-parses
# mostly the same values.  Only successes are stored; the bound keeps a hostile file from growing it.
_MEMO: dict[tuple[str, str], Value] = {}
_MEMO_LIMIT = 50_000


class SectionConfig(dict[str, dict[str, Value]]):
    """``datastore.cfg`` parsed: store name -> its properties (typed), in file order.

    A parsed config is shared by every lookup of a process: treat it as read-only.
    """

    #: sections whose name an earlier section of the file had already used (the last one wins)
    duplicates: int = 0


def _decode(data: bytes, filename: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        errors = []
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append((lineno, f"invalid UTF-8 at byte {err.start} of the line"))
        raise ParseError(filename, errors) from None


class _Parser:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.config = SectionConfig()
        self.errors: list[tuple[int, str]] = []
        self.memo = _MEMO
        # current section: name (None when its header was bad), its properties, and whether it is
        # being skipped entirely (unknown type / unparsable header)
        self.in_section = False
        self.skipping = False
        self.name: str | None = None
        self.props: dict[str, Value] = {}
        self.seen: dict[str, int] = {}  # key -> its line

    def error(self, lineno: int, message: str) -> None:
        self.errors.append((lineno, message))

    def header(self, lineno: int, line: str) -> None:
        self.in_section = True
        self.skipping = False
        self.name = None
        self.props = {}
        self.seen = {}
        typ, colon, ident = line.partition(":")
        if not colon or not line[0].isalpha():
            self.error(lineno, "syntax error (expected header)")
            self.skipping = True
            return
        typ, ident = typ.strip(), ident.strip()
        if typ != SECTION_TYPE:
            self.error(lineno, f"unknown section type '{show(typ)}'")
            self.skipping = True
            return
        try:
            check_name(ident)
        except SchemaError as err:
            self.error(lineno, f"syntax error in section identifier: {err}")
            return
        self.name = ident

    def check_property(self, lineno: int, key: str, raw: str) -> None:
        """Slow path of a property line: the value is not memoised yet (or the key is new)."""
        try:
            value = check_value(key, raw)
        except SchemaError as err:
            if key in SECTION_SCHEMA:
                self.error(lineno, f"property '{key}': {err}")
            else:
                self.error(lineno, str(err))
            return
        _remember(self.memo, (key, raw), value)
        self.props[key] = value

    def end_section(self, lineno: int) -> None:
        if self.in_section and not self.skipping:
            for key in REQUIRED_KEYS:
                if key not in self.seen:
                    self.error(lineno, f"property '{key}' is missing and it is not optional.")
            broken = check_section_rules(self.props)
            if broken is not None:
                key, reason = broken
                self.error(self.seen.get(key, lineno), f"property '{key}': {reason}")
            if self.name is not None:
                if self.name in self.config:
                    self.config.duplicates += 1
                self.config[self.name] = self.props  # a second section of that name replaces the first
        self.in_section = False
        self.skipping = False
        self.name = None

    def feed(self, text: str) -> SectionConfig:
        # The loop is the parser's hot path (~7,000 lines for 1,000 stores): the common property
        # line is handled inline with locals; headers, errors and new values go to methods.
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        memo = self.memo
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the newline that ends the last line does not start another
        lineno = 0
        for lineno, line in enumerate(lines, 1):
            if not line or line.isspace():
                self.end_section(lineno)
                continue
            first = line[0]
            if not self.in_section:
                self.header(lineno, line)
            elif first == "\t" or first.isspace():
                if self.skipping:
                    continue
                parts = line.split(None, 1)
                if len(parts) < 2:
                    if not line[-1].isspace():
                        self.error(lineno, "syntax error (expected section properties)")
                        continue
                    parts.append("")  # "key " and nothing: an empty value
                key, raw = parts[0], parts[1].rstrip()
                seen = self.seen
                if key in seen:
                    self.error(lineno, f"duplicate property '{show(key)}'")
                    continue
                seen[key] = lineno
                value = memo.get((key, raw))
                if value is None:
                    self.check_property(lineno, key, raw)
                else:
                    self.props[key] = value
            elif line.startswith(SECTION_TYPE) and ":" in line:
                # a header with no blank line before it: report it, then take it as a header
                self.error(lineno, "syntax error (expected section properties)")
                self.end_section(lineno)
                self.header(lineno, line)
            else:
                self.error(lineno, "syntax error (expected section properties)")
        if self.in_section:
            # the end of the file ends a section like a blank line, reported at the last line
            self.end_section(lineno)
        if self.errors:
            self.errors.sort(key=lambda error: error[0])  # stable: a line's own order is kept
            raise ParseError(self.filename, self.errors)
        return self.config


#: property lines seen by the fast path (``"\tkey value"`` -> key, typed value), shared by every parse
#: of this process like :data:`_MEMO`; keys whose values are nearly always unique stay out of it
_LINES: dict[str, tuple[str, Value]] = {}
_UNIQUE_KEYS = frozenset({"path", "comment"})
#: each known key as one ``str`` object: a key split off a line of :data:`_UNIQUE_KEYS` is a new
#: string every time, and 100,000 stores held 200,000 copies of "path" and "comment" (11 MB, in
#: the manager, in the parse it leaves for the proxy and in every worker; tracemalloc)
_KEY_OBJECTS: Final[dict[str, str]] = {key: key for key in SECTION_SCHEMA}
_HEADER = f"{SECTION_TYPE}: "


def _fast(text: str) -> SectionConfig | None:
    """The parse of a well-formed file in one lean pass, or None where anything is unusual (the full
    parser then decides, and reports): every section ``datastore: NAME`` then ``\tkey value`` lines,
    empty lines between sections (and around them), no ``\r``, no duplicate name or key, every
    value valid.

    What it accepts, :class:`_Parser` parses to the same config (a differential property test
    holds them together): it only takes the shapes whose meaning is plain -- a header exactly as
    written (the name valid, so it has no white space to trim), a property line whose key is
    followed by one space and a value without white space at either end (what ``split(None, 1)``
    and ``rstrip`` would make of it).  Speed: see the module docstring.
    """
    if "\r" in text:
        return None
    return _fast_lines(text.split("\n"))


def parse_values(values: Sequence[bytes]) -> SectionConfig | None:
    """The config of ``values`` joined by newlines when that is a well-formed file (see
    :func:`_fast`), or None: then parse the joined bytes, which says what is wrong.  Each value is
    decoded and split in turn, never the whole: fleet mode's first read at 100,000 stores joined
    14 MB, decoded it and split it into 800,000 lines at once, 34,700 page faults of the manager's
    90,000 against 15,900 this way (and 0.43-0.49 s against 0.48-0.49 s of parse, 2026-12-04).
    (``b"\n".join(values).split(b"\n")`` is exactly each value's lines in turn: the joints are
    the separators.)"""
    refused = False

    def lines() -> Iterator[str]:
        nonlocal refused
        for value in values:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = "\r"
            if "\r" in text:
                refused = True
                return
            yield from text.split("\n")

    config = _fast_lines(lines())
    return None if refused else config


def _fast_lines(lines: Iterable[str]) -> SectionConfig | None:
    config = SectionConfig()
    memo, seen_lines, unique = _MEMO, _LINES, _UNIQUE_KEYS
    props: dict[str, Value] | None = None
    name = ""
    for line in lines:
        if props is not None and line:
            hit = seen_lines.get(line)
            if hit is not None:
                key, value = hit
            else:
                if line[0] != "\t":
                    return None
                key, sep, raw = line[1:].partition(" ")
                if not sep or raw != raw.strip():
                    return None
                if key in unique:  # checked each time, remembered nowhere
                    key = _KEY_OBJECTS[key]
                    try:
                        value = check_value(key, raw)
                    except SchemaError:
                        return None
                else:
                    cached = memo.get((key, raw))
                    if cached is None:
                        try:
                            cached = check_value(key, raw)
                        except SchemaError:
                            return None
                        _remember(memo, (key, raw), cached)
                    value = cached
                    _remember(seen_lines, line, (key, value))
            if key in props:
                return None
            props[key] = value
        elif props is not None:  # the empty line that ends a section
            if not _complete(config, name, props):
                return None
            props = None
        elif not line:
            continue  # before the first section, after the last, or a second one between: nothing to end
        elif line.startswith(_HEADER) and is_name(name := line[len(_HEADER) :]) and name not in config:
            props = {}
        else:
            return None  # not a plain header
    if props is not None and not _complete(config, name, props):
        return None
    return config


def _remember(table: dict[K, V], key: K, value: V) -> None:
    """``table[key] = value`` in a memo bounded by :data:`_MEMO_LIMIT` (emptied when full: a
    hostile file cannot grow it)."""
    if len(table) >= _MEMO_LIMIT:
        table.clear()
    table[key] = value


def _complete(config: SectionConfig, name: str, props: dict[str, Value]) -> bool:
    for key in REQUIRED_KEYS:
        if key not in props:
            return False
    if check_section_rules(props) is not None:
        return False
    config[name] = props
    return True


def parse(text: str | bytes, filename: str = "datastore.cfg") -> SectionConfig:
    """Parse ``datastore.cfg`` text (or raw bytes, which must be UTF-8).

    Raises :class:`~dsproxy.config.errors.ParseError` (a ``ConfigError``) listing every bad line;
    never any other exception, whatever the input.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = _decode(bytes(text), filename)
    elif not isinstance(text, str):
        raise ParseError(filename, [(0, f"expected text or bytes, got {type(text).__name__}")])
    fast = _fast(text)
    if fast is not None:
        return fast
    return _Parser(filename).feed(text)


def check_section(name: str, props: Mapping[str, object]) -> dict[str, Value]:
    """Validate one section (name, every property, the rules across keys) and return its typed
    properties -- with the parser's checkers, so what passes here parses back the same.

    Strings are trimmed first (the file format trims values).  Raises
    :class:`~dsproxy.config.errors.PropertyError` naming the first bad key.
    """
    try:
        check_name(name)
    except SchemaError as err:
        raise PropertyError("name", str(err)) from None
    out: dict[str, Value] = {}
    for key, value in props.items():
        if isinstance(value, str):
            value = value.strip()
        try:
            out[key] = check_value(key, value)
        except SchemaError as err:
            raise PropertyError(show(key), str(err)) from None
    for key in REQUIRED_KEYS:
        if key not in out:
            raise PropertyError(key, "property is missing and it is not optional")
    broken = check_section_rules(out)
    if broken is not None:
        raise PropertyError(*broken)
    return out


def render_section(
    name: str, props: Mapping[str, object], filename: str = "datastore.cfg"
) -> tuple[str, dict[str, Value]]:
    """The canonical text of one section (ending in ``\n``) and its typed properties.

    The one place a section becomes text: :func:`render` joins these with one blank line, so a
    file written from kept section texts (the manager's O(changed) write) is byte-identical to a
    full :func:`dump` by construction.  Validates like :func:`render`.
    """
    try:
        typed = check_section(name, props)
    except PropertyError as err:
        reason = f"writing \"{filename}\" failed: section '{show(name)}': {err.reason}"
        raise PropertyError(err.key, reason) from None
    lines = [f"{SECTION_TYPE}: {name}\n"]
    for key in sorted(typed):
        text = format_value(typed[key])
        if CONTROL_RE.search(text) is not None:  # the checkers make this impossible; the writer still refuses
            raise PropertyError(key, f"detected unexpected control character in section '{name}' key '{key}'")
        lines.append(f"\t{key} {text}\n")
    return "".join(lines), typed


#: what separates two sections' texts in a canonical file (one blank line)
SECTION_SEPARATOR = "\n"


def render(config: Mapping[str, Mapping[str, Value]], filename: str = "datastore.cfg") -> tuple[str, SectionConfig]:
    """The canonical text of ``config`` and the typed config it stands for.

    Every section is validated first (:func:`check_section`) and no control character reaches
    the text, so a bad value can never reach the file: :class:`PropertyError` names the key
    (``writing "<file>" failed: section 'NAME': ...``).
    """
    chunks = []
    typed_config = SectionConfig()
    for name, props in config.items():
        text, typed = render_section(name, props, filename)
        chunks.append(text)
        typed_config[name] = typed
    return SECTION_SEPARATOR.join(chunks), typed_config


def dump(config: Mapping[str, Mapping[str, Value]], filename: str = "datastore.cfg") -> str:
    """Canonical text of a config (see :func:`render`); raises ``PropertyError`` for a bad value."""
    return render(config, filename)[0]
