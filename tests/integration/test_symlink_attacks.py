"""Issue 8, deliverable 3: root follows no link that group ``dsproxy`` or the store owner plants.

Each test runs the attack as uid 65534 (a member of the run dir's group and the store owner, see
:mod:`tests.attack`) against a manager running as root, and checks that the targets outside every
store are unchanged and that the request got a clear answer.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dsproxy.daemon.writer import ConfigWriter, WriteRefused
from dsproxy.paths import Paths
from tests.attack import NOBODY, SystemdLike, as_nobody, needs_root, snapshot, spawn_as_nobody

API = "/api2/json"
pytestmark = needs_root


@pytest.fixture
def sysd() -> Iterator[SystemdLike]:
    s = SystemdLike()
    try:
        yield s
    finally:
        s.close()


def _restart_manager(sysd: SystemdLike) -> None:
    proc = sysd.daemons.manager
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    sysd.start_manager()


def test_a_link_at_the_pid_files_names_is_replaced_not_written_through(sysd: SystemdLike) -> None:
    sysd.start_manager()
    run = sysd.run_dir
    as_nobody(
        f"import os\n"
        f"for name in ('manager.pid.tmp', 'manager.pid'):\n"
        f"    p = os.path.join({str(run)!r}, name)\n"
        f"    if os.path.lexists(p): os.unlink(p)\n"
        f"    os.symlink({str(sysd.secret)!r}, p)\n"
    )
    _restart_manager(sysd)
    sysd.assert_targets_untouched()
    pid_file = run / "manager.pid"
    assert not pid_file.is_symlink()
    assert pid_file.read_text() == f"{sysd.daemons.manager.pid}\n"  # type: ignore[union-attr]


def test_a_dangling_link_at_shm_lock_does_not_make_root_create_its_target(sysd: SystemdLike) -> None:
    sysd.start_manager()
    target = sysd.base / "created-by-root"
    lock = sysd.run_dir / "shm.lock"
    as_nobody(f"import os\nos.unlink({str(lock)!r})\nos.symlink({str(target)!r}, {str(lock)!r})\n")
    with sysd.manager() as c:
        r = c.request("PUT", f"{API}/config/datastore/demo0001", {"comment": "after the link"})
    assert r.status == 200, r.body
    assert not os.path.lexists(target), "root created the target of the planted link"
    assert lock.is_file() and not lock.is_symlink()
    assert "symbolic link" in sysd.daemons.log_text()
    sysd.assert_targets_untouched()


def test_a_store_name_linked_to_a_root_directory_is_refused(sysd: SystemdLike) -> None:
    sysd.start_manager()
    as_nobody(
        f"import os\n"
        f"os.symlink({str(sysd.rootdir)!r}, {str(sysd.data_dir / 'victim')!r})\n"
        f"os.symlink({str(sysd.rootdir)!r}, {str(sysd.data_dir / 'sub')!r})\n"
    )
    with sysd.manager() as c:
        direct = c.request("POST", f"{API}/config/datastore", {"name": "victim"})
        below = c.request(
            "POST", f"{API}/config/datastore", {"name": "inner", "path": str(sysd.data_dir / "sub/inner")}
        )
        listing = c.request("GET", f"{API}/ping")
    assert direct.status == 400, direct.body
    assert f"'{sysd.data_dir / 'victim'}' is a symbolic link" in direct.json()["message"]
    assert below.status == 400, below.body
    assert f"'{sysd.data_dir / 'sub'}' is a symbolic link" in below.json()["message"]
    assert listing.status == 200
    config = sysd.daemons.config_file.read_text()
    assert "victim" not in config and "inner" not in config
    sysd.assert_targets_untouched()


def test_a_double_slash_path_cannot_nest_a_store_inside_another(sysd: SystemdLike) -> None:
    sysd.start_manager()
    nested = "/" + str(sysd.data_dir / "demo0001" / "sub")  # '//tmp/.../datastores/demo0001/sub'
    with sysd.manager() as c:
        r = c.request("POST", f"{API}/config/datastore", {"name": "inner", "path": nested})
        ok = c.request("POST", f"{API}/config/datastore", {"name": "beside", "path": str(sysd.data_dir / "beside")})
    assert r.status == 400, r.body
    assert f"'{nested}'" in r.json()["message"]
    assert not (sysd.data_dir / "demo0001" / "sub").exists()
    assert ok.status == 200, ok.body
    assert "inner" not in sysd.daemons.config_file.read_text()


# -- the .lock swap during a create ----------------------------------------------------------------

SWAP = """
import os, sys
store, target = sys.argv[1], sys.argv[2]
lock = os.path.join(store, ".lock")
try:
    if os.path.lexists(lock) and not os.path.islink(lock):  # root made it: swap it for a link
        os.unlink(lock)
        os.symlink(target, lock)
