"""Real manager + proxy processes on a base dir, for tests, benchmarks and the stress run.

:class:`Daemons` is :class:`dsproxy.daemon.run.DaemonPair` (the pair ``dsproxy run`` starts) laid
out on ``<base>/etc``, ``run``, ``datastores``, with its logs in ``<base>/logs`` and the usual
options as attributes: ``start()`` starts the manager (making ``stores`` demo datastores) and the
proxy (``workers`` workers, ``cache``, ``ttl``) and returns once every worker has booted;
``env`` is added to both daemons' environment (``scripts/bench-scale``'s ``DSPROXY_INVALIDATION``);
``stop()`` (or leaving the ``with`` block) stops both, kills what is left and unlinks the shared
memory -- also when the test failed.  ``worker_clients()`` holds a keep-alive connection to each
worker, to ask every worker for its own view.

    with Daemons(tmp / "base", workers=2, stores=5).start() as d:
        assert d.get("/api2/json/admin/datastore").status == 200
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from ..client import Client, Response
from ..daemon.protocol import WORKER_HEADER
from ..daemon.run import API, DaemonPair
from ..paths import Paths

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true, and return that; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) while the block runs, continued after it, even on failure."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now on ``host`` (for ``proxy --listen``; the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Daemons(DaemonPair):
    """A manager + proxy on ``base`` (see the module); ``stores=0`` makes no demo datastores."""

    def __init__(
        self,
        base: Path,
        workers: int = 2,
        stores: int = 5,
        cache: str = "on",
        ttl: float = 60.0,
        *,
        ready_timeout: float = 30.0,
        logs: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = base
        self.logs = logs or base / "logs"
        super().__init__(Paths.resolve(base), log_dir=self.logs, ready_timeout=ready_timeout)
        self.config_file = self.paths.config_file
        self.workers = workers
        self.stores = stores
        self.cache = cache
        self.ttl = ttl
        self.env = dict(env or {})

    def start_manager(self, *extra: str) -> None:
        demo = ("--demo-stores", str(self.stores)) if self.stores else ()
        if not self.env:
            super().start_manager(*demo, *extra)
            return
        self.manager = self._spawn("manager", self.command("manager", *demo, *extra), self.env)
        self._wait_socket("manager", self.manager_sock, self.manager)

    def start_proxy(  # type: ignore[override]
        self, *extra: str, env: Mapping[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        """``--workers``, ``--cache``, ``--ttl`` of this instance, then ``extra`` (or the whole ``args``)."""
        options = ("--workers", str(self.workers), "--cache", self.cache, "--ttl", str(self.ttl))
        full_env = {**self.env, **(env or {})} or None
        super().start_proxy(*options, *extra, workers=self.workers, env=full_env, command=args)

    def start(self) -> Daemons:
        self.start_manager()
        self.start_proxy()
        return self

    def __enter__(self) -> Daemons:
        return self

    def get(self, path: str) -> Response:
        with self.client() as c:
            return c.get(path)

    def worker_pids(self) -> set[int]:
        return set(self.booted_workers(self.node()))

    @contextlib.contextmanager
    def worker_clients(self, timeout: float = 30.0, attempts: int = 200) -> Iterator[dict[int, Client]]:
        """A keep-alive connection to each of the ``workers`` workers, by pid (``x-dsproxy-worker``).

        Connections are opened until every worker holds one; the extra ones stay open meanwhile,
        so that the workers' balancing sends the next one elsewhere.  A caller checks the header
        of each answer: a connection the server closed would reconnect to any worker.
        """
        held: dict[int, Client] = {}
        extra: list[Client] = []
        try:
            for _ in range(attempts):
                if len(held) >= self.workers:
                    break
                c = self.client(timeout)
                pid = int(c.get(f"{API}/ping").raise_for_status().headers[WORKER_HEADER])
                if pid in held:
                    extra.append(c)
                else:
                    held[pid] = c
            if len(held) < self.workers:
                raise AssertionError(f"reached only workers {sorted(held)} in {attempts} connections")
            for c in extra:
                c.close()
            extra.clear()
            yield held
        finally:
            for c in [*held.values(), *extra]:
                c.close()
