"""The manager's config writes: create, update, remove, maintenance, and the manual-edit watch.

Everything here runs in the manager's single writer thread, so writes and watch checks never
interleave inside this process; against other processes the config lock (``.datastore.lck``)
serialises them.  Every write goes through :func:`dsproxy.config.update_config` (lock, digest
compare, temp file + fsync + rename + directory fsync) and bumps the shared generation from inside
the lock, *after* the rename: publish after write.

Decisions the spec leaves open (recorded here, enforced below):

* ``path`` is fixed at create (default ``<data_dir>/<name>``): moving a store is not an update.
* Create lays the store out (§3.2) *before* the config names it, and removes what it created if
  the config write then fails, so a listed store always has its ``.chunks`` and ``.lock``.
* Remove only drops the section; the data stays on disk (as with PBS without ``destroy-data``).
* Remove checks the active operations while holding the config lock.  Under ``cache=config|off``
  registrations take that lock too, so the check is exact; under ``cache=on`` a lookup that raced
  the check may still finish -- its instance then sees "no such datastore" on its next lookup.
* When ``datastore.cfg`` does not parse, every write is refused with the parse error (503): the
  admin's hand edit is never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    ConfigError,
    MaintenanceMode,
    ParseError,
    PropertyError,
    SectionConfig,
    Value,
    check_section,
    digest,
    parse,
    read_raw,
    request,
    update_config,
)
from ..ipc import shm
from ..ipc.opfile import FileCounters
from ..paths import Paths

log = logging.getLogger("dsproxy.manager")


class WriteRefused(Exception):
    """A write the manager will not do; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class WriteResult:
    generation: int | None
    digest: str
    name: str
    maintenance: MaintenanceMode | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _FileState:
    signature: tuple[int, int, int, int] | None = None  # (ino, size, mtime_ns, ctime_ns)
    digest: str | None = None
    generation: int | None = None
    error: str | None = None


def _stat_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _text_props(body: dict[str, Any], skip: tuple[str, ...]) -> dict[str, object]:
    """Request properties -> raw values for the schema (see :mod:`dsproxy.config.request`)."""
    try:
        return request.request_properties(body, skip)
    except PropertyError as err:
        raise WriteRefused(400, str(err)) from None