except OSError:
    pass  # the store is not (yet) writable by nobody: nothing to win at this step
"""


@pytest.mark.parametrize("store_exists", [False, True], ids=["new-dir", "nobodys-empty-dir"])
def test_the_lock_swapped_for_a_link_at_any_step_of_a_create_chowns_nothing_outside(
    sysd: SystemdLike, monkeypatch: pytest.MonkeyPatch, store_exists: bool
) -> None:
    """Deterministic race: after *every* file system call root makes, the attacker swaps the
    ``.lock`` root created for a link -- whatever order the code uses, it has won the race if root
    then follows that name."""
    paths = Paths.resolve(config_dir=sysd.base / "etc", run_dir=sysd.run_dir, data_dir=sysd.data_dir)
    paths.ensure()
    writer = ConfigWriter(paths, lambda: None, store_owner=(NOBODY, NOBODY))
    store = sysd.data_dir / "race"
    if store_exists:
        as_nobody(f"import os\nos.mkdir({str(store)!r})")
    script = SWAP.replace("sys.argv[1], sys.argv[2]", f"{str(store)!r}, {str(sysd.secret)!r}")

    busy: list[int] = []  # the attack itself opens and closes files: no attack inside an attack

    def attacking(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if not busy:
                busy.append(1)
                try:
                    as_nobody(script, check=False)
                finally:
                    busy.clear()
            return result

        return call

    for name in ("open", "close", "mkdir", "chown", "fchown", "chmod", "fchmod"):
        monkeypatch.setattr(os, name, attacking(getattr(os, name)))
    try:
        writer.create({"name": "race"})
        outcome = "created"
    except WriteRefused as err:
        outcome = f"{err.status} {err.message}"
    finally:
        monkeypatch.undo()
    sysd.assert_targets_untouched()
    assert outcome == "created" or outcome.startswith("400"), outcome


SPIN = """
import os, stat, sys, time
store, target = sys.argv[1], sys.argv[2]
os.mkdir(store)
lock = os.path.join(store, ".lock")
link = store + ".link"  # beside the store: the store itself must look empty
os.symlink(target, link)
print("ready", flush=True)
end = time.monotonic() + 3
while time.monotonic() < end:
    try:
        if stat.S_ISREG(os.lstat(lock).st_mode):  # root's new .lock: swap it for a link, atomically
            os.rename(link, lock)
            print("swapped", flush=True)
            break
    except OSError:
        pass
"""


def test_a_racing_lock_swapper_never_gets_a_root_file_chowned(sysd: SystemdLike) -> None:
    """The real race, bounded: nobody spins on a store it owns, swapping the ``.lock`` root creates."""
    sysd.start_manager()
    swaps = 0
    with sysd.manager() as c:
        for i in range(10):
            store = sysd.data_dir / f"race{i}"
            script = SPIN.replace("sys.argv[1], sys.argv[2]", f"{str(store)!r}, {str(sysd.secret)!r}")
            spinner = spawn_as_nobody(script)
            try:
                assert spinner.stdout is not None and spinner.stdout.readline() == "ready\n"
                r = c.request("POST", f"{API}/config/datastore", {"name": f"race{i}"})
                out, _ = spinner.communicate(timeout=10)
            finally:
                spinner.kill()
                spinner.wait()
            swaps += "swapped" in out
            assert r.status in (200, 400), r.body
            sysd.assert_targets_untouched()
    print(f"the swapper won the race {swaps} of 10 times; nothing outside the stores changed")


def test_no_planted_file_in_the_run_dir_is_written_or_blocks_root(sysd: SystemdLike) -> None:
    """A FIFO or a link where the counter files, the pid file or a lock go: nothing blocks."""
    sysd.start_manager()
    ops = sysd.run_dir / "active-operations"
    as_nobody(
        "import os\n"
        f"os.mkdir({str(ops)!r})\n"
        f"os.mkfifo({str(ops / 'demo0001')!r})\n"
        f"os.symlink({str(sysd.secret)!r}, {str(ops / 'demo0002')!r})\n"
    )
    started = time.monotonic()
    with sysd.manager() as c:
        # remove reads the counter files of the store as root (active operations)
        r1 = c.request("DELETE", f"{API}/config/datastore/demo0001")
        r2 = c.request("DELETE", f"{API}/config/datastore/demo0002")
    assert time.monotonic() - started < 10
    assert r1.status == 200 and r2.status == 200, (r1.body, r2.body)
    assert json.loads(r1.body)["data"]["name"] == "demo0001"
    assert snapshot(sysd.secret) == sysd.targets[sysd.secret]
    sysd.assert_targets_untouched()
