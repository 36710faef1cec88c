"""What a create or update request may hand in, checked before the config is touched.

The manager's writer (:mod:`dsproxy.daemon.writer`) calls these; the values themselves are then
checked by :func:`~dsproxy.config.section.check_section` -- the parser's own checkers -- so the
API and the file accept exactly the same values.  Every refusal is a :class:`PropertyError`
(``parameter verification failed - '<key>': <reason>``), which the manager answers with 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import PropertyError
from .schema import I64_MAX, I64_MIN, IMMUTABLE_KEYS, SECTION_SCHEMA, show


def request_properties(body: Mapping[str, Any], skip: tuple[str, ...]) -> dict[str, object]:
    """Request properties -> raw values for the schema (JSON numbers and booleans as text)."""
    props: dict[str, object] = {}
    for key, value in body.items():
        if key in skip:
            continue
        if not isinstance(key, str) or key not in SECTION_SCHEMA:
            raise PropertyError(show(str(key)), "unknown property")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            if not I64_MIN <= value <= I64_MAX:  # and never str() of a huge int (4,300 digits at most)
                raise PropertyError(key, "number too large to fit in target type")
            value = str(value)
        elif not isinstance(value, str):
            raise PropertyError(key, "expected a string")
        props[key] = value
    return props


def check_create(props: Mapping[str, object]) -> None:
    """What a create may not do, whatever the values: lay out a removable store.

    A removable store's content is on a device PBS mounts (``backing-device``); dsproxy serves
    such stores from a ``datastore.cfg`` PBS wrote, but cannot create one.
    """
    if "backing-device" in props:
        raise PropertyError(
            "backing-device",
            "removable datastores are created by PBS on the device; dsproxy cannot create one",
        )


def check_update(props: Mapping[str, object], delete: list[str]) -> None:
    """An update may neither set nor delete ``path``, ``backend`` or ``backing-device``."""
    for key in delete:
        if key not in SECTION_SCHEMA:
            raise PropertyError("delete", f"unknown property '{show(key)}'")
        if key in IMMUTABLE_KEYS:
            raise PropertyError("delete", f"'{key}' cannot be deleted")
    if "path" in props:
        raise PropertyError("path", "the path of a datastore cannot be changed")
    for key in IMMUTABLE_KEYS:
        if key in props:
            raise PropertyError(key, f"schema does not allow additional properties ('{key}' cannot be changed)")
