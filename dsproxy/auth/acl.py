"""Privileges, roles and ``acl.cfg`` as PBS defines them (``pbs-api-types`` ``acl.rs``).

Privileges are bits, named as PBS names them; roles are fixed sets (PBS has no custom roles).
dsproxy checks only the datastore privileges (and ``Sys.Audit`` for the node status), but every
role name PBS 4 knows parses, so an ``acl.cfg`` from a PBS host loads unchanged.

``acl.cfg`` is one entry per line, ``acl:PROPAGATE:PATH:UGID[,UGID...]:ROLE[,ROLE...]``: propagate
``0``/``1``; a path ``/`` or ``/a/b``; users and tokens (``user@realm``, ``user@realm!name``) and
groups (``@group``, parsed and kept, but PBS has no group membership, so they grant nothing).
Blank lines are skipped; anything else is an error naming the line.  Writing follows PBS's own
writer: per path (depth first, children in name order) the non-propagating lines first, users
with the same role set joined on one line, so a file PBS wrote is written back the same.

Resolution (PBS's ``AclTree::roles``): walk from ``/`` to the path; on every node on the way only
propagating roles count, on the path's own node all of them; a node that has any role for the id
*replaces* what was collected above it (more specific wins); ``NoAccess`` on a node replaces all
others there.  A token never has more than its user: its privileges are ANDed with the user's.
``root@pam`` (the user, not its tokens) has every privilege, as in PBS.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from .errors import AuthConfigError

_PRIVILEGE_NAMES: Final = (
    "Sys.Audit", "Sys.Modify", "Sys.PowerManagement",
    "Datastore.Audit", "Datastore.Allocate", "Datastore.Modify", "Datastore.Read", "Datastore.Verify",
    "Datastore.Backup", "Datastore.Prune",
    "Permissions.Modify",
    "Remote.Audit", "Remote.Modify", "Remote.Read", "Remote.DatastoreBackup", "Remote.DatastoreModify",
    "Remote.DatastorePrune",
    "Sys.Console",
    "Tape.Audit", "Tape.Modify", "Tape.Write", "Tape.Read",
    "Realm.Allocate",
)  # fmt: skip
#: privilege name -> bit
PRIVILEGES: Final[dict[str, int]] = {name: 1 << i for i, name in enumerate(_PRIVILEGE_NAMES)}
ALL: Final = (1 << 64) - 1


def privs(*names: str) -> int:
    bits = 0
    for name in names:
        bits |= PRIVILEGES[name]
    return bits


DATASTORE_AUDIT: Final = privs("Datastore.Audit")
DATASTORE_ALLOCATE: Final = privs("Datastore.Allocate")
DATASTORE_MODIFY: Final = privs("Datastore.Modify")
DATASTORE_READ: Final = privs("Datastore.Read")
DATASTORE_BACKUP: Final = privs("Datastore.Backup")
SYS_AUDIT: Final = privs("Sys.Audit")
NO_ACCESS: Final = "NoAccess"

#: role name -> privileges (PBS's predefined roles)
ROLES: Final[dict[str, int]] = {
    "Admin": ALL,
    "Audit": privs("Sys.Audit", "Datastore.Audit"),
    NO_ACCESS: 0,
    "DatastoreAdmin": privs(
        "Datastore.Audit",
        "Datastore.Modify",
        "Datastore.Read",
        "Datastore.Verify",
        "Datastore.Backup",
        "Datastore.Prune",
    ),
    "DatastoreReader": privs("Datastore.Audit", "Datastore.Verify", "Datastore.Read"),
    "DatastoreBackup": privs("Datastore.Backup"),
    "DatastorePowerUser": privs("Datastore.Prune", "Datastore.Backup"),
    "DatastoreAudit": privs("Datastore.Audit"),
    "RemoteAudit": privs("Remote.Audit"),
    "RemoteAdmin": privs("Remote.Audit", "Remote.Modify", "Remote.Read"),
    "RemoteSyncOperator": privs("Remote.Audit", "Remote.Read"),
    "RemoteSyncPushOperator": privs("Remote.Audit", "Remote.DatastoreBackup"),
    "RemoteDatastorePowerUser": privs("Remote.Audit", "Remote.DatastoreBackup", "Remote.DatastorePrune"),
    "RemoteDatastoreAdmin": privs(
        "Remote.Audit", "Remote.DatastoreBackup", "Remote.DatastoreModify", "Remote.DatastorePrune"
    ),
    "TapeAudit": privs("Tape.Audit"),
    "TapeAdmin": privs("Tape.Audit", "Tape.Modify", "Tape.Read", "Tape.Write"),
    "TapeOperator": privs("Tape.Audit", "Tape.Read", "Tape.Write"),
    "TapeReader": privs("Tape.Audit", "Tape.Read"),
}

ROOT_USER: Final = "root@pam"


def config_write_privilege(method: str, name: str | None) -> tuple[int, tuple[str, ...]]:
    """What a config write needs (PBS): create ``Datastore.Allocate`` on ``/datastore``, update
    ``Datastore.Modify`` and remove ``Datastore.Allocate`` on ``/datastore/{name}``."""
    if method == "POST" or name is None:
        return DATASTORE_ALLOCATE, ("datastore",)
    return (DATASTORE_MODIFY if method == "PUT" else DATASTORE_ALLOCATE), ("datastore", name)


_MAX_LINE: Final = 64 * 1024


def privilege_names(bits: int) -> list[str]:
    return [name for name, bit in PRIVILEGES.items() if bits & bit]


def split_path(path: str) -> tuple[str, ...]:
    """``/datastore/a`` -> ``("datastore", "a")``; empty components dropped, as PBS does."""
    return tuple(c for c in path.split("/") if c)


def check_path(path: str) -> str:
    """A path a client may name in an ACL update: ``/`` or ``/comp/...`` of safe ids; canonical form."""
    parts = split_path(path)
    if not path.startswith("/") or any(not _safe_id(p) for p in parts) or len(parts) > 8:
        raise ValueError(f"invalid ACL path '{path[:100]}'")
    return "/" + "/".join(parts)


def _safe_id(text: str) -> bool:
    return (
        0 < len(text) <= 64
        and (text[0].isascii() and (text[0].isalnum() or text[0] == "_"))
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
    )


@dataclass
class _Node:
    # ugid -> role -> propagate
    entries: dict[str, dict[str, bool]] = field(default_factory=dict)
    children: dict[str, _Node] = field(default_factory=dict)

    def roles_for(self, ugid: str, leaf: bool) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for role, propagate in self.entries.get(ugid, {}).items():
            if propagate or leaf:
                if role == NO_ACCESS:
                    return {NO_ACCESS: False}
                out[role] = propagate
        return out


@dataclass(frozen=True)
class AclEntry:
    path: str
    ugid: str
    role: str
    propagate: bool

    def as_api(self) -> dict[str, object]:
        """As PBS's ``GET /access/acl`` lists it."""
        return {
            "path": self.path,
            "ugid": self.ugid.removeprefix("@"),
            "ugid_type": "group" if self.ugid.startswith("@") else "user",
            "roleid": self.role,
            "propagate": self.propagate,
        }


