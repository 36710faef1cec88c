"""Parser and canonical writer of the section-config format of ``datastore.cfg`` (DESIGN §3.1).

The grammar is proxmox-section-config's default syntax, so a file written by Proxmox Backup
Server parses unchanged:

* ``datastore: NAME`` starts a section (type and id split at the first ``:``, both trimmed; the
  line must start with a letter);
* property lines start with whitespace and are ``key value``, split at the first whitespace run;
* a blank (or whitespace-only) line ends a section; so does the end of the file;
* lines end in ``\\n`` or ``\\r\\n``; there is no comment syntax.

Every bad line is collected and :class:`~dsproxy.config.errors.ParseError` is raised once at the
end, so an admin sees all mistakes of an edit at once.  After a bad header the parser recovers at
the next header, so one typo does not drown the report in follow-up errors.

The writer is canonical: sections in mapping order, keys sorted, one tab before each property, one
blank line between sections, none at the end, an empty config as an empty file.  For every parsed
config ``parse(dump(cfg)) == cfg``.

Speed: a 1,000-section file (~180 KB) parses in a few milliseconds; validated values are memoised
per parse because most stores share schedules and property strings.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ConfigError, ParseError
from .schema import (
    REQUIRED_KEYS,
    SECTION_SCHEMA,
    SchemaError,
    Value,
    check_name,
    check_value,
    format_value,
)

SECTION_TYPE = "datastore"


class SectionConfig(dict[str, dict[str, Value]]):
    """``datastore.cfg`` parsed: store name -> its properties (typed), in file order.

    A parsed config is shared by every lookup of a process: treat it as read-only.
    """


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
        self.first_line: dict[str, int] = {}
        self.memo: dict[tuple[str, str], Value] = {}
        # current section: name (None when its header was bad), its properties, and whether it is
        # being skipped entirely (unknown type / unparsable header)
        self.in_section = False
        self.skipping = False
        self.name: str | None = None
        self.props: dict[str, Value] = {}
        self.seen: set[str] = set()

    def error(self, lineno: int, message: str) -> None:
        self.errors.append((lineno, message))

    def header(self, lineno: int, line: str) -> None:
        self.in_section = True
        self.skipping = False
        self.name = None
        self.props = {}
        self.seen = set()
        typ, colon, ident = line.partition(":")
        if not colon or not line[0].isalpha():
            self.error(lineno, "syntax error (expected header)")
            self.skipping = True
            return
        typ, ident = typ.strip(), ident.strip()
        if typ != SECTION_TYPE:
            self.error(lineno, f"unknown section type '{typ}'")
            self.skipping = True
            return
        try:
            check_name(ident)
        except SchemaError as err:
            self.error(lineno, f"syntax error in section identifier: {err}")
            return
        first = self.first_line.get(ident)
        if first is not None:
            self.error(lineno, f"duplicate section '{ident}' (first defined at line {first})")
            return
        self.first_line[ident] = lineno
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
        self.memo[(key, raw)] = value
        self.props[key] = value

    def end_section(self, lineno: int) -> None:
        if self.in_section and not self.skipping:
            for key in REQUIRED_KEYS:
                if key not in self.seen:
                    self.error(lineno, f"property '{key}' is missing and it is not optional.")
            if self.name is not None:
                self.config[self.name] = self.props
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
                    self.error(lineno, "syntax error (expected section properties)")
                    continue
                key, raw = parts[0], parts[1].rstrip()
                seen = self.seen
                if key in seen:
                    self.error(lineno, f"duplicate property '{key}'")
                    continue
                seen.add(key)
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
            raise ParseError(self.filename, self.errors)
        return self.config


def parse(text: str | bytes, filename: str = "datastore.cfg") -> SectionConfig:
    """Parse ``datastore.cfg`` text (or raw bytes, which must be UTF-8).

    Raises :class:`~dsproxy.config.errors.ParseError` (a ``ConfigError``) listing every bad line;
    never any other exception, whatever the input.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        text = _decode(bytes(text), filename)
    return _Parser(filename).feed(text)


def check_section(name: str, props: Mapping[str, object]) -> dict[str, Value]:
    """Validate one section (name and every property) and return its typed properties.

    Raises :class:`~dsproxy.config.errors.PropertyError` naming the first bad key.
    """
    from .errors import PropertyError

    try:
        check_name(name)
    except SchemaError as err:
        raise PropertyError("name", str(err)) from None
    out: dict[str, Value] = {}
    for key, value in props.items():
        if isinstance(value, str):
            # the file format trims values and cannot hold an empty one
            value = value.strip()
            if not value:
                raise PropertyError(key, "value must not be empty")
        try:
            out[key] = check_value(key, value)
        except SchemaError as err:
            raise PropertyError(key, str(err)) from None
    for key in REQUIRED_KEYS:
        if key not in out:
            raise PropertyError(key, "property is missing and it is not optional")
    return out


def dump(config: Mapping[str, Mapping[str, Value]], filename: str = "datastore.cfg") -> str:
    """Canonical text of a config.  Every section is validated first, so a bad value can never
    reach the file (``writing "<file>" failed: ...``)."""
    chunks = []
    for name, props in config.items():
        try:
            typed = check_section(name, props)
        except ConfigError as err:
            raise ConfigError(f"writing \"{filename}\" failed: section '{name}': {err}") from None
        lines = [f"{SECTION_TYPE}: {name}\n"]
        lines.extend(f"\t{key} {format_value(typed[key])}\n" for key in sorted(typed))
        chunks.append("".join(lines))
    return "\n".join(chunks)
