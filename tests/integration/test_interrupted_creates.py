"""Issue 8, deliverable 8: a manager killed during a create cleans up on its next start.

The lay-out of a create is made before the config names the store; a manager SIGKILLed in between
used to leave directories that blocked creating that name again.  Only what the manager itself
recorded in its create journal is removed, and only while it is empty.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from dsproxy.client import Client
from dsproxy.daemon.journal import JOURNAL_NAME, CreateJournal
from tests.daemons import Daemons

API = "/api2/json"


def _manager(d: Daemons) -> Client:
    return Client(str(d.run_dir / "manager.sock"), timeout=30.0)


def _restart(d: Daemons) -> None:
    proc = d.manager
    assert proc is not None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    d.start_manager()


def _half_made(store: Path, journal: CreateJournal, top: Path | None) -> None:
    """What a create killed between its lay-out and its config write leaves."""
    journal.begin(store.name, str(store), None if top is None else str(top))
    store.mkdir(parents=True, exist_ok=True)
    (store / ".chunks").mkdir()
    (store / ".lock").touch()


def test_the_next_start_removes_only_what_an_interrupted_create_recorded(daemon_factory) -> None:
    d: Daemons = daemon_factory(stores=1)
    d.start_manager()
    d.manager.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    d.manager.wait()  # type: ignore[union-attr]
    data = d.base / "datastores"
    journal = CreateJournal(d.base / "etc")
    _half_made(data / "half", journal, data / "half")  # made from nothing: goes
    _half_made(data / "deep" / "er" / "half2", journal, data / "deep")  # with the parents it made
    mount = data / "mount"
    mount.mkdir()  # an admin's empty mount point: the directory stays, the lay-out goes
    _half_made(mount, journal, None)
    _half_made(data / "used", journal, data / "used")
    (data / "used" / ".chunks" / "0000").mkdir()  # data arrived since: left alone
    stray = data / "stray"  # laid out, not configured, but not recorded by the manager: left alone
    (stray / ".chunks").mkdir(parents=True)
    (stray / ".lock").touch()
    assert (d.base / "etc" / JOURNAL_NAME).exists()

    _restart(d)
    assert not (data / "half").exists()
    assert not (data / "deep").exists()
    assert mount.is_dir() and os.listdir(mount) == []
    assert (data / "used" / ".chunks" / "0000").is_dir()
    assert (stray / ".lock").exists()
    assert not (d.base / "etc" / JOURNAL_NAME).exists()
    assert "left" in d.log_text() and "used" in d.log_text()
    with _manager(d) as c:
        for name, path in (("half", data / "half"), ("half2", data / "deep/er/half2"), ("mount", mount)):
            r = c.request("POST", f"{API}/config/datastore", {"name": name, "path": str(path)})
            assert r.status == 200, r.body
            assert (path / ".chunks").is_dir() and (path / ".lock").is_file()
        assert c.request("POST", f"{API}/config/datastore", {"name": "stray"}).status == 400
    assert not (d.base / "etc" / JOURNAL_NAME).exists()


def test_a_completed_create_whose_journal_entry_survived_is_kept(daemon_factory) -> None:
    d: Daemons = daemon_factory(stores=1)
    d.start_manager()
    with _manager(d) as c:
        assert c.request("POST", f"{API}/config/datastore", {"name": "done"}).status == 200
    d.manager.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    d.manager.wait()  # type: ignore[union-attr]
    store = d.base / "datastores" / "done"
    CreateJournal(d.base / "etc").begin("done", str(store), str(store))  # killed after the rename
    _restart(d)
    assert (store / ".chunks").is_dir() and (store / ".lock").is_file()
    assert not (d.base / "etc" / JOURNAL_NAME).exists()


def test_a_manager_killed_inside_a_create_leaves_nothing_that_blocks_the_name(daemon_factory) -> None:
    """A real SIGKILL between the lay-out and the config write (caught with SIGSTOP)."""
    d: Daemons = daemon_factory(stores=1)
    etc = d.base / "etc"
    etc.mkdir(parents=True)
    # a large config makes the window between lay-out and rename a few ms wide
    (etc / "datastore.cfg").write_text(
        "".join(f"datastore: big{i:04d}\n\tpath /nonexistent/big{i:04d}\n\n" for i in range(1500))
    )
    d.start_manager()
    data = d.base / "datastores"
    caught = None
    for i in range(20):
        name = f"c{i:02d}"
        proc = d.manager
        assert proc is not None

        def create(name: str = name) -> None:
            with contextlib.suppress(OSError), _manager(d) as c:
                c.request("POST", f"{API}/config/datastore", {"name": name})

        t = threading.Thread(target=create)
        t.start()
        lock = data / name / ".lock"
        deadline = time.monotonic() + 10
        while t.is_alive() and not lock.exists() and time.monotonic() < deadline:
            pass
        if lock.exists():
            os.kill(proc.pid, signal.SIGSTOP)
            if f"datastore: {name}\n" not in (etc / "datastore.cfg").read_text():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                caught = name
            else:
                os.kill(proc.pid, signal.SIGCONT)
        t.join(timeout=30)
        if caught:
            break
    assert caught is not None, "never stopped the manager between a lay-out and its config write"
    assert (data / caught / ".chunks").is_dir()  # what the old manager left behind
    d.start_manager()
    assert not (data / caught).exists()
    with _manager(d) as c:
        r = c.request("POST", f"{API}/config/datastore", {"name": caught})
    assert r.status == 200, r.body
