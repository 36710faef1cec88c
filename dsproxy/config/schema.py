"""The datastore section schema: which keys exist and what their values may be.

Values are validated once, when the file is parsed or when the API hands a value in, and stored
*typed* (``int`` for ``keep-*``, ``bool`` for ``verify-new`` and ``gc-on-unmount``, ``str`` for the
rest).  Property strings (``maintenance-mode``, ``tuning``, ``notify``, ``backend``) are stored in
their canonical text form, so the API returns them the way PBS does and ``dump`` writes them back
unchanged; :func:`parse_property_string` turns them into a dict when something needs the parts.

Error texts follow proxmox-schema (``value must be at least 3 characters long``, ``Unable to parse
boolean option.``, ...) so that messages read like the ones PBS admins already know.

Decisions where PBS is vague or too costly to copy:

* Calendar events (``gc-schedule``, ``prune-schedule``) are checked for length and character set
  only, not with a full calendar-event grammar: a schedule PBS accepts is never refused, and garbage
  (control characters, quotes, ``;``) is.
* ``path`` must be absolute (the design wins over current PBS, which allows relative paths for
  removable stores).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

Value = str | int | bool

NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]*")
_SINGLE_LINE_RE: Final = re.compile(r"[^\x00-\x1f\x7f]*")
_CALENDAR_RE: Final = re.compile(r"[A-Za-z0-9 ,:.*/~+\-]+")
_USERID_RE: Final = re.compile(r"[^\s:/\x00-\x1f\x7f@]{1,60}@[A-Za-z0-9_][A-Za-z0-9._\-]{1,31}")
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")

_TRUE: Final = frozenset({"1", "on", "yes", "true"})
_FALSE: Final = frozenset({"0", "off", "no", "false"})


class SchemaError(ValueError):
    """A value does not fit its schema; the message is the bare reason."""


# -- simple value checkers: raw text (or JSON value) -> typed value ---------------------------------


def check_name(name: str) -> str:
    """Validate a datastore name (``^[A-Za-z0-9_][A-Za-z0-9._\\-]*$``, 3-32 chars)."""
    if len(name) < 3:
        raise SchemaError("value must be at least 3 characters long")
    if len(name) > 32:
        raise SchemaError("value may only be 32 characters long")
    if NAME_RE.fullmatch(name) is None:
        raise SchemaError("value does not match the regex pattern")
    return name


def _string(
    min_len: int = 1, max_len: int = 4096, pattern: re.Pattern[str] | None = _SINGLE_LINE_RE
) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"expected string value, got {type(value).__name__}")
        if len(value) < min_len:
            raise SchemaError(f"value must be at least {min_len} characters long")
        if len(value) > max_len:
            raise SchemaError(f"value may only be {max_len} characters long")
        if pattern is not None and pattern.fullmatch(value) is None:
            raise SchemaError("value does not match the regex pattern")
        return value

    return check


def _enum(*allowed: str) -> Callable[[object], str]:
    allowed_set = frozenset(allowed)

    def check(value: object) -> str:
        if not isinstance(value, str) or value not in allowed_set:
            raise SchemaError(f"value '{value}' is not defined in the enumeration.")
        return value

    return check


def _integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool):
            raise SchemaError("expected integer value, got boolean")
        if isinstance(value, str):
            if _INT_RE.fullmatch(value) is None:
                raise SchemaError(f"invalid integer value '{value}'")
            value = int(value)
        if not isinstance(value, int):
            raise SchemaError(f"expected integer value, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise SchemaError(f"value must have a minimum value of {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise SchemaError(f"value must have a maximum value of {maximum} (got {value})")
        return value

    return check


def check_bool(value: object) -> bool:
    """Booleans are ``1/0``, ``on/off``, ``yes/no``, ``true/false`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise SchemaError("Unable to parse boolean option.")


def check_path(value: object) -> str:
    path = _string(1, 4096)(value)
    if not path.startswith("/"):
        raise SchemaError(f'expected absolute path - got "{path}"')
    return path


def check_calendar_event(value: object) -> str:
    text = _string(1, 256, None)(value)
    if _CALENDAR_RE.fullmatch(text) is None:
        raise SchemaError(f"unable to parse calendar event '{text}'")
    return text


# -- property strings ---------------------------------------------------------------------------

PropertySchema = Mapping[str, Callable[[object], Value]]


def split_property_string(text: str) -> list[tuple[str | None, str]]:
    """Split ``a=1,b="x,y",bare`` into ``[("a","1"), ("b","x,y"), (None,"bare")]``.

    Quoted values may contain commas; ``\\"`` and ``\\\\`` are the escapes inside quotes.
    """
    parts: list[tuple[str | None, str]] = []
    i, n = 0, len(text)
    while i < n:
        key: str | None = None
        start = i
        while i < n and text[i] not in ",=":
            i += 1
        if i < n and text[i] == "=":
            key = text[start:i]
            i += 1
            start = i
        elif start < n and text[start] == '"':
            i = start
        if i < n and text[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise SchemaError("unterminated quoted value in property string")
                c = text[i]
                if c == "\\" and i + 1 < n:
                    buf.append(text[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                buf.append(c)
                i += 1
            value = "".join(buf)
            if i < n and text[i] != ",":
                raise SchemaError("garbage after quoted value in property string")
        else:
            start = i if key is not None else start
            while i < n and text[i] != ",":
                i += 1
            value = text[start:i]
        parts.append((key, value))
        i += 1  # skip the comma
    return parts


def parse_property_string(
    text: str, schema: PropertySchema, default_key: str | None = None, required: tuple[str, ...] = ()
) -> dict[str, Value]:
    """Parse and validate a property string against ``schema``; return its typed parts."""
    if not isinstance(text, str):
        raise SchemaError(f"expected string value, got {type(text).__name__}")
    result: dict[str, Value] = {}
    for key, raw in split_property_string(text):
        if key is None:
            if default_key is None:
                raise SchemaError(f"value without key, but schema does not define a default key: '{raw}'")
            key = default_key
        if key not in schema:
            raise SchemaError(f"parameter verification failed - '{key}': schema does not allow additional properties")
        if key in result:
            raise SchemaError(f"parameter verification failed - '{key}': duplicate key in property string")
        try:
            result[key] = schema[key](raw)
        except SchemaError as err:
            raise SchemaError(f"parameter verification failed - '{key}': {err}") from None
    for key in required:
        if key not in result:
            raise SchemaError(f"parameter verification failed - '{key}': property is missing and it is not optional")
    return result


_NEEDS_QUOTES: Final = re.compile(r'[,="\\\n\r]|^\s|\s$|^$')


def format_property_string(parts: Mapping[str, Value], schema: PropertySchema) -> str:
    """Canonical text of a property string: keys in schema order, values quoted when needed."""
    out = []
    for key in schema:
        if key not in parts:
            continue
        value = parts[key]
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if _NEEDS_QUOTES.search(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return ",".join(out)


def _property_string(
    schema: PropertySchema, default_key: str | None = None, required: tuple[str, ...] = ()
) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"expected string value, got {type(value).__name__}")
        parts = parse_property_string(value, schema, default_key, required)
        return format_property_string(parts, schema)

    return check


MAINTENANCE_TYPES: Final = ("read-only", "offline", "delete", "unmount")

MAINTENANCE_SCHEMA: Final[PropertySchema] = {
    "type": _enum(*MAINTENANCE_TYPES),
    "message": _string(0, 64),
}
TUNING_SCHEMA: Final[PropertySchema] = {
    "chunk-order": _enum("none", "inode"),
    "sync-level": _enum("none", "file", "filesystem"),
    "gc-atime-safety-check": check_bool,
    "gc-atime-cutoff": _integer(1, 2880),
    "gc-cache-capacity": _integer(0, 8 * 1024 * 1024),
    "default-verification-workers": _integer(1, 32),
    "default-verification-readers": _integer(1, 32),
}
_NOTIFY_WHEN = _enum("always", "never", "error")
NOTIFY_SCHEMA: Final[PropertySchema] = {
    "gc": _NOTIFY_WHEN,
    "verify": _NOTIFY_WHEN,
    "sync": _NOTIFY_WHEN,
    "prune": _NOTIFY_WHEN,
}
BACKEND_SCHEMA: Final[PropertySchema] = {
    "type": _enum("filesystem", "s3"),
    "client": _string(3, 32, NAME_RE),
    "bucket": _string(3, 63, re.compile(r"[a-z0-9][a-z0-9.\-]*")),
    "max-cache-size": _string(1, 32, re.compile(r"[0-9]+(?:\.[0-9]+)?\s*(?:[KMGTP]i?B?|B)?")),
}

#: Every key a datastore section may carry, with its checker.  ``path`` is required.
SECTION_SCHEMA: Final[Mapping[str, Callable[[object], Value]]] = {
    "path": check_path,
    "comment": _string(0, 128),
    "gc-schedule": check_calendar_event,
    "prune-schedule": check_calendar_event,
    "keep-last": _integer(1),
    "keep-hourly": _integer(1),
    "keep-daily": _integer(1),
    "keep-weekly": _integer(1),
    "keep-monthly": _integer(1),
    "keep-yearly": _integer(1),
    "verify-new": check_bool,
    "notify-user": _string(3, 64, _USERID_RE),
    "notify": _property_string(NOTIFY_SCHEMA),
    "notification-mode": _enum("legacy-sendmail", "notification-system"),
    "tuning": _property_string(TUNING_SCHEMA),
    "maintenance-mode": _property_string(MAINTENANCE_SCHEMA, "type", ("type",)),
    "backing-device": _string(36, 36, _UUID_RE),
    "gc-on-unmount": check_bool,
    "backend": _property_string(BACKEND_SCHEMA),
}
REQUIRED_KEYS: Final = ("path",)


def check_value(key: str, value: Any) -> Value:
    """Validate one section property; raise :class:`SchemaError` with the reason."""
    checker = SECTION_SCHEMA.get(key)
    if checker is None:
        raise SchemaError(f"unknown property '{key}'")
    return checker(value)


def format_value(value: Value) -> str:
    """The text form of a typed value, as the writer puts it in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
