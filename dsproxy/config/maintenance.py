"""Operations and maintenance modes (docs/design.md §5).

``maintenance-mode`` is a property string ``type=<read-only|offline|delete|unmount|s3-refresh>
[,message=..]`` (a bare type is allowed: ``offline,message=...`` is how PBS writes it).
:meth:`MaintenanceMode.check` answers whether an operation may start and, if not, with the exact
text of pbs-api-types' ``MaintenanceMode::check``; the caller wraps it as PBS's
``lookup_datastore`` does (:func:`refusal_text`): ``datastore 'NAME' is unavailable: <reason>``.

| type       | READ    | WRITE   | LOOKUP  | evict when idle |
|------------|---------|---------|---------|-----------------|
| read-only  | ok      | refused | ok      | no              |
| offline    | refused | refused | ok      | yes             |
| s3-refresh | refused | refused | ok      | no              |
| unmount    | refused | refused | ok      | yes             |
| delete     | refused | refused | refused | yes             |

The message is percent-decoded for display (PBS does the same; invalid UTF-8 becomes empty).
A removable store whose device is not mounted is refused with :func:`not_mounted_text`.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from .schema import MAINTENANCE_SCHEMA, format_property_string, parse_property_string


class Operation(enum.IntEnum):
    """What a lookup is for.  ``LOOKUP`` is in-memory only: no I/O on the store is allowed."""

    READ = 0
    WRITE = 1
    LOOKUP = 2


_EVICTING = frozenset({"offline", "delete", "unmount"})


class MaintenanceMode(NamedTuple):
    type: str
    message: str = ""

    @classmethod
    def parse(cls, text: str) -> MaintenanceMode:
        """Parse a ``maintenance-mode`` property string (raises ``SchemaError``)."""
        parts = parse_property_string(text, MAINTENANCE_SCHEMA, "type", ("type",))
        return cls(str(parts["type"]), str(parts.get("message", "")))

    def __str__(self) -> str:
        parts: dict[str, str | int | bool] = {"type": self.type}
        if self.message:
            parts["message"] = self.message
        return format_property_string(parts, MAINTENANCE_SCHEMA)

    @property
    def decoded_message(self) -> str:
        import urllib.parse  # rare: only when a refusal text is built

        try:
            return urllib.parse.unquote(self.message, errors="strict")
        except UnicodeDecodeError:
            return ""

    @property
    def evicts(self) -> bool:
        """Whether a process must drop its instance once it has no operation left on the store."""
        return self.type in _EVICTING

    def check(self, operation: Operation) -> str | None:
        """Return ``None`` if ``operation`` may start, else the reason (without the store prefix)."""
        if self.type == "delete":
            return "datastore is being deleted"
        if operation == Operation.LOOKUP:
            return None
        if self.type == "unmount":
            return "datastore is being unmounted"
        if self.type == "offline":
            return f"offline maintenance mode: {self.decoded_message}"
        if self.type == "s3-refresh":
            return f"S3 refresh maintenance mode: {self.decoded_message}"
        if self.type == "read-only" and operation == Operation.WRITE:
            return f"read-only maintenance mode: {self.decoded_message}"
        return None

    def allows_transition_to(self, new: MaintenanceMode | None) -> bool:
        """From ``delete`` only ``delete`` may follow; every other transition is allowed."""
        return self.type != "delete" or (new is not None and new.type == "delete")


def refusal_text(name: str, reason: str) -> str:
    """The full refusal of a lookup, as PBS >= 3.2.13 words it."""
    return f"datastore '{name}' is unavailable: {reason}"


def not_mounted_text(name: str) -> str:
    """The refusal of a removable store whose device is not mounted."""
    return f"datastore '{name}' is not mounted"
