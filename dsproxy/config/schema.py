"""The datastore section schema: which keys exist and what their values may be (PBS 4.x).

Values are validated once, when the file is parsed or when the API hands a value in -- by the
*same* checkers (:func:`check_value`, :func:`check_section_rules`), so the writer can never put a
value in the file that the parser would refuse -- and stored *typed* (``int`` for ``keep-*``,
``bool`` for ``verify-new`` and ``gc-on-unmount``, ``str`` for the rest).  Property strings
(``maintenance-mode``, ``tuning``, ``notify``, ``backend``, ``notification-thresholds``) are stored
in their canonical text form (keys in schema order, values quoted only where needed), so the API
returns them the way PBS does and ``dump`` writes them back unchanged;
:func:`parse_property_string` turns them into a dict when something needs the parts.

The rules are those of pbs-api-types 1.0.x (``DataStoreConfig``), proxmox-schema (property
strings, integers, booleans) and proxmox-section-config; error texts follow them (``value must be at
least 3 characters long``, ``Unable to parse boolean option.``, ``number too large to fit in target
type``, ...) so that messages read like the ones PBS admins already know.  What holds:

* **No control character in any value**, before or after unescaping (Unicode category Cc:
  U+0000-U+001F, U+007F-U+009F), and no lone surrogate: the section-config writer of PBS refuses
  them, so a file PBS wrote never has one, and one in the file could only end the line early.
  (PBS's calendar parser would take a tab between parts; the file cannot hold one, so neither
  does dsproxy.)
* **Property strings** are parsed like proxmox-schema's ``PropertyIterator``: ``key=value`` or a
  bare value for the default key (``backend filesystem``, ``maintenance-mode offline``); a value
  may be ``"..."`` with exactly the escapes ``\\"``, ``\\\\`` and ``\\n`` (anything else: "unsupported
  escape sequence"); unknown and duplicate keys are refused.  The writer quotes a value that holds
  ``,``, ``"`` or ``\\`` or starts or ends with white space, and escapes as PBS does.
* **Integers** are i64 (``[+-]?[0-9]+``; a digit run longer than 20 characters is "number too
  large" without ever reaching ``int()``, which refuses more than 4,300 digits with a ValueError),
  then the schema's minimum/maximum.
* **Byte sizes** (``max-cache-size``, ``s3-upload``, ``s3-download``) are proxmox-human-byte's:
  a non-negative decimal number, optional white space, an optional unit ``K M G T P`` (SI) or
  ``Ki Mi Gi Ti Pi`` (IEC), the ``B`` optional, **any case** (``64gib``, ``1.5 TB``, ``512``).
  Unlike Rust's float parser ``inf`` and ``nan`` are refused.
* **Calendar events** (``gc-schedule``, ``prune-schedule``, ``counter-reset-schedule``) are parsed
  with proxmox-time's grammar (:mod:`dsproxy.config.calendar`): what PBS accepts is accepted, what
  it refuses is refused.  At most 4,096 characters (PBS has no limit; a line has to end somewhere).
* **backend**: ``type`` defaults to ``filesystem``, which takes no ``client``, ``bucket`` or
  ``max-cache-size``; ``s3`` needs ``client`` and ``bucket``.  Bucket names follow S3's rules as PBS
  checks them: ``^[a-z0-9]([a-z0-9-]*[a-z0-9])?$``, 3-63 characters, not ``xn--``/``sthree-``/
  ``amzn-s3-demo-`` at the start nor ``--ol-s3``/``.mrap``/``--x-s3`` at the end.
* **path**: 1-4096 characters.  Without ``backing-device`` it must be absolute (the design wins
  over PBS, whose parser takes any string); with ``backing-device`` (a removable store) it is the
  path *on the device* and must be relative, without ``..`` components -- PBS's create refuses an
  absolute one.  The store itself then lives at :func:`absolute_path`: ``<mount dir>/<name>``
  (``/mnt/datastore`` as in PBS; ``$DSPROXY_MOUNT_DIR`` overrides it for tests).  These rules span
  two keys, so they are in :func:`check_section_rules`, which the parser and the writer both call.
* ``comment`` may be empty (``\\tcomment `` -- key, one space, nothing -- is what PBS's create
  writes); other keys get the checker's own refusal of an empty value.
* ``backend`` and ``backing-device`` (like ``path``) are fixed at create: :data:`IMMUTABLE_KEYS`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from .calendar import is_calendar_event

Value = str | int | bool

NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-]*")
#: a control character (Unicode Cc, what Rust's ``char::is_control`` means) or a lone surrogate
CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SAFE_ID_RE: Final = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._\-]*)")
# the name part may hold "@" itself (PBS: ``^[^\s:/[:cntrl:]]+@SAFE_ID$``)
_USERID_RE: Final = re.compile(r"[^\s:/\x00-\x1f\x7f-\x9f]{1,60}@[A-Za-z0-9_][A-Za-z0-9._\-]{1,31}")
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_BUCKET_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?")
_NUMBER_RE: Final = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
_MAX_INT_CHARS: Final = 20  # "-9223372036854775808"

#: the words a boolean may be spelt with (lower case; config values and API query parameters alike)
TRUE: Final = frozenset({"1", "on", "yes", "true"})
FALSE: Final = frozenset({"0", "off", "no", "false"})

#: where PBS mounts a removable datastore (pbs-api-types ``DATASTORE_MOUNT_DIR``)
DATASTORE_MOUNT_DIR: Final = "/mnt/datastore"


class SchemaError(ValueError):
    """A value does not fit its schema; the message is the bare reason."""


def show(text: str, limit: int = 64) -> str:
    """``text`` for an error message: control characters and surrogates escaped, long text cut."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    if text.isprintable():
        return text
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


