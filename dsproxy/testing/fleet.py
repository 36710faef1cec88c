"""Several dsproxy hosts of one fleet on this machine, for the fleet tests, benchmarks and stress run.

A :class:`FleetHost` is a :class:`~dsproxy.testing.daemons.Daemons` (manager + proxy on its own base
dir, its own shared memory) whose manager runs in fleet mode against the given etcd endpoints and
key prefix, with host id ``hostN``; :class:`Fleet` starts ``size`` of them (managers first, then the
proxies) and stops all of them on leaving the ``with`` block, also when it raised.  The hosts share
this machine's file system, so a store's path laid out by one host exists for the others too.

    with EtcdCluster(3, tmp / "etcd").start() as cluster, Fleet(tmp, cluster.endpoints, "/t/x").start() as fleet:
        a, b, c = fleet.hosts
        a.request("POST", "/api2/json/config/datastore", {"name": "store1"})
        b.served_revision()   # the revision b's workers serve (x-dsproxy-revision)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..client import Response
from ..daemon.protocol import REVISION_HEADER
from ..daemon.run import API
from .daemons import Daemons, wait_for


class FleetHost(Daemons):
    """One host of a fleet (see the module); ``manager_args`` are added to its manager's."""

    def __init__(
        self,
        base: Path,
        endpoints: Sequence[str],
        prefix: str,
        host_id: str,
        *,
        workers: int = 2,
        manager_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(base, workers=workers, stores=0, **kwargs)
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.host_id = host_id
        self.manager_args = list(manager_args)

    def fleet_args(self, endpoints: Sequence[str] | None = None) -> list[str]:
        etcd = ",".join(self.endpoints if endpoints is None else endpoints)
        return ["--etcd", etcd, "--etcd-prefix", self.prefix, "--host-id", self.host_id, *self.manager_args]

    def start_manager(self, *extra: str) -> None:
        super().start_manager(*self.fleet_args(), *extra)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Response:
        """One request to this host's proxy (``path`` under ``/api2/json``)."""
        with self.client() as c:
            return c.request(method, API + path, body)

    def served_revision(self) -> int | None:
        """The ``x-dsproxy-revision`` of one worker's answer (None: the header is missing)."""
        header = self.get(f"{API}/ping").headers.get(REVISION_HEADER)
        return None if header is None else int(header)

    def worker_revisions(self) -> dict[int, int | None]:
        """Each worker's ``x-dsproxy-revision``, by pid."""
        out = {}
        with self.worker_clients() as clients:
            for pid, c in clients.items():
                header = c.get(f"{API}/ping").headers.get(REVISION_HEADER)
                out[pid] = None if header is None else int(header)
        return out

    def datastores(self) -> dict[str, dict[str, Any]]:
        """The datastore config one worker serves, by name."""
        data = self.get(f"{API}/config/datastore").raise_for_status().data
        return {entry["name"]: entry for entry in data}

    def fleet_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.node()["fleet"]
        return status

    @contextlib.contextmanager
    def manager_frozen(self) -> Iterator[None]:
        """This host's manager stopped (SIGSTOP) while the block runs, continued after, even on failure."""
        assert self.manager is not None
        os.kill(self.manager.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.manager.pid, signal.SIGCONT)

    def wait_revision(self, revision: int, timeout: float = 10.0) -> None:
        """Until every worker of this host serves ``revision`` or later."""

        def served() -> bool:
            return all((r or 0) >= revision for r in self.worker_revisions().values())

        wait_for(served, timeout, what=f"host {self.host_id} serving etcd revision {revision}")


class Fleet:
    """``size`` fleet hosts under ``base`` (``base/hostN``); a context manager that stops them all.

    ``host_args`` go to every :class:`FleetHost`; ``per_host[i]`` (``endpoints`` too) to host ``i``.
    """

    def __init__(
        self,
        base: Path,
        endpoints: Sequence[str],
        prefix: str,
        size: int = 3,
        per_host: Sequence[dict[str, Any]] = (),
        **host_args: Any,
    ) -> None:
        self.hosts = []
        for i in range(size):
            own = per_host[i] if i < len(per_host) else {}
            args = {"host_id": f"host{i}", "endpoints": endpoints, **host_args, **own}
            self.hosts.append(FleetHost(base / f"host{i}", prefix=prefix, **args))

    def start(self) -> Fleet:
        try:
            for host in self.hosts:
                host.start_manager()
            for host in self.hosts:
                host.start_proxy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return "\n".join(f"=== {h.host_id}\n{h.log_text()}" for h in self.hosts)