class AclTree:
    """``acl.cfg`` parsed."""

    def __init__(self) -> None:
        self.root = _Node()

    def _node(self, parts: Iterable[str], create: bool) -> _Node | None:
        node = self.root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = node.children[part] = _Node()
            node = child
        return node

    def grant(self, path: str, ugid: str, role: str, propagate: bool) -> None:
        node = self._node(split_path(path), create=True)
        assert node is not None
        roles = node.entries.setdefault(ugid, {})
        if role == NO_ACCESS:
            roles.clear()
        else:
            roles.pop(NO_ACCESS, None)
        roles[role] = propagate

    def revoke(self, path: str, ugid: str, role: str) -> None:
        node = self._node(split_path(path), create=False)
        if node is not None and ugid in node.entries:
            node.entries[ugid].pop(role, None)
            if not node.entries[ugid]:
                del node.entries[ugid]

    def remove_ugid(self, ugid: str) -> None:
        """Drop every entry of ``ugid`` (a removed token's)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.entries.pop(ugid, None)
            stack.extend(node.children.values())

    def roles(self, auth_id: str, parts: tuple[str, ...]) -> dict[str, bool]:
        node = self.root
        found = node.roles_for(auth_id, not parts)
        for i, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                return found
            node = child
            more = node.roles_for(auth_id, i + 1 == len(parts))
            if more:
                found = more
        return found

    def entries(self) -> Iterator[AclEntry]:
        def walk(node: _Node, path: str) -> Iterator[AclEntry]:
            for ugid in sorted(node.entries):
                for role, propagate in sorted(node.entries[ugid].items()):
                    yield AclEntry(path or "/", ugid, role, propagate)
            for name in sorted(node.children):
                yield from walk(node.children[name], f"{path}/{name}")

        return walk(self.root, "")


def parse_acl(data: bytes, filename: str = "acl.cfg") -> AclTree:
    """Parse ``acl.cfg``; :class:`AuthConfigError` lists every bad line."""
    tree = AclTree()
    errors: list[str] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthConfigError(f"unable to parse acl config '{filename}': not UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        problem = _parse_line(tree, line) if len(line) <= _MAX_LINE else "line too long"
        if problem:
            errors.append(f"line {lineno} - {problem}")
    if errors:
        raise AuthConfigError(f"unable to parse acl config '{filename}', " + "; ".join(errors[:10]))
    return tree


def _parse_line(tree: AclTree, line: str) -> str | None:
    items = line.split(":")
    if len(items) != 5:
        return "wrong number of items."
    if items[0] != "acl":
        return "line does not start with 'acl'."
    if items[1] not in ("0", "1"):
        return "expected '0' or '1' for propagate flag."
    ugids = [u.strip() for u in items[3].split(",")]
    roles = [r.strip() for r in items[4].split(",")]
    for role in roles:
        if role not in ROLES:
            return f"unknown role '{role[:40]}'"
    for ugid in ugids:
        if not ugid or any(c.isspace() for c in ugid) or ("@" not in ugid):
            return f"invalid user or group '{ugid[:80]}'"
        for role in roles:
            tree.grant(items[2], ugid, role, items[1] == "1")
    return None


def render_acl(tree: AclTree) -> bytes:
    """``acl.cfg`` as PBS writes it (see the module docstring)."""
    lines: list[str] = []

    def walk(node: _Node, path: str) -> None:
        for flag in (False, True):
            by_role: dict[str, set[str]] = {}
            for ugid, roles in node.entries.items():
                if ugid == ROOT_USER:
                    continue  # root is always Admin; PBS does not store it either
                for role, propagate in roles.items():
                    if propagate == flag:
                        by_role.setdefault(role, set()).add(ugid)
            by_ugids: dict[str, set[str]] = {}
            for role, ugids in by_role.items():
                by_ugids.setdefault(",".join(sorted(ugids)), set()).add(role)
            for ugids_text in sorted(by_ugids):
                roles_set = by_ugids[ugids_text]
                role_text = NO_ACCESS if NO_ACCESS in roles_set else ",".join(sorted(roles_set))
                lines.append(f"acl:{int(flag)}:{path or '/'}:{ugids_text}:{role_text}")
        for name in sorted(node.children):
            walk(node.children[name], f"{path}/{name}")

    walk(tree.root, "")
    return "".join(line + "\n" for line in lines).encode()