# -- simple value checkers: raw text (or JSON value) -> typed value ---------------------------------


def check_name(name: object) -> str:
    """Validate a datastore name (``^[A-Za-z0-9_][A-Za-z0-9._\\-]*$``, 3-32 chars)."""
    if not isinstance(name, str):
        raise SchemaError(f"expected string value, got {type(name).__name__}")
    if len(name) < 3:
        raise SchemaError("value must be at least 3 characters long")
    if len(name) > 32:
        raise SchemaError("value may only be 32 characters long")
    if not is_name(name):
        raise SchemaError("value does not match the regex pattern")
    return name


def is_name(name: str) -> bool:
    """Whether ``name`` is a valid datastore name (what :func:`check_name` accepts)."""
    return 3 <= len(name) <= 32 and NAME_RE.fullmatch(name) is not None


def _string(min_len: int = 1, max_len: int = 4096, pattern: re.Pattern[str] | None = None) -> Callable[[object], str]:
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
            shown = show(value) if isinstance(value, str) else value
            raise SchemaError(f"value '{shown}' is not defined in the enumeration.")
        return value

    return check


def parse_integer(value: object) -> int:
    """An i64 from text (``[+-]?[0-9]+``) or a JSON integer; never a huge ``int()``."""
    if isinstance(value, bool):
        raise SchemaError("expected integer value, got boolean")
    if isinstance(value, str):
        if _INT_RE.fullmatch(value) is None:
            raise SchemaError(f"invalid integer value '{show(value)}'")
        if len(value) > _MAX_INT_CHARS:
            raise SchemaError("number too large to fit in target type")
        value = int(value)
    if not isinstance(value, int):
        raise SchemaError(f"expected integer value, got {type(value).__name__}")
    if not I64_MIN <= value <= I64_MAX:
        raise SchemaError("number too large to fit in target type")
    return value


def _integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = parse_integer(value)
        if minimum is not None and number < minimum:
            raise SchemaError(f"value must have a minimum value of {minimum} (got {number})")
        if maximum is not None and number > maximum:
            raise SchemaError(f"value must have a maximum value of {maximum} (got {number})")
        return number

    return check


