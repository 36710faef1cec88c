"""Where the three access files live and how they are read (the config dir, PBS's names).

==================  ======================  =========================================
file                lock (manager writes)   shared generation bumped after a write
==================  ======================  =========================================
``token.shadow``    ``token.shadow.lock``   :data:`~dsproxy.ipc.shm.GEN_TOKEN`
``user.cfg``        ``.user.lck``           :data:`~dsproxy.ipc.shm.GEN_ACL`
``acl.cfg``         ``.acl.lck``            :data:`~dsproxy.ipc.shm.GEN_ACL`
==================  ======================  =========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..config.file import read_raw
from .acl import ALL, ROLES, ROOT_USER, AclTree, parse_acl
from .errors import AuthConfigError
from .shadow import parse_shadow
from .users import UserConfig, parse_users, user_of

SHADOW_NAME: Final = "token.shadow"
SHADOW_LOCK: Final = "token.shadow.lock"
USER_NAME: Final = "user.cfg"
USER_LOCK: Final = ".user.lck"
ACL_NAME: Final = "acl.cfg"
ACL_LOCK: Final = ".acl.lck"

Signature = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: missing


def signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_file(path: Path) -> bytes:
    try:
        return read_raw(path)
    except OSError as err:
        raise AuthConfigError(f"cannot read '{path}': {err.strerror}") from None


@dataclass
class AccessConfig:
    """``user.cfg`` and ``acl.cfg`` parsed, with a memo of resolved privileges."""

    users: UserConfig
    acl: AclTree
    _memo: dict[tuple[str, tuple[str, ...]], int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def active(self, auth_id: str, now: float) -> bool:
        """Whether ``auth_id`` is enabled and unexpired at ``now`` (memoised as an expiry time)."""
        until = self._until.get(auth_id)
        if until is None:
            until = self._until[auth_id] = self._active_until(auth_id)
        return now < until

    def _active_until(self, auth_id: str) -> float:
        ends = [self.users.get(i) for i in {auth_id, user_of(auth_id)}]
        if not self.users.active(auth_id, 0):
            return 0.0
        return min((float(s.expire) for s in ends if s is not None and s.expire), default=float("inf"))

    def privileges(self, auth_id: str, parts: tuple[str, ...]) -> int:
        key = (auth_id, parts)
        bits = self._memo.get(key)
        if bits is None:
            bits = self._memo[key] = self._resolve(auth_id, parts)
        return bits

    def _resolve(self, auth_id: str, parts: tuple[str, ...]) -> int:
        if auth_id == ROOT_USER:
            return ALL

        bits = 0
        for role in self.acl.roles(auth_id, parts):
            bits |= ROLES[role]
        if "!" in auth_id:
            bits &= self.privileges(user_of(auth_id), parts)
        return bits


@dataclass(frozen=True)
class AccessFiles:
    config_dir: Path

    @property
    def shadow(self) -> Path:
        return self.config_dir / SHADOW_NAME

    @property
    def users(self) -> Path:
        return self.config_dir / USER_NAME

    @property
    def acl(self) -> Path:
        return self.config_dir / ACL_NAME

    def lock(self, name: str) -> Path:
        return self.config_dir / name

    def read_shadow(self) -> dict[str, str]:
        return parse_shadow(read_file(self.shadow), str(self.shadow))

    def read_access(self) -> AccessConfig:
        users = parse_users(read_file(self.users), str(self.users))
        return AccessConfig(users, parse_acl(read_file(self.acl), str(self.acl)))

    def access_signature(self) -> tuple[Signature, Signature]:
        return signature(self.users), signature(self.acl)
