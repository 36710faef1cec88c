"""Where an instance keeps its files (docs/design.md §3.3).

An instance is three directories: the config dir (``datastore.cfg``, ``.datastore.lck``), the run dir
(sockets, pid files, ``shm.lock``, the baseline counter files; the shared-memory name derives from
it) and the default parent of datastores created without an explicit path.

* ``base_dir`` lays them out as ``<base>/etc``, ``<base>/run``, ``<base>/datastores`` -- the
  embedded default for local runs and tests.
* Without any argument: ``$DSPROXY_BASE_DIR`` if set, else ``$XDG_STATE_HOME/dsproxy`` (default
  ``~/.local/state/dsproxy``).
* Under systemd the units pass ``--config-dir /etc/dsproxy --run-dir /run/dsproxy
  --data-dir /var/lib/dsproxy`` (see the units in ``systemd/``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

# pathlib is imported only where a Paths is built: `import dsproxy` and a Registry do without it
# (~8 ms of interpreter start-up, which the whole-process rows of bench-lookup count).

CONFIG_NAME = "datastore.cfg"
LOCK_NAME = ".datastore.lck"


def default_base_dir() -> str:
    env = os.environ.get("DSPROXY_BASE_DIR")
    if env:
        return env
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "dsproxy")


def resolve_dirs(
    base_dir: str | os.PathLike[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, str, str]:
    """``(config_dir, run_dir, data_dir)`` as absolute strings: ``base_dir`` (or the default) laid
    out as etc/, run/, datastores/, with any explicitly given directory instead."""
    base = os.path.abspath(os.fspath(base_dir) if base_dir is not None else default_base_dir())

    def pick(explicit: str | os.PathLike[str] | None, default: str) -> str:
        return os.path.abspath(os.fspath(explicit)) if explicit is not None else default

    return (
        pick(config_dir, os.path.join(base, "etc")),
        pick(run_dir, os.path.join(base, "run")),
        pick(data_dir, os.path.join(base, "datastores")),
    )


class Paths(NamedTuple):
    config_dir: Path
    run_dir: Path
    data_dir: Path

    @classmethod
    def resolve(
        cls,
        base_dir: str | os.PathLike[str] | None = None,
        config_dir: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> Paths:
        """``base_dir`` (or the default) filled in with any explicitly given directory."""
        from pathlib import Path

        c, r, d = resolve_dirs(base_dir, config_dir, run_dir, data_dir)
        return cls(Path(c), Path(r), Path(d))

    @property
    def config_file(self) -> Path:
        return self.config_dir / CONFIG_NAME

    @property
    def lock_file(self) -> Path:
        return self.config_dir / LOCK_NAME

    def ensure(self) -> None:
        """Create the config and run directories if missing (0750, parents too) and check them.

        Raises :class:`~dsproxy.fsutil.UnsafePath` (an ``OSError``) for one that is not a directory
        or is reached through a final symbolic link owned by anyone but root and this process's user,
        and for a config dir owned by another user or writable by every user (who could swap
        ``datastore.cfg``, or add the overlay or the parse beside it).  The run dir
        is shared on purpose (group ``dsproxy`` writes it; under systemd the proxy's unit may own
        it), so its owner is not checked: everything in it is opened without following links.
        """
        _ensure_dir(os.fspath(self.config_dir), check_owner=True)
        _ensure_dir(os.fspath(self.run_dir), check_owner=False)


def _ensure_dir(path: str, check_owner: bool) -> None:
    import contextlib
    import stat

    from .fsutil import UnsafePath

    trusted = {0, os.geteuid()}
    missing = []
    head = path
    while head and not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o750)
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
        raise UnsafePath(path, f"is a symbolic link owned by uid {link.st_uid} (refused)")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(path, "is not a directory")
    if check_owner and st.st_uid not in trusted:
        raise UnsafePath(path, f"is owned by uid {st.st_uid}, who could replace the files in it (refused)")
    if check_owner and st.st_mode & stat.S_IWOTH:  # (a sticky bit still lets anyone add a file)
        raise UnsafePath(
            path,
            f"is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}), "
            "who could replace or add the files in it (refused)",
        )
