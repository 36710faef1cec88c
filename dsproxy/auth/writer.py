"""The manager's writes of ``token.shadow``, ``user.cfg`` and ``acl.cfg``, and its watch of them.

The manager is their only writer (from its writer thread, like :mod:`dsproxy.daemon.writer`).  A
write takes the file's lock (PBS's lock names, ``flock`` through
:func:`dsproxy.config.file.config_lock`), reads and parses the file under it -- a file that does
not parse is never overwritten -- replaces it atomically (temp file ``O_EXCL|O_NOFOLLOW``, fsync,
rename, directory fsync; 0640, the manager's group, i.e. ``root:dsproxy`` under systemd) and then
bumps its shared generation (publish after write): ``GEN_TOKEN`` for ``token.shadow``,
``GEN_ACL`` for ``user.cfg`` and ``acl.cfg``.

Decisions (PBS's where it has one):

* ``token create`` makes a UUID v4 secret (PBS: ``proxmox_uuid``, lowercase hex with dashes),
  stores only its ``$5$`` hash and returns the secret once.  The hash is written before the
  ``token:`` section (PBS's order): a crash between leaves a hash no section activates.
* A token of a user that ``user.cfg`` does not list adds a ``user:`` section for it (enabled,
  no expiry): dsproxy has no user management, and PBS would refuse.  A token's privileges are
  still limited to its user's, so that user needs an ACL too (``root@pam`` has all).
* ``token remove`` drops the section, the token's ACL entries (as PBS does) and its hash.
* ``acl update`` needs an id that ``user.cfg`` lists (or ``root@pam``) and a known role; a path is
  ``/`` or ``/comp/...``.
* Hand edits: :meth:`AccessWriter.check_files` (the manager's watch, every 0.5 s) compares each
  file's (inode, size, mtime) with what this writer last wrote or saw, and bumps the file's
  generation when it changed, so workers drop their caches within a second.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config.errors import ConfigError
from ..config.file import config_lock, replace_file
from ..ipc import shm
from . import crypt
from .acl import ROLES, check_path, parse_acl, render_acl
from .errors import AuthConfigError, Refused
from .files import ACL_LOCK, SHADOW_LOCK, USER_LOCK, AccessFiles, Signature, read_file, signature
from .shadow import parse_shadow, render_shadow
from .users import ROOT_USER, Section, check_auth_id, parse_bool, parse_users, render_users, user_of

log = logging.getLogger("dsproxy.auth")
MODE = 0o640


class AccessWriter:
    """Token and ACL writes of one instance; not thread-safe (the manager's writer thread)."""

    def __init__(self, config_dir: str | Path, segment: Callable[[], shm.Segment | None]) -> None:
        self.files = AccessFiles(Path(config_dir))
        self._segment = segment
        self.group = os.getegid()
        self._seen: dict[Path, Signature] = {}

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, lock_name: str) -> Iterator[None]:
        try:
            with config_lock(self.files.lock(lock_name)):
                yield
        except ConfigError as err:
            raise Refused(503, str(err)) from None

    def _read(self, path: Path, parse: Callable[[bytes, str], Any]) -> Any:
        try:
            return parse(read_file(path), str(path))
        except AuthConfigError as err:
            raise Refused(503, f"refusing to write: {err.message} (fix it first)") from None

    def _replace(self, path: Path, data: bytes, which: int) -> int | None:
        try:
            replace_file(path, data, mode=MODE, group=self.group)
        except ConfigError as err:
            raise Refused(500, str(err)) from None
        self._seen[path] = signature(path)
        seg = self._segment()
        return None if seg is None else seg.bump_generation(which)

    def _write_users(self, users: Any) -> int | None:
        try:
            data = render_users(users)
        except ValueError as err:
            raise Refused(400, str(err)) from None
        return self._replace(self.files.users, data, shm.GEN_ACL)

    # -- tokens -----------------------------------------------------------------------------------

    def create_token(self, token_id: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_id(token_id, token=True)
        props = _token_props(body)
        secret = str(uuid.uuid4())
        hashed = crypt.hash_secret(secret)
        with self._locked(USER_LOCK):
            users = self._read(self.files.users, parse_users)
            if token_id in users:
                raise Refused(409, f"token '{token_id}' already exists.")
            user = user_of(token_id)
            if user not in users and user != ROOT_USER:
                users[user] = Section("user", {"enable": "true", "expire": "0"})
            with self._locked(SHADOW_LOCK):
                shadow = self._read(self.files.shadow, parse_shadow)
                shadow[token_id] = hashed
                self._replace(self.files.shadow, render_shadow(shadow), shm.GEN_TOKEN)
            users[token_id] = Section("token", {"enable": "true", "expire": "0", **props})
            self._write_users(users)
        log.info("token %s created", token_id)
        section = users[token_id]
        return {"tokenid": token_id, "value": secret, **_token_info(token_id, section)}

    def update_token(self, token_id: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_id(token_id, token=True)
        props = _token_props(body)
        with self._locked(USER_LOCK):
            users = self._read(self.files.users, parse_users)
            section = users.get(token_id)
            if section is None or section.kind != "token":
                raise Refused(404, f"no such token '{token_id}'")
            section.props.update(props)
            for key in body.get("delete") or []:
                if key == "comment":
                    section.props.pop("comment", None)
            self._write_users(users)
        log.info("token %s updated (%s)", token_id, ", ".join(sorted(props)) or "nothing")
        return _token_info(token_id, section)

    def remove_token(self, token_id: str) -> None:
        _check_id(token_id, token=True)
        with self._locked(USER_LOCK):
            users = self._read(self.files.users, parse_users)
            if users.get(token_id) is None:
                raise Refused(404, f"no such token '{token_id}'")
            del users[token_id]
            self._write_users(users)  # first: the token is inactive from here on
            with self._locked(ACL_LOCK):
                tree = self._read(self.files.acl, parse_acl)
                tree.remove_ugid(token_id)
                self._replace(self.files.acl, render_acl(tree), shm.GEN_ACL)
            with self._locked(SHADOW_LOCK):
                shadow = self._read(self.files.shadow, parse_shadow)
                shadow.pop(token_id, None)
                self._replace(self.files.shadow, render_shadow(shadow), shm.GEN_TOKEN)
        log.info("token %s removed", token_id)

    def list_tokens(self, user: str | None = None) -> list[dict[str, Any]]:
        if user is not None:
            _check_id(user, token=False)
        users = self._read(self.files.users, parse_users)
        return [_token_info(i, s) for i, s in users.tokens(user)]

    # -- ACLs -------------------------------------------------------------------------------------

    def list_acl(self) -> list[dict[str, object]]:
        return [e.as_api() for e in self._read(self.files.acl, parse_acl).entries()]

    def update_acl(self, body: dict[str, Any]) -> None:
        path, role, auth_id = body.get("path"), body.get("role"), body.get("auth-id")
        if not isinstance(path, str) or not isinstance(role, str) or not isinstance(auth_id, str):
            raise Refused(400, "parameter verification failed - 'path', 'role' and 'auth-id' are required")
        try:
            path = check_path(path)
            propagate = parse_bool(body.get("propagate", True), "propagate")
            delete = parse_bool(body.get("delete", False), "delete")
        except ValueError as err:
            raise Refused(400, str(err)) from None
        if role not in ROLES:
            raise Refused(400, f"parameter verification failed - 'role': unknown role '{role[:40]}'")
        _check_id(auth_id)
        with self._locked(USER_LOCK), self._locked(ACL_LOCK):
            users = self._read(self.files.users, parse_users)
            if auth_id not in users and auth_id != ROOT_USER:
                raise Refused(400, f"user or token '{auth_id}' does not exist.")
            tree = self._read(self.files.acl, parse_acl)
            if delete:
                tree.revoke(path, auth_id, role)
            else:
                tree.grant(path, auth_id, role, propagate)
            self._replace(self.files.acl, render_acl(tree), shm.GEN_ACL)
        log.info("acl %s %s %s on %s", "removed" if delete else "set", role, auth_id, path)

    # -- the watch --------------------------------------------------------------------------------

    def check_files(self) -> list[str]:
        """Bump the generation of each file that changed since it was last written or seen."""
        changed = []
        for path, which in (
            (self.files.shadow, shm.GEN_TOKEN),
            (self.files.users, shm.GEN_ACL),
            (self.files.acl, shm.GEN_ACL),
        ):
            sig = signature(path)
            if path in self._seen and self._seen[path] != sig:
                seg = self._segment()
                if seg is not None:
                    gen = seg.bump_generation(which)
                    log.info("%s changed on disk: generation %d bumped to %d", path.name, which, gen)
                changed.append(path.name)
            self._seen[path] = sig
        return changed


def _check_id(auth_id: str, token: bool | None = None) -> None:
    try:
        check_auth_id(auth_id, token=token)
    except ValueError as err:
        raise Refused(400, f"parameter verification failed - {err}") from None


def _token_props(body: dict[str, Any]) -> dict[str, str]:
    props: dict[str, str] = {}
    try:
        if "enable" in body:
            props["enable"] = "true" if parse_bool(body["enable"], "enable") else "false"
        if "expire" in body:
            expire = str(body["expire"])
            if not expire.isdigit() or len(expire) > 12:
                raise ValueError(f"parameter verification failed - 'expire': '{expire[:20]}' is not an epoch")
            props["expire"] = str(int(expire))
    except ValueError as err:
        raise Refused(400, str(err)) from None
    comment = body.get("comment")
    if comment is not None:
        comment = str(comment)
        if any(ord(c) < 32 or c == "\x7f" for c in comment) or len(comment) > 4096:
            raise Refused(400, "parameter verification failed - 'comment': control characters are not allowed")
        props["comment"] = comment
    return props


def _token_info(token_id: str, section: Section) -> dict[str, Any]:
    info: dict[str, Any] = {"tokenid": token_id, "enable": section.enabled, "expire": section.expire}
    if "comment" in section.props:
        info["comment"] = section.props["comment"]
    return info
