"""The fd limit, honestly: raised, compared with the store count, logged and shown (docs/design.md §7)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.daemons import Daemons

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")


def test_a_limit_below_the_store_count_is_raised_logged_and_shown(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory(stores=50)
    d.start_manager()
    # what a container does to LimitNOFILE=1048576: the process gets the host's (here: tiny) hard limit
    d.start_proxy(args=["prlimit", "--nofile=100:280", "--", *d.command("proxy", "--workers", "2")])
    fds = d.node()["rlimit-nofile"]
    assert (fds["soft"], fds["hard"]) == (280, 280)  # the soft limit went up to the hard one
    assert fds["stores"] == 50 and fds["needed"] == 50 + fds["reserve"] and fds["enough"] is False
    assert fds["budget"] == 280 - fds["reserve"]
    log = d.log_text()
    assert "RLIMIT_NOFILE 280/280" in log and f"below the {fds['needed']} needed for 50 datastores" in log
    status = subprocess.run(
        [sys.executable, "-m", "dsproxy", "--base-dir", str(d.base), "status"], capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert f"FD LIMIT: {fds['needed']} fds needed for 50 datastores, the limit is 280" in status.stdout


def test_enough_fds_say_so_without_a_warning(daemons: Daemons) -> None:
    fds = daemons.node()["rlimit-nofile"]
    assert fds["stores"] == daemons.stores and fds["enough"] is True and fds["soft"] == fds["hard"]
    assert "is below the" not in daemons.log_text()
