"""Files inside a store directory are untrusted (issue 8): the store owner writes them.

``.gc-status`` is read when an instance is built -- in every worker, at boot (prewarm) -- so a bad
one used to take the whole proxy down.  Now any problem with it is an inline error for that store
and the lookup goes on; a ``.lock`` that is not a regular file is an error for that store only;
running out of file descriptors is a DatastoreError, never a raw OSError.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dsproxy
from dsproxy.paths import Paths
from tests.daemons import Daemons
from tests.helpers import Instance

API = "/api2/json"


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail instead of hanging forever (a FIFO blocks a plain open())."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked for 5 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(5)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _write(content: str | bytes) -> Callable[[Path], None]:
    def plant(path: Path) -> None:
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)

    return plant


def _symlink_to_secret(path: Path) -> None:
    secret = path.parent.parent / "secret"
    secret.write_text('{"secret": true}')
    secret.chmod(0o600)
    path.symlink_to(secret)


GC_STATUS_ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "deep": (_write("[" * 200000), "nested too deeply"),
    "fifo": (lambda p: os.mkfifo(p), "not a regular file"),
    "directory": (lambda p: p.mkdir(), "not a regular file"),
    "symlink": (_symlink_to_secret, "symbolic link"),
    "huge": (_write(b" " * (2 << 20)), "larger than 1048576 bytes"),
    "array": (_write("[1, 2]"), "not a JSON object"),
    "nan": (_write('{"removed-bytes": NaN}'), "not valid JSON"),
    "surrogate": (_write('{"upid": "\\ud800"}'), "not valid JSON"),
    "digits": (_write('{"removed-bytes": ' + "9" * 5000 + "}"), "not valid JSON"),
}


@pytest.mark.parametrize("attack", sorted(GC_STATUS_ATTACKS))
def test_a_bad_gc_status_is_an_inline_error_and_the_lookup_works(inst: Instance, no_hang: None, attack: str) -> None:
    plant, reason = GC_STATUS_ATTACKS[attack]
    inst.add_stores("store1", "store2")
    plant(inst.store_dir("store1") / ".gc-status")
    (inst.store_dir("store2") / ".gc-status").write_text('{"upid": "UPID:x", "disk-bytes": 7}')
    with dsproxy.Registry(base_dir=inst.base) as reg:
        with reg.lookup("store1", dsproxy.Operation.READ) as handle:
            error = handle.instance.gc_status
            assert error is not None and set(error) == {"error"}
            assert error["error"].startswith("datastore 'store1': ignoring .gc-status: ") and reason in error["error"]
            assert "secret" not in error["error"]
        with reg.lookup("store2", dsproxy.Operation.WRITE) as handle:  # the other stores are not affected
            assert handle.instance.gc_status == {"upid": "UPID:x", "disk-bytes": 7}


LOCK_ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (lambda p: os.mkfifo(p), "not a regular file"),
    "directory": (lambda p: p.mkdir(), "Is a directory"),
    "symlink": (_symlink_to_secret, "symbolic link"),
}


@pytest.mark.parametrize("attack", sorted(LOCK_ATTACKS))
def test_a_lock_file_that_is_not_a_regular_file_is_an_error_for_that_store(
    inst: Instance, no_hang: None, attack: str
) -> None:
    plant, reason = LOCK_ATTACKS[attack]
    inst.add_stores("store1", "store2")
    lock = inst.store_dir("store1") / ".lock"
    lock.unlink()
    plant(lock)
    with dsproxy.Registry(base_dir=inst.base) as reg:
        with pytest.raises(dsproxy.InstanceError, match=f"chunk store 'store1' at .*{reason}"):
            reg.lookup("store1", dsproxy.Operation.READ)
        assert reg.active_operations("store1") == {"read": 0, "write": 0}  # the failed lookup was undone
        reg.lookup("store2", dsproxy.Operation.WRITE).release()


def test_a_proxy_boots_and_answers_with_bad_gc_status_files(daemon_factory: Callable[..., Daemons]) -> None:
    d = daemon_factory()
    d.start_manager()  # lays out the demo stores
    data = Paths.resolve(d.base).data_dir
    (data / "demo0001" / ".gc-status").write_text("[" * 200000)  # crashed every worker
    os.mkfifo(data / "demo0002" / ".gc-status")  # blocked every worker in open()
    d.start_proxy()  # returns once every worker has booted
    with d.client() as c:
        for store, reason in (("demo0001", "nested too deeply"), ("demo0002", "not a regular file")):
            r = c.get(f"{API}/admin/datastore/{store}/status?verbose=1")
            assert r.status == 200, r
            assert reason in r.data["gc-status"]["error"]
        assert c.get(f"{API}/admin/datastore/demo0003/status").status == 200
        assert c.get(f"{API}/status/datastore-usage").status == 200
    assert d.proxy is not None and d.proxy.poll() is None
    assert len(d.worker_pids()) == d.workers


EMFILE_PROGRAM = r"""
import json, os, resource, sys
import dsproxy
reg = dsproxy.Registry(base_dir=sys.argv[1], cache=sys.argv[2])
reg.lookup("store00", dsproxy.Operation.READ).release()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1, hard))
held, result = [], None
try:
    for i in range(1, 40):
        held.append(reg.lookup(f"store{i:02d}", dsproxy.Operation.WRITE))
except dsproxy.DatastoreError as err:
    result = {"type": type(err).__name__, "status": err.status, "message": str(err)}
except BaseException as err:
    result = {"type": "raw " + type(err).__name__, "status": None, "message": str(err)}
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
for h in held:
    h.release()
result["after"] = reg.active_operations("store01")
reg.lookup("store39", dsproxy.Operation.WRITE).release()  # works again once descriptors are back
print(json.dumps(result))
"""


@pytest.mark.parametrize("cache", ["on", "config", "off"])
def test_running_out_of_file_descriptors_is_a_datastore_error(inst: Instance, cache: str) -> None:
    inst.add_stores(*[f"store{i:02d}" for i in range(40)])
    out = subprocess.run(
        [sys.executable, "-c", EMFILE_PROGRAM, str(inst.base), cache],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert not result["type"].startswith("raw"), result
    assert "Too many open files" in result["message"], result
    assert result["after"] == {"read": 0, "write": 0}
    if cache == "on":  # the instance build (the other modes fail earlier, in their counter files)
        assert result["type"] == "OutOfDescriptors" and result["status"] == 503, result
        assert "cannot open its lock file: Too many open files" in result["message"] or (
            "cannot open its .gc-status: Too many open files" in result["message"]
        ), result
