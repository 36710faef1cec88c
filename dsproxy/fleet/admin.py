"""``dsproxy fleet import`` and ``dsproxy fleet status``: what they do to etcd, apart from printing.

* :func:`import_config` pushes every section of a ``datastore.cfg`` into ``PREFIX/datastores/NAME``
  (the canonical text of :func:`dsproxy.config.section.render_section`, as the mirror expects).
  It refuses if any of those keys exists already, and then writes nothing at all: the whole
  datastores prefix is read first (one consistent Range: 100,000 keys ~0.6 s here) and the
  conflicts are listed; only a clean check is followed by the create-only txns of
  :meth:`~dsproxy.fleet.etcd.Etcd.txn_batch` (<= 128 keys, < 1.5 MiB each), which still refuse a
  key another client created in between -- then the keys of the txns before it are written, and
  the result says how many.  Keys of other stores already under the prefix are no conflict.
* :func:`fleet_status` reads ``PREFIX/hosts/*`` and the current revision in one Range: each host's
  JSON (written by its manager on a lease, so a host that is gone for a TTL is gone from the list),
  and the datastore keys without their values at that same revision (a keys-only Range: ~3 MB at
  100,000 stores).  A host's ``lag`` is what it has not applied of the *configuration*: the
  revisions from the one it serves to the newest datastore change (0 when in sync, however many
  host-key refreshes came since -- the current revision counts those too), and ``behind`` the
  stores changed after the revision it serves (created or updated; a delete leaves no key to read,
  so a host that missed only removes shows ``behind`` 0 with a non-zero ``lag`` only if a later
  change exists).  A host key whose value is not the expected JSON is listed with an ``error``,
  never skipped.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.schema import Value
from ..config.section import render_section
from . import datastores_prefix, hosts_prefix
from .etcd import KV, Etcd


@dataclass
class ImportResult:
    """``imported`` stores written at ``revision``; ``conflicts``: keys that already existed (nothing of
    them written; with ``imported`` 0 when the check before writing found them)."""

    imported: int
    revision: int
    conflicts: list[KV] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # name -> the text it was to be imported as


def section_texts(sections: Mapping[str, Mapping[str, Value]], filename: str) -> dict[str, bytes]:
    """name -> the canonical section text, UTF-8 (PropertyError naming the file/section/key if one is bad)."""
    return {name: render_section(name, props, filename)[0].encode() for name, props in sections.items()}


async def import_config(
    etcd: Etcd, prefix: str, sections: Mapping[str, Mapping[str, Value]], filename: str = "datastore.cfg"
) -> ImportResult:
    """Create ``PREFIX/datastores/NAME`` for every section, or nothing if one exists (see the module)."""
    texts = section_texts(sections, filename)
    base = datastores_prefix(prefix)
    items = [(base + name.encode(), text) for name, text in texts.items()]
    revision, existing = await etcd.get_prefix(base)
    wanted = {key for key, _ in items}
    conflicts = [kv for kv in existing if kv.key in wanted]
    decoded = {name: text.decode() for name, text in texts.items()}
    if conflicts:
        return ImportResult(0, revision, conflicts, decoded)
    result = await etcd.txn_batch(items)
    return ImportResult(result.created, result.revision or revision, result.conflicts, decoded)


@dataclass
class HostState:
    """One ``PREFIX/hosts/ID`` key: its JSON fields (``data``), or why it could not be read (``error``)."""

    id: str
    mod_revision: int
    data: dict[str, Any]
    error: str = ""

    @property
    def revision(self) -> int | None:
        value = self.data.get("revision")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def as_json(self, changes: list[int]) -> dict[str, Any]:
        """The host's fields, with ``lag`` and ``behind`` against ``changes``: every datastore key's
        mod_revision, sorted."""
        served = self.revision
        newest = changes[-1] if changes else 0
        return {
            **self.data,
            "id": self.id,
            "key-revision": self.mod_revision,
            "lag": None if served is None else max(0, newest - served),
            "behind": None if served is None else len(changes) - bisect.bisect_right(changes, served),
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class FleetStatus:
    revision: int
    hosts: list[HostState]
    endpoint: str
    changes: list[int] = field(default_factory=list)  #: every datastore key's mod_revision, sorted

    @property
    def newest_change(self) -> int:
        """The revision of the newest datastore create or update (0: none)."""
        return self.changes[-1] if self.changes else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "datastore-revision": self.newest_change,
            "datastores": len(self.changes),
            "endpoint": self.endpoint,
            "hosts": [h.as_json(self.changes) for h in self.hosts],
        }


def _host(base: bytes, kv: KV) -> HostState:
    host_id = kv.key[len(base) :].decode(errors="replace")
    try:
        data = json.loads(kv.value)
    except ValueError as err:  # UnicodeDecodeError included
        return HostState(host_id, kv.mod_revision, {}, f"not JSON: {err}")
    if not isinstance(data, dict):
        return HostState(host_id, kv.mod_revision, {}, f"not a JSON object: {type(data).__name__}")
    revision = data.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool):
        return HostState(host_id, kv.mod_revision, data, f"'revision' is {revision!r}, not an integer")
    return HostState(host_id, kv.mod_revision, data)


async def fleet_status(etcd: Etcd, prefix: str) -> FleetStatus:
    """Every host key under ``PREFIX/hosts/`` and the current revision, and the datastore keys'
    mod_revisions at that revision (two reads, one revision)."""
    base = hosts_prefix(prefix)
    revision, kvs = await etcd.get_prefix(base)
    _, stores = await etcd.get_prefix(datastores_prefix(prefix), revision=revision, keys_only=True)
    changes = sorted(kv.mod_revision for kv in stores)
    return FleetStatus(revision, [_host(base, kv) for kv in kvs], etcd.endpoint, changes)
