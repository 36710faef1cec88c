"""Token verification and permission lookups of one worker, cached like the datastore config.

A request over TCP carries ``Authorization: PBSAPIToken=ID:SECRET`` (a space instead of ``=`` is
accepted too, as PBS does).  :meth:`AuthCache.authenticate` returns the token id or raises
:class:`~dsproxy.auth.errors.AuthenticationFailed`; :meth:`AuthCache.privileges` gives the
token's privilege bits on an ACL path.

Two things are cached per process, each keyed by a shared-memory generation that the manager
bumps after every write (publish after write) and after a hand edit its watch notices:

* **verified secrets** (token id -> the secret that matched its hash), under ``GEN_TOKEN``:
  a warm request is one generation compare, a dict lookup and ``hmac.compare_digest`` instead of a
  ~2 ms ``$5$`` hash (:mod:`dsproxy.auth.crypt`).  A secret is cached only if ``GEN_TOKEN`` did
  not move while it was being hashed (the #7017 rule: a revoke during the hash must not be undone
  by the cache);
* **the parsed ``user.cfg`` + ``acl.cfg``** (enable/expire of tokens and users, the ACL tree and a
  memo of resolved privileges), under ``GEN_ACL``.

A moved generation drops that part.  As a fallback for hand edits without a manager, each part
also re-stats its files (inode, size, mtime) once its TTL (the registry's ``--ttl``) has passed,
and drops itself if they changed; the manager's watch normally bumps within its 0.5 s interval,
so a hand edit or a revoke is refused by every worker within ~1 s (PBS: up to 60 s).

Modes follow the registry's: ``on`` as above; ``config`` caches the files' contents under the
generations but hashes the secret on every request; ``off`` reads and parses all three files and
hashes on every request -- the baselines.  Without shared memory (degraded) every request takes
the ``off`` path: slow, never stale.  ``DSPROXY_DEBUG_DISCARD_CACHES`` forces it too.

Measured in process (``authenticate`` + ``privileges`` of one request, a real segment, median of
3 runs; the project machine): ``on`` 2.1 us, ``config`` 2.25 ms, ``off`` 2.2 ms -- the hash
dominates both baselines (reading and parsing the three small files adds ~0.05 ms), so on/off is
~1000x on this part of a request.

The cache never stores or reports a hash, and no message here contains a secret or a hash.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Final

from ..ipc import shm
from . import crypt
from .errors import AuthConfigError, AuthenticationFailed
from .files import AccessConfig, AccessFiles, Signature, signature
from .users import check_auth_id

SCHEME: Final = "PBSAPIToken"
MAX_HEADER: Final = 512
_NO_DATA: Final = "authentication failed - no authentication credentials provided."
_BAD_TOKEN: Final = "authentication failed - invalid API token"
_INACTIVE: Final = "authentication failed - user account or token disabled or expired."


def parse_authorization(value: str | None, known: Container[str] | None = None) -> tuple[str, str]:
    """``PBSAPIToken=ID:SECRET`` (or ``PBSAPIToken ID:SECRET``) -> ``(ID, SECRET)``."""
    if not value:
        raise AuthenticationFailed(_NO_DATA)
    if len(value) > MAX_HEADER or not value.startswith(SCHEME) or value[len(SCHEME) : len(SCHEME) + 1] not in "= ":
        raise AuthenticationFailed("authentication failed - unsupported authorization header (use PBSAPIToken)")
    token_id, colon, secret = value[len(SCHEME) + 1 :].strip().rpartition(":")
    if not colon or not secret:
        raise AuthenticationFailed(_BAD_TOKEN)
    if known is None or token_id not in known:
        try:
            check_auth_id(token_id, token=True)
        except ValueError:
            raise AuthenticationFailed(_BAD_TOKEN) from None
    return token_id, secret


class AuthCache:
    """Per-process verifier; not thread-safe (a worker is one event loop)."""

    def __init__(
        self,
        config_dir: str | Path,
        segment: Callable[[], shm.Segment | None],
        mode: str = "on",
        ttl: float = 60.0,
        discard: bool = False,
    ) -> None:
        self.files = AccessFiles(Path(config_dir))
        self._segment = segment
        self.mode = "off" if discard else mode
        self.ttl = ttl
        # GEN_TOKEN part
        self._token_gen: int | None = None
        self._secrets: dict[str, str] = {}
        self._shadow: dict[str, str] | None = None  # the file's entries (mode "config")
        self._shadow_sig: Signature = None
        self._shadow_deadline = 0.0
        # GEN_ACL part
        self._acl_gen: int | None = None
        self._access: AccessConfig | None = None
        self._access_sig: tuple[Signature, Signature] = (None, None)
        self._access_deadline = 0.0
        # figures (status, metrics)
        self.hashes = 0
        self.hits = 0

    # -- the two parts ----------------------------------------------------------------------------

    def _seg(self) -> shm.Segment | None:
        return None if self.mode == "off" else self._segment()

    def access(self) -> AccessConfig:
        """The parsed ``user.cfg`` + ``acl.cfg`` valid now (cached under ``GEN_ACL``)."""
        seg = self._seg()
        if seg is None:
            return self.files.read_access()
        gen = seg.generation(shm.GEN_ACL)
        now = time.monotonic()
        if gen != self._acl_gen or self._access is None or now >= self._access_deadline:
            sig = self.files.access_signature()
            if gen != self._acl_gen or self._access is None or sig != self._access_sig:
                self._access = None  # a file that does not parse fails closed, no stale grants
                self._access = self.files.read_access()
                self._acl_gen, self._access_sig = gen, sig
            self._access_deadline = now + self.ttl
        return self._access

    def _token_part(self, seg: shm.Segment) -> int:
        """Drop verified secrets if ``GEN_TOKEN`` moved or the file changed; return the generation."""
        gen = seg.generation(shm.GEN_TOKEN)
        now = time.monotonic()
        if gen != self._token_gen:
            self._secrets.clear()
            self._shadow = None
            self._token_gen = gen
            self._shadow_sig = signature(self.files.shadow)
            self._shadow_deadline = now + self.ttl
        elif now >= self._shadow_deadline:
            sig = signature(self.files.shadow)
            if sig != self._shadow_sig:
                self._secrets.clear()
                self._shadow = None
                self._shadow_sig = sig
            self._shadow_deadline = now + self.ttl
        return gen

    # -- authentication ---------------------------------------------------------------------------

    def authenticate(self, header: str | None) -> str:
        """The token id of a valid, active token; :class:`AuthenticationFailed` otherwise."""
        token_id, secret = parse_authorization(header, self._secrets)  # a cached id was checked
        access = self.access()
        if not access.active(token_id, time.time()):
            raise AuthenticationFailed(_INACTIVE)
        seg = self._seg()
        if seg is None:
            self._verify(self.files.read_shadow(), token_id, secret)
            return token_id
        gen = self._token_part(seg)
        cached = self._secrets.get(token_id)
        if cached is not None and hmac.compare_digest(cached.encode(), secret.encode()):
            self.hits += 1
            return token_id
        shadow = self._shadow if self._shadow is not None else self.files.read_shadow()
        self._verify(shadow, token_id, secret)
        if seg.generation(shm.GEN_TOKEN) == gen == self._token_gen:  # nothing changed while hashing
            if self.mode == "on":
                self._secrets[token_id] = secret
            self._shadow = shadow
        return token_id

    def _verify(self, shadow: dict[str, str], token_id: str, secret: str) -> None:
        hashed = shadow.get(token_id)
        self.hashes += 1
        if hashed is None:
            crypt.verify(secret, _DUMMY_HASH)  # the same time for an unknown id as for a bad secret
            raise AuthenticationFailed(_BAD_TOKEN)
        if not crypt.verify(secret, hashed):
            raise AuthenticationFailed(_BAD_TOKEN)

    def privileges(self, auth_id: str, parts: tuple[str, ...]) -> int:
        return self.access().privileges(auth_id, parts)


_DUMMY_HASH: Final = crypt.hash_secret("not a token secret")

__all__ = ["AuthCache", "AuthConfigError", "AuthenticationFailed", "parse_authorization"]