def check_bool(value: object) -> bool:
    """Booleans are ``1/0``, ``on/off``, ``yes/no``, ``true/false`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
    raise SchemaError("Unable to parse boolean option.")


_check_path_text = _string(1, 4096)


def check_path(value: object) -> str:
    """The text of ``path`` (absolute or relative: see :func:`check_section_rules`)."""
    return _check_path_text(value)


_calendar_memo: dict[str, bool] = {}


def check_calendar_event(value: object) -> str:
    text = _string(1, 4096)(value)
    ok = _calendar_memo.get(text)
    if ok is None:
        ok = is_calendar_event(text)
        if len(_calendar_memo) >= 4096:
            _calendar_memo.clear()
        _calendar_memo[text] = ok
    if not ok:
        raise SchemaError(f"unable to parse calendar event '{show(text)}'")
    return text


_UNITS: Final = frozenset("kKmMgGtTpP")


def check_byte_size(value: object) -> str:
    """A proxmox-human-byte size (``64gib``, ``1.5 TB``, ``512``); the text is kept as given."""
    text = _string(1, 64)(value)
    rest = text[:-1] if text[-1:] in ("b", "B") else text
    binary = rest.endswith("i")
    if binary:
        rest = rest[:-1]
    if rest[-1:] in _UNITS:
        rest = rest[:-1]
    elif binary:
        pass  # PBS takes a lone "i" (as bytes); so does dsproxy
    rest = rest.rstrip()
    if _NUMBER_RE.fullmatch(rest) is None:
        raise SchemaError(f"byte-size parse error for '{show(text)}': invalid float literal")
    return text


def check_bucket(value: object) -> str:
    name = _string(3, 63)(value)
    if _BUCKET_RE.fullmatch(name) is None:
        raise SchemaError("Bucket name does not match the regex pattern")
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if name.startswith(prefix):
            raise SchemaError(f"Bucket name cannot start with '{prefix}'")
    for suffix in ("--ol-s3", ".mrap", "--x-s3"):
        if name.endswith(suffix):
            raise SchemaError(f"Bucket name cannot end with '{suffix}'")
    return name


# -- property strings ---------------------------------------------------------------------------

PropertySchema = Mapping[str, Callable[[object], Value]]

_KEY_END: Final = re.compile(r"[,=]")


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The quoted string starting at ``text[i] == '"'``: (value, index after the closing quote)."""
    out: list[str] = []
    n = len(text)
    i += 1
    start = i
    while True:
        if i >= n:
            raise SchemaError("unexpected end of string")
        c = text[i]
        if c == '"':
            out.append(text[start:i])
            return "".join(out), i + 1
        if c == "\\":
            out.append(text[start:i])
            if i + 1 >= n:
                raise SchemaError("unexpected end of string")
            escaped = text[i + 1]
            if escaped == "n":
                out.append("\n")
            elif escaped in '"\\':
                out.append(escaped)
            else:
                raise SchemaError("unsupported escape sequence")
            i += 2
            start = i
            continue
        i += 1


def split_property_string(text: str) -> list[tuple[str | None, str]]:
    """Split ``a=1,b="x,y",bare`` into ``[("a","1"), ("b","x,y"), (None,"bare")]``.

    As proxmox-schema's ``PropertyIterator``: a key ends at the first ``=`` (a ``,`` first means
    there is no key); an unquoted value runs to the next ``,``; a quoted one allows the escapes
    ``\\"``, ``\\\\`` and ``\\n`` and must be followed by ``,`` or the end.
    """
    parts: list[tuple[str | None, str]] = []
    i, n = 0, len(text)
    while i < n:
        key: str | None = None
        if text[i] != '"':
            m = _KEY_END.search(text, i)
            if m is not None and m.group() == "=":
                key = text[i : m.start()]
                i = m.end()
            if not text.startswith('"', i):
                end = text.find(",", i)
                if end < 0:
                    end = n
                parts.append((key, text[i:end]))
                i = end + 1
                continue
        value, i = _quoted(text, i)
        if i < n:
            if text[i] != ",":
                raise SchemaError("garbage after quoted string")
            i += 1
        parts.append((key, value))
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
                raise SchemaError(f"value without key, but schema does not define a default key: '{show(raw)}'")
            key = default_key
        if key not in schema:
            raise SchemaError(
                f"parameter verification failed - '{show(key)}': schema does not allow additional properties"
            )
        if key in result:
            raise SchemaError(f"parameter verification failed - '{key}': duplicate key in property string")
        if CONTROL_RE.search(raw) is not None:
            raise SchemaError(f"parameter verification failed - '{key}': control characters are not allowed")
        try:
            result[key] = schema[key](raw)
        except SchemaError as err:
            raise SchemaError(f"parameter verification failed - '{key}': {err}") from None
    for key in required:
        if key not in result:
            raise SchemaError(f"parameter verification failed - '{key}': property is missing and it is not optional")
    return result


_NEEDS_QUOTES: Final = re.compile(r'[,"\\]|^\s|\s$')