class ConfigWriter:
    """Config writes of one instance.  Not thread-safe: the manager calls it from one thread."""

    def __init__(
        self,
        paths: Paths,
        segment: Callable[[], shm.Segment | None],
        store_owner: tuple[int, int] | None = None,
    ) -> None:
        self.paths = paths
        self.config_file = paths.config_file
        self.lock_file = paths.lock_file
        self._segment = segment
        self.store_owner = store_owner
        self.files = FileCounters(paths.run_dir)
        self.state = _FileState()
        self.group = os.getegid()

    # -- publishing ---------------------------------------------------------------------------------

    def _bump(self) -> int | None:
        seg = self._segment()
        return None if seg is None else seg.bump_generation()

    def _write(
        self, mutate: Callable[[SectionConfig], object], expected_digest: str | None
    ) -> tuple[SectionConfig, str, int | None]:
        try:
            config, new_digest, gen = update_config(
                self.config_file,
                mutate,
                expected_digest=expected_digest,
                lock_path=self.lock_file,
                bump=self._bump,
            )
        except ParseError as err:
            self.state.error = str(err)
            raise WriteRefused(
                503, f"refusing to write: the configuration on disk does not parse (fix it first): {err}"
            ) from None
        except WriteRefused:
            raise
        except ConfigError as err:
            from ..config import DigestMismatch, LockError, WriteError

            if isinstance(err, DigestMismatch):
                raise WriteRefused(409, str(err)) from None
            if isinstance(err, LockError):
                raise WriteRefused(503, str(err)) from None
            if isinstance(err, WriteError):
                raise WriteRefused(500, str(err)) from None
            raise WriteRefused(400, str(err)) from None
        self.state = _FileState(_stat_signature(self.config_file), new_digest, gen, None)
        return config, new_digest, gen

    def active_operations(self, name: str) -> tuple[int, int]:
        read, write = self.files.totals(name)
        seg = self._segment()
        if seg is not None:
            r, w = seg.active_operations(name)
            read, write = read + r, write + w
        return read, write

    # -- create ---------------------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> WriteResult:
        name = body.get("name")
        if not isinstance(name, str):
            raise WriteRefused(
                400, "parameter verification failed - 'name': property is missing and it is not optional"
            )
        props = _text_props(body, ("name", "digest"))
        props.setdefault("path", str(self.paths.data_dir / name))
        try:
            request.check_create(props)
            typed = check_section(name, props)
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        path = str(typed["path"])
        if os.path.normpath(path) != path:
            raise WriteRefused(
                400, f"parameter verification failed - 'path': '{path}' is not a normalised absolute path"
            )
        created: list[Path] = []

        def mutate(cfg: SectionConfig) -> None:
            if name in cfg:
                raise WriteRefused(409, f"datastore '{name}' already exists.")
            for other, other_props in cfg.items():
                other_path = str(other_props.get("path", ""))
                if path == other_path or path.startswith(other_path.rstrip("/") + "/"):
                    raise WriteRefused(400, f"datastore path '{path}' is inside datastore '{other}' ('{other_path}')")
                if other_path.startswith(path.rstrip("/") + "/"):
                    raise WriteRefused(400, f"datastore path '{path}' contains datastore '{other}' ('{other_path}')")
            created.extend(self._lay_out(name, Path(path)))
            cfg[name] = typed

        try:
            _, new_digest, gen = self._write(mutate, body.get("digest"))
        except BaseException:
            _remove_created(created)
            raise
        log.info("created datastore '%s' at %s (generation %s)", name, path, gen)
        return WriteResult(gen, new_digest, name)

    def _lay_out(self, name: str, path: Path) -> list[Path]:
        """Create ``path`` (must be missing or an empty directory), ``.chunks`` and ``.lock``."""
        created: list[Path] = []
        try:
            if path.exists():
                if not path.is_dir():
                    raise WriteRefused(400, f"datastore path '{path}' exists and is not a directory")
                if any(path.iterdir()):
                    raise WriteRefused(400, f"datastore path '{path}' is not empty")
            else:
                missing = [p for p in (path, *path.parents) if not p.exists()]
                path.mkdir(mode=0o750, parents=True)
                created.append(missing[-1])
            for sub in (path / ".chunks",):
                sub.mkdir(mode=0o750)
                created.append(sub)
            lock = path / ".lock"
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o660)
            os.close(fd)
            created.append(lock)
            self._give_to_owner(path)
        except OSError as err:
            _remove_created(created)
            raise WriteRefused(500, f"unable to create datastore '{name}' at '{path}': {err.strerror}") from None
        return created

    def _give_to_owner(self, path: Path) -> None:
        """Hand a laid-out store to ``store_owner`` (the proxy's user opens ``.lock`` read-write)."""
        if self.store_owner is not None:
            for p in (path, path / ".chunks", path / ".lock"):
                os.chown(p, *self.store_owner)

    # -- update ---------------------------------------------------------------------------------------

    def update(self, name: str, body: dict[str, Any]) -> WriteResult:
        delete = body.get("delete") or []
        if isinstance(delete, str):
            delete = [k.strip() for k in delete.split(",") if k.strip()]
        if not isinstance(delete, list) or not all(isinstance(k, str) for k in delete):
            raise WriteRefused(400, "parameter verification failed - 'delete': expected a list of property names")
        props = _text_props(body, ("name", "digest", "delete"))
        try:
            request.check_update(props, delete)
        except PropertyError as err:
            raise WriteRefused(400, str(err)) from None
        outcome: dict[str, MaintenanceMode | None] = {}

        def mutate(cfg: SectionConfig) -> None:
            current = cfg.get(name)
            if current is None:
                raise WriteRefused(404, f"no such datastore '{name}'")
            merged: dict[str, object] = {k: v for k, v in current.items() if k not in delete}
            merged.update(props)
            try:
                typed = check_section(name, merged)
            except PropertyError as err:
                raise WriteRefused(400, str(err)) from None
            old = _maintenance(current)
            new = _maintenance(typed)
            if old is not None and not old.allows_transition_to(new):
                raise WriteRefused(400, f"datastore '{name}' is being deleted: its maintenance mode cannot change")
            outcome["old"], outcome["new"] = old, new
            cfg[name] = typed

        _, new_digest, gen = self._write(mutate, body.get("digest"))
        log.info("updated datastore '%s' (generation %s)", name, gen)
        return WriteResult(gen, new_digest, name, maintenance=outcome.get("new"))

    # -- remove ---------------------------------------------------------------------------------------

    def remove(self, name: str, expected_digest: str | None) -> WriteResult:
        def mutate(cfg: SectionConfig) -> None:
            if name not in cfg:
                raise WriteRefused(404, f"no such datastore '{name}'")
            read, write = self.active_operations(name)
            if read or write:
                raise WriteRefused(
                    409, f"datastore '{name}' has active operations (read {read}, write {write}); not removing it"
                )
            del cfg[name]

        _, new_digest, gen = self._write(mutate, expected_digest)
        log.info("removed datastore '%s' from the configuration (generation %s); its data stays", name, gen)
        return WriteResult(gen, new_digest, name)

    # -- demo stores ----------------------------------------------------------------------------------

    def ensure_demo_stores(self, count: int) -> int:
        """Make sure ``demo0001``... ``demoNNNN`` exist (one write); returns how many were added."""
        width = max(4, len(str(count)))
        wanted = [f"demo{i:0{width}d}" for i in range(1, count + 1)]
        added: list[str] = []

        def mutate(cfg: SectionConfig) -> None:
            for name in wanted:
                if name in cfg:
                    continue
                path = self.paths.data_dir / name
                path.mkdir(mode=0o750, parents=True, exist_ok=True)
                (path / ".chunks").mkdir(mode=0o750, exist_ok=True)
                (path / ".lock").touch(mode=0o660, exist_ok=True)
                self._give_to_owner(path)
                cfg[name] = {"path": str(path), "comment": "demo datastore"}
                added.append(name)

        if not all(_configured(self.config_file, wanted)):
            self._write(mutate, None)
        return len(added)

    # -- the manual-edit watch ------------------------------------------------------------------------

    def check_file(self) -> int | None:
        """Bump the generation if the file changed without a bump; return the new generation."""
        signature = _stat_signature(self.config_file)
        if signature == self.state.signature and self.state.digest is not None:
            return None
        data = read_raw(self.config_file)
        file_digest = digest(data)
        seg = self._segment()
        current_gen = None if seg is None else seg.generation()
        state = self.state
        try:
            parse(data, filename=str(self.config_file))
            error = None
        except ParseError as err:
            error = str(err)
            if error != state.error:
                log.error("datastore.cfg was edited and does not parse; serving the last good config: %s", err)
        if error is None and state.error is not None:
            log.info("datastore.cfg parses again")
        bumped = None
        if seg is not None and current_gen is not None:
            if state.digest is not None and file_digest != state.digest and current_gen == state.generation:
                # nobody published this change (a registry may have noticed it first: then
                # ``expected`` no longer matches and this is not a second bump)
                now = seg.bump_generation(expected=current_gen)
                if now != current_gen:
                    bumped = now
                    log.info("datastore.cfg changed on disk: generation bumped to %d", now)
            current_gen = seg.generation()
        self.state = _FileState(signature, file_digest, current_gen, error)
        return bumped


def _remove_created(paths: list[Path]) -> None:
    """Undo a store lay-out: remove what it created, newest first."""
    for made in reversed(paths):
        with contextlib.suppress(OSError):
            if made.is_dir():
                shutil.rmtree(made)
            else:
                made.unlink()


def _maintenance(props: dict[str, Value]) -> MaintenanceMode | None:
    raw = props.get("maintenance-mode")
    return None if raw is None else MaintenanceMode.parse(str(raw))


def _configured(path: Path, names: list[str]) -> list[bool]:
    try:
        cfg = parse(read_raw(path), filename=str(path))
    except ParseError:
        return [False]
    return [n in cfg for n in names]
