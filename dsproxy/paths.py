"""Where an instance keeps its files (DESIGN §3.3).

An instance is three directories: the config dir (``datastore.cfg``, ``.datastore.lck``), the run dir
(sockets, pid files, ``shm.lock``, the baseline counter files; the shared-memory name derives from
it) and the default parent of datastores created without an explicit path.

* ``base_dir`` lays them out as ``<base>/etc``, ``<base>/run``, ``<base>/datastores`` -- the
  embedded default for local runs and tests.
* Without any argument: ``$DSPROXY_BASE_DIR`` if set, else ``$XDG_STATE_HOME/dsproxy`` (default
  ``~/.local/state/dsproxy``).
* Under systemd the units pass ``--config-dir /etc/dsproxy --run-dir /run/dsproxy
  --data-dir /var/lib/dsproxy`` (see :data:`SYSTEM`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

CONFIG_NAME = "datastore.cfg"
LOCK_NAME = ".datastore.lck"


def default_base_dir() -> Path:
    env = os.environ.get("DSPROXY_BASE_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "dsproxy"


class Paths(NamedTuple):
    config_dir: Path
    run_dir: Path
    data_dir: Path

    @classmethod
    def from_base(cls, base_dir: str | os.PathLike[str]) -> Paths:
        base = Path(base_dir).absolute()
        return cls(base / "etc", base / "run", base / "datastores")

    @classmethod
    def resolve(
        cls,
        base_dir: str | os.PathLike[str] | None = None,
        config_dir: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> Paths:
        """``base_dir`` (or the default) filled in with any explicitly given directory."""
        base = cls.from_base(base_dir if base_dir is not None else default_base_dir())
        return cls(
            Path(config_dir).absolute() if config_dir is not None else base.config_dir,
            Path(run_dir).absolute() if run_dir is not None else base.run_dir,
            Path(data_dir).absolute() if data_dir is not None else base.data_dir,
        )

    @property
    def config_file(self) -> Path:
        return self.config_dir / CONFIG_NAME

    @property
    def lock_file(self) -> Path:
        return self.config_dir / LOCK_NAME

    def ensure(self) -> None:
        """Create the config and run directories if missing (0750)."""
        for d in (self.config_dir, self.run_dir):
            d.mkdir(mode=0o750, parents=True, exist_ok=True)


SYSTEM = Paths(Path("/etc/dsproxy"), Path("/run/dsproxy"), Path("/var/lib/dsproxy"))