def quote_property_value(text: str) -> str:
    """``text`` as a property-string value: as is, or quoted with PBS's three escapes."""
    if CONTROL_RE.search(text) is not None:
        raise SchemaError("control characters are not allowed")
    if _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_property_string(parts: Mapping[str, Value], schema: PropertySchema) -> str:
    """Canonical text of a property string: keys in schema order, values quoted when needed."""
    out = []
    for key in schema:
        if key not in parts:
            continue
        value = parts[key]
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        out.append(f"{key}={quote_property_value(text)}")
    return ",".join(out)


def _property_string(
    schema: PropertySchema,
    default_key: str | None = None,
    required: tuple[str, ...] = (),
    rules: Callable[[dict[str, Value]], None] | None = None,
) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"expected string value, got {type(value).__name__}")
        parts = parse_property_string(value, schema, default_key, required)
        if rules is not None:
            rules(parts)
        return format_property_string(parts, schema)

    return check


MAINTENANCE_TYPES: Final = ("read-only", "offline", "delete", "unmount", "s3-refresh")

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
BACKEND_TYPES: Final = ("filesystem", "s3")
BACKEND_SCHEMA: Final[PropertySchema] = {
    "type": _enum(*BACKEND_TYPES),
    "client": _string(3, 32, _SAFE_ID_RE),
    "bucket": check_bucket,
    "max-cache-size": check_byte_size,
}
_COUNT = _integer(0)
NOTIFICATION_THRESHOLDS_SCHEMA: Final[PropertySchema] = {
    "s3-get": _COUNT,
    "s3-put": _COUNT,
    "s3-post": _COUNT,
    "s3-head": _COUNT,
    "s3-delete": _COUNT,
    "s3-upload": check_byte_size,
    "s3-download": check_byte_size,
}


def _backend_rules(parts: dict[str, Value]) -> None:
    """pbs-api-types ``DatastoreBackendConfig::from_str``: what each backend type takes."""
    if parts.get("type", "filesystem") == "filesystem":
        for key in ("client", "bucket", "max-cache-size"):
            if key in parts:
                raise SchemaError(f"additional option {key}, not allowed for backend type filesystem")
    else:
        for key in ("client", "bucket"):
            if key not in parts:
                raise SchemaError(f"missing option {key}, required for backend type s3")


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
    "backend": _property_string(BACKEND_SCHEMA, "type", rules=_backend_rules),
    "notification-thresholds": _property_string(NOTIFICATION_THRESHOLDS_SCHEMA),
    "counter-reset-schedule": check_calendar_event,
}
REQUIRED_KEYS: Final = ("path",)
#: Keys an update may not set or delete (PBS: ``#[updater(skip)]``).
IMMUTABLE_KEYS: Final = ("path", "backend", "backing-device")


def check_value(key: str, value: Any) -> Value:
    """Validate one section property; raise :class:`SchemaError` with the reason.

    The one checker of a value for the parser and for API writes alike.
    """
    checker = SECTION_SCHEMA.get(key)
    if checker is None:
        raise SchemaError(f"unknown property '{show(key)}'")
    if isinstance(value, str) and CONTROL_RE.search(value) is not None:
        raise SchemaError("control characters are not allowed")
    return checker(value)


def check_section_rules(props: Mapping[str, Value]) -> tuple[str, str] | None:
    """The rules that span keys; ``(key, reason)`` of the first one broken, or ``None``.

    ``props`` are typed (every value passed :func:`check_value`); a missing ``path`` is the
    caller's to report.
    """
    path = props.get("path")
    if not isinstance(path, str):
        return None
    if "backing-device" in props:
        if path.startswith("/"):
            return ("path", f'a removable datastore\'s path is relative to its device - got "{show(path)}"')
        if ".." in path.split("/"):
            return ("path", f"a removable datastore's path must not contain '..' - got \"{show(path)}\"")
    elif not path.startswith("/"):
        return ("path", f'expected absolute path - got "{show(path)}"')
    return None


def mount_dir() -> str:
    """Where removable datastores are mounted: ``$DSPROXY_MOUNT_DIR`` or ``/mnt/datastore``."""
    return os.environ.get("DSPROXY_MOUNT_DIR") or DATASTORE_MOUNT_DIR


def absolute_path(name: str, props: Mapping[str, Value]) -> str:
    """The directory of a store's content: ``path``, or ``<mount dir>/<name>`` for a removable
    store (pbs-api-types ``DataStoreConfig::absolute_path``)."""
    if "backing-device" in props:
        return os.path.join(mount_dir(), name)
    return str(props["path"])


def format_value(value: Value) -> str:
    """The text form of a typed value, as the writer puts it in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
