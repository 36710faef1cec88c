"""A proxy worker: one process, one event loop, one :class:`~dsproxy.Registry`, the API of §6.

The master builds a :class:`WorkerSpec` (no side effects) and forks; :func:`run` is the child's
whole life.  The child

1. resets the signal dispositions the master installed and takes its own: ``SIGTERM`` drains
   (stop accepting, finish in-flight requests, close idle connections, exit within
   ``graceful_timeout``), ``SIGINT`` and ``SIGHUP`` are the master's business and ignored here;
2. opens its registry (claims a process slot) and starts serving on the inherited socket, and
   with TLS on the master's TCP listeners (``--listen``), each with the master's TLS context;
3. tells the master it is ready by writing its pid to the ready pipe;
4. every ``TICK`` seconds catches up with the shared generation (so a maintenance transition is
   acknowledged, and idle instances evicted, without waiting for a request), builds the instances
   of stores it has not opened yet (``prewarm``, a few ms per tick), publishes its statistics
   into its slot, and checks that the master is still alive (if
   it is not, it exits: an orphaned worker would hold the socket and its fds forever).  In fleet
   mode the manager nudges its workers with ``SIGUSR2`` after each mirror write, and the tick
   comes at once: a fleet-wide transition waits for the slowest of many workers, and the max of
   six ticks' phases was ~90 ms of its ~100 ms (measured with 3 hosts of 2 workers); the signal
   is ignored until the loop takes it, so a nudge can never end a worker that is still booting.

Prewarm before ready, or after: a worker started while others serve (a reload's new set, a
replacement) builds every instance *before* it reports ready, so a reload hands over warm
workers.  A worker of the proxy's first boot (``WorkerSpec.warm_first`` false: nobody serves
yet) reports ready after loading the config and builds the instances afterwards, in slices of
:data:`WARM_SLICE` between which the loop serves requests; a request for a store not built yet
builds it, as with ``--no-prewarm`` -- the same answers, the first one on that store paying
for its instance (its ``.lock`` opened and locked) until the warm-up reaches it.  At 100,000
stores prewarm took 1.2-2.5 s per worker on this machine (one ``.lock`` opened and locked per
store), all of it on a cold host's path to serving.  Once warm, :func:`freeze` takes what is
loaded out of the cyclic GC's way.

Exit codes: 0 drained, 3 could not boot (the master counts boot failures separately: a worker
that cannot boot will not boot on retry either).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from ..ipc import shm
from ..paths import Paths
from ..registry import Registry
from . import systemd
from .api import FORWARD_TIMEOUT, WorkerApp
from .http import Limits, Server
from .protocol import EXIT_BOOT_FAILURE

log = logging.getLogger("dsproxy.worker")

TICK = 0.1
PREWARM_BUDGET = 0.005  # seconds of instance building per tick: at most 5 % of a core
WARM_SLICE = 0.005  # seconds of instance building per loop turn while a first boot's worker warms up


@dataclass(frozen=True)
class WorkerSpec:
    paths: Paths
    cache: str
    ttl: float
    limits: Limits
    graceful_timeout: float
    master_pid: int
    prewarm: bool = True
    forward_timeout: float = FORWARD_TIMEOUT
    #: prewarm every store before reporting ready (see the module); false for the first boot's workers
    warm_first: bool = True


#: a TCP listening socket and the TLS context to serve it with
Listener = tuple[socket.socket, "ssl.SSLContext | None"]


def run(spec: WorkerSpec, sock: socket.socket, ready_fd: int, listeners: Sequence[Listener] = ()) -> NoReturn:
    """The child side of the fork; never returns."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        systemd.setup_logging("dsproxy-worker")
        os.environ.pop("NOTIFY_SOCKET", None)  # only the master talks to systemd
        code = _serve(spec, sock, ready_fd, listeners)
    except BaseException:  # the child must never return into the master's code
        log.exception("worker %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def _serve(spec: WorkerSpec, sock: socket.socket, ready_fd: int, listeners: Sequence[Listener]) -> int:
    try:
        registry = Registry(
            config_dir=spec.paths.config_dir,
            run_dir=spec.paths.run_dir,
            cache=spec.cache,
            ttl=spec.ttl,
            create_shm=False,
            role=shm.Role.WORKER,
        )
    except Exception as err:
        log.error("cannot open the registry: %s", err)
        return EXIT_BOOT_FAILURE
    import uvloop  # here: the master imports this module and has no event loop

    try:
        return uvloop.run(_main(spec, registry, sock, ready_fd, listeners))
    finally:
        registry.close()


async def _main(
    spec: WorkerSpec, registry: Registry, sock: socket.socket, ready_fd: int, listeners: Sequence[Listener]
) -> int:
    app = WorkerApp(registry, str(spec.paths.run_dir / "manager.sock"), forward_timeout=spec.forward_timeout)
    server = Server(
        app.router(),
        spec.limits,
        on_connection_lost=app.connection_lost,
        extra_headers=app.response_headers,
        authenticate_remote=app.authenticate_remote,
    )
    registry.refresh()  # load the config before the first request
    systemd.set_log_fields(DSPROXY_GENERATION=lambda: registry.loaded_generation)
    if spec.prewarm and spec.warm_first:
        registry.prewarm()  # every instance before we say ready: a reload hands over warm workers
        freeze()
    await server.serve(sock, balance=True)
    for tcp_sock, context in listeners:
        await server.serve(tcp_sock, balance=True, ssl=context)
    stop = asyncio.Event()
    tick = asyncio.Event()  # set by a stop or by the manager's nudge (SIGUSR2): the tick comes now
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        stop.set()
        tick.set()

    loop.add_signal_handler(signal.SIGTERM, stopping)
    loop.add_signal_handler(signal.SIGUSR2, tick.set)
    app.publish()
    os.write(ready_fd, os.getpid().to_bytes(4, "little"))
    os.close(ready_fd)
    log.info("ready: generation %s, %d stores open", registry.loaded_generation, len(registry.instances))
    warming = asyncio.ensure_future(_warm(registry, stop)) if spec.prewarm and not spec.warm_first else None
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tick.wait(), TICK)
        tick.clear()
        registry.refresh()
        app.loaded()  # requests waiting for a revision (x-dsproxy-min-revision) look again
        if spec.prewarm:
            registry.prewarm(PREWARM_BUDGET)  # stores added (or rebuilt) by a config change
        app.publish()
        if os.getppid() != spec.master_pid:
            log.error("the master (pid %d) is gone; exiting", spec.master_pid)
            break
    if warming is not None:
        warming.cancel()
    started = time.monotonic()
    await server.drain(spec.graceful_timeout)
    log.debug("drained in %.3f s", time.monotonic() - started)
    return 0


async def _warm(registry: Registry, stop: asyncio.Event) -> None:
    """A first boot's prewarm after ready: slices of :data:`WARM_SLICE`, the loop serving between."""
    started = time.monotonic()
    while not stop.is_set() and registry.prewarm(WARM_SLICE):
        await asyncio.sleep(0)
    freeze()
    log.info("warm: %d stores open after %.2f s", len(registry.instances), time.monotonic() - started)


def freeze() -> None:
    """What is loaded now (the config, every instance) out of the cyclic GC's way: one full
    collection, then :func:`gc.freeze` -- later collections no longer walk the 100,000s of
    objects of a large config, which live as long as the process or are freed by their
    reference counts (a frozen cycle would never be freed: the collection before catches those)."""
    gc.collect()
    gc.freeze()
