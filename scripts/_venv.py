"""The first step of every Python script in ``scripts/``: make ``import dsproxy`` work.

A script started by a Python that does not have dsproxy (``python3 scripts/stress``, or
``scripts/stress`` through its ``#!/usr/bin/env python3``) re-executes itself with the project's
venv -- ``.venv``, or ``$DSPROXY_VENV``, as ``scripts/install-deps`` makes it; without one it exits
with a hint.  Each script starts::

    import _venv

    _venv.require_dsproxy()

    from dsproxy.testing import ...  # noqa: E402
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def require_dsproxy() -> None:
    """Return if dsproxy imports; else re-exec the running script in the venv, or exit saying why."""
    try:
        import dsproxy  # noqa: F401
    except ImportError:
        venv = ROOT / os.environ.get("DSPROXY_VENV", ".venv")
        python = venv / "bin" / "python"
        script = os.path.abspath(sys.argv[0])
        if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(str(python), [str(python), script, *sys.argv[1:]])
        sys.exit(f"{os.path.basename(script)}: dsproxy is not installed; run scripts/install-deps first")
