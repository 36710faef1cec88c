"""``dsproxy proxy``: the master that binds the socket, forks the workers and watches over them.

The master never serves a request.  Its loop (:meth:`Master.run`) waits on one selector for the
signal wake-up pipe and the workers' ready pipe, then dispatches: signals go through a queue to
``handle_<signal>`` methods (handlers only enqueue -- gunicorn learnt that the hard way), ready
messages to :meth:`Master.worker_ready`, and every pass keeps the worker count, the watchdog and
the status line up to date.

* **Socket**: taken from systemd socket activation if present, else ``<run>/proxy.sock`` bound
  with mode 0660.  Workers inherit it and accept on it; the kernel spreads connections.
* **TCP** (``--listen HOST:PORT``, repeatable): bound here before the first fork, IPv4 and IPv6
  (a name binds every address it resolves to), each served with TLS by every worker beside the Unix
  socket.  The TLS context is built here too, from ``--tls-cert``/``--tls-key`` or the
  self-signed ``proxy.pem``/``proxy.key`` of the config dir (generated on the first start:
  :mod:`.tls`); a certificate or a port that cannot be had is a boot failure (exit 3) with a line
  that says why.
* **Supervision**: a dead worker's slot is freed and it is replaced at once; workers that keep
  dying within a second of their start make the restarts back off (0.1 s doubling to 5 s).
  More than ``crash_limit`` crashes within ``crash_window`` seconds, or ``BOOT_FAILURE_LIMIT``
  boot failures in a row before any worker booted, end the master with exit code 1 (3 for boot
  failures) for systemd to judge.  A worker
  whose heartbeat is older than ``worker_timeout`` is killed (it hangs) and replaced.
* **SIGHUP**: ``RELOADING=1``; the TLS context is built again from the current certificate files
  (one that does not load is logged and the previous one kept); a full new set of workers is
  started with it; once all of them are ready the old ones are drained; then ``READY=1``.  The
  sockets never close, so no request fails; connections to old workers keep the old certificate
  until they close.
* **SIGTERM/SIGINT**: ``STOPPING=1``; workers drain (``graceful_timeout``), stragglers are killed.
* **RLIMIT_NOFILE**: the soft limit is raised to the hard one (children inherit it); a warning
  with the numbers when it is below what the configured stores need (:mod:`.limits`).
* **The first parse**: with ``--cache on`` the master parses ``datastore.cfg`` once before it
  forks its first workers (:func:`dsproxy.registry.preload`); each worker that reads the same
  bytes adopts that parse instead of making its own.  Dropped once they are all up.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import selectors
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry
from ..ipc import shm
from . import limits, systemd, tls, worker
from .http import bind_tcp, bind_unix_socket, tcp_address
from .options import ProxyOptions
from .protocol import EXIT_BOOT_FAILURE

log = logging.getLogger("dsproxy.master")

EXIT_CRASH_LOOP = 1
BOOT_FAILURE_LIMIT = 3
EARLY_DEATH = 1.0  # seconds: a worker dying younger than this counts towards the restart backoff


@dataclass
class _Worker:
    pid: int
    started: float
    generation: int  # the master's reload generation this worker belongs to
    ready: bool = False


@dataclass
class _Backoff:
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    delay: float = 0.0
    not_before: float = 0.0
    early: int = 0  # workers in a row that died young


class Master:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, options: ProxyOptions) -> None:
        self.options = options
        self.spec = options.spec
        self.workers: dict[int, _Worker] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.reload_generation = 0
        self.reload_started: float | None = None
        self.stopping = False
        self.exit_code = 0
        self.booted_once = False
        self.boot_failures = 0
        self.backoff = _Backoff()
        self.sock: socket.socket | None = None
        self.listeners: list[socket.socket] = []  # TCP, served with TLS
        self.tls_context: ssl.SSLContext | None = None
        self.seg: shm.Segment | None = None
        self.selector = selectors.DefaultSelector()
        self._last_watchdog = 0.0
        self._last_status = ""

    # -- set-up ---------------------------------------------------------------------------------------

    def setup(self) -> int | None:
        """Socket, pipes, signals, limits.  Returns an exit code if the proxy cannot start."""
        self.spec.paths.ensure()
        # parsed once here, for the first workers to inherit (registry.preload): not once per worker
        stores = registry.preload(str(self.spec.paths.config_file)) if self.spec.cache == "on" else None
        # ... and out of the cyclic GC's way: a forked worker's first full collection wrote into
        # the header of every object inherited (~40 ms per worker at 100,000 stores, its pages
        # copied from here); what is dropped later is still freed by its reference count
        gc.freeze()
        limits.check_at_start(self.spec.paths.config_file, log, stores)
        inherited = systemd.listen_fds()
        if inherited:
            self.sock = inherited[0]
            self.sock.setblocking(False)
            log.info("using the socket passed by systemd (fd %d)", self.sock.fileno())
        else:
            path = str(self.spec.paths.run_dir / "proxy.sock")
            try:
                self.sock = bind_unix_socket(path, self.options.socket_mode)
            except OSError as err:
                log.error("cannot listen on %s: %s", path, err.strerror or err)
                return EXIT_BOOT_FAILURE
        os.set_inheritable(self.sock.fileno(), True)
        code = self.setup_tcp()
        if code is not None:
            return code
        self.ready_r, self.ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._enqueue)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        self.selector.register(self.ready_r, selectors.EVENT_READ, "ready")
        with contextlib.suppress(shm.SegmentError):
            self.seg = shm.Segment.open(self.spec.paths.run_dir, create=False)
        return None

    def setup_tcp(self) -> int | None:
        """The TLS context and the ``--listen`` sockets; an exit code if either cannot be had."""
        if not self.options.listen:
            if self.options.tls_cert or self.options.tls_key:
                log.warning("--tls-cert/--tls-key are not used without --listen")
            return None
        if self.options.tls_key and not self.options.tls_cert:
            log.error("--tls-key needs --tls-cert")
            return EXIT_BOOT_FAILURE
        try:
            self.tls_context = self.load_tls()
        except tls.TLSError as err:
            log.error("cannot serve HTTPS: %s", err)
            return EXIT_BOOT_FAILURE
        for endpoint in self.options.listen:
            try:
                self.listeners += bind_tcp(endpoint.host, endpoint.port)
            except OSError as err:
                log.error("cannot listen on %s: %s", endpoint, err.strerror or err)
                return EXIT_BOOT_FAILURE
        for sock in self.listeners:
            log.info("listening on https://%s", tcp_address(sock))
        return None

    def load_tls(self) -> ssl.SSLContext:
        """The server context from the current certificate files (generated ones made if missing)."""
        opts = self.options
        if opts.tls_cert:
            files = tls.CertFiles(Path(opts.tls_cert), Path(opts.tls_key or opts.tls_cert))
        else:
            files, generated = tls.ensure_self_signed(self.spec.paths.config_dir)
            if generated:
                log.info("generated a self-signed certificate %s (key %s)", files.cert, files.key)
        context = tls.server_context(files)
        log.info("certificate %s: SHA-256 fingerprint %s", files.cert, tls.file_fingerprint(files.cert))
        return context

    def _enqueue(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        code = self.setup()
        if code is not None:
            return code
        systemd.write_pid_file(self.spec.paths.run_dir / "proxy.pid")
        log.info("proxy master %d: %d workers, cache=%s", os.getpid(), self.options.workers, self.spec.cache)
        try:
            while not (self.stopping and not self.workers):
                self.maintain_workers()
                for key, _ in self.selector.select(timeout=self._timeout()):
                    if key.data == "ready":
                        self.read_ready()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 4096)
                while self.signals:
                    self.dispatch(self.signals.popleft())
                self.reap()
                self.check_workers()
                self.notify_status()
        finally:
            self.cleanup()
        return self.exit_code

    def _timeout(self) -> float:
        if self.stopping:
            return 0.1
        wait = 1.0
        watchdog = systemd.watchdog_interval()
        if watchdog is not None:
            wait = min(wait, watchdog / 2)
        if self.backoff.not_before > time.monotonic():
            wait = min(wait, self.backoff.not_before - time.monotonic())
        return max(wait, 0.01)

    def dispatch(self, signum: int) -> None:
        handler = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_term,
            signal.SIGHUP: self.handle_hup,
            signal.SIGCHLD: self.reap,
        }.get(signal.Signals(signum))
        if handler is not None:
            handler()

    # -- signals --------------------------------------------------------------------------------------

    def handle_term(self) -> None:
        if self.stopping:
            return
        log.info("stopping: draining %d workers", len(self.workers))
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.spec.graceful_timeout + 1.0
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)

    def handle_hup(self) -> None:
        if self.stopping or self.reload_started is not None:
            return
        log.info("reloading: starting a new set of %d workers", self.options.workers)
        if self.listeners:
            try:
                self.tls_context = self.load_tls()
            except tls.TLSError as err:
                log.error("reload: %s; the new workers keep the previous certificate", err)
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}", "STATUS=reloading")
        self.reload_generation += 1
        self.reload_started = time.monotonic()

    # -- workers --------------------------------------------------------------------------------------

    def current_workers(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.generation == self.reload_generation]

    def maintain_workers(self) -> None:
        if self.stopping or time.monotonic() < self.backoff.not_before:
            return
        while len(self.current_workers()) < self.options.workers:
            self.spawn()

    def spawn(self) -> None:
        assert self.sock is not None
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)  # before closing the pipe: its fd number may be reused
            self.selector.close()
            for fd in (self.ready_r, self.wake_r, self.wake_w):
                os.close(fd)
            if self.seg is not None:  # the worker maps its own; this copy would outlive a store-table move
                self.seg.close()
                self.seg = None
            # the first boot's workers report ready before they prewarm: nobody serves yet (worker module)
            spec = self.spec if self.booted_once else dataclasses.replace(self.spec, warm_first=False)
            worker.run(spec, self.sock, self.ready_w, [(s, self.tls_context) for s in self.listeners])
        self.workers[pid] = _Worker(pid, time.monotonic(), self.reload_generation)

    def read_ready(self) -> None:
        try:
            data = os.read(self.ready_r, 4096)
        except BlockingIOError:
            return
        for i in range(0, len(data) - 3, 4):
            pid = int.from_bytes(data[i : i + 4], "little")
            self.worker_ready(pid)

    def worker_ready(self, pid: int) -> None:
        w = self.workers.get(pid)
        if w is None:
            return
        w.ready = True
        self.boot_failures = 0
        if not self.booted_once and len([x for x in self.current_workers() if x.ready]) == self.options.workers:
            self.booted_once = True
            registry.drop_preloaded()  # a worker started from now on parses what it reads then
            log.info("all %d workers ready", self.options.workers)
            systemd.notify("READY=1", f"STATUS={self.status_line()}")
        if self.reload_started is not None and all(x.ready for x in self.current_workers()):
            self.finish_reload()

    def finish_reload(self) -> None:
        old = [w.pid for w in self.workers.values() if w.generation != self.reload_generation]
        for pid in old:
            _kill(pid, signal.SIGTERM)
        log.info(
            "reload done in %.2f s; draining %d old workers", time.monotonic() - (self.reload_started or 0), len(old)
        )
        self.reload_started = None
        systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is not None:
                self.worker_exited(w, status)

    def worker_exited(self, w: _Worker, status: int) -> None:
        self.free_slot(w.pid)
        code = os.waitstatus_to_exitcode(status)
        expected = self.stopping or w.generation != self.reload_generation
        if expected and code == 0:
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log.warning("worker %d %s after %.1f s", w.pid, how, time.monotonic() - w.started)
        if self.stopping:
            return
        if code == EXIT_BOOT_FAILURE and not w.ready:
            self.boot_failures += 1
            if not self.booted_once and self.boot_failures >= BOOT_FAILURE_LIMIT:
                log.error("workers fail to boot (%d in a row); giving up", self.boot_failures)
                self.give_up(EXIT_BOOT_FAILURE)
                return
        self.note_crash(early=time.monotonic() - w.started < EARLY_DEATH)

    def note_crash(self, early: bool = True) -> None:
        """Count a crash; give up on a crash loop; back off when workers die young.

        A worker that served for a while and was killed (OOM killer, an admin, the stress
        script) is replaced at once, however often it happens (docs/design.md §10: within 1 s).  Only
        workers dying within ``EARLY_DEATH`` of their start -- a crash on boot, repeated -- make
        the restarts back off (0.1 s doubling to 5 s), so a broken worker does not spin.
        """
        now = time.monotonic()
        b = self.backoff
        b.crashes.append(now)
        while b.crashes and now - b.crashes[0] > self.options.crash_window:
            b.crashes.popleft()
        if len(b.crashes) > self.options.crash_limit:
            log.error(
                "crash loop: %d worker crashes within %.0f s; giving up", len(b.crashes), self.options.crash_window
            )
            self.give_up(EXIT_CRASH_LOOP)
            return
        if not early:
            b.early = 0
            b.delay, b.not_before = 0.0, now
            return
        b.early += 1
        b.delay = 0.0 if b.early <= 1 else min(5.0, 0.1 * 2 ** (b.early - 2))
        b.not_before = now + b.delay

    def give_up(self, code: int) -> None:
        self.exit_code = code
        self.handle_term()

    def segment(self) -> shm.Segment | None:
        """The shared memory, checked before every use: a truncated mapping kills its toucher."""
        seg = self.seg
        # the header only: garbage in the slots is skipped by claimed_slots() and repaired by the manager
        if seg is not None and seg.check(contents=False) is not None:
            with contextlib.suppress(Exception):
                seg.close()
            seg = self.seg = None
        if seg is None:
            with contextlib.suppress(shm.SegmentError):
                seg = self.seg = shm.Segment.open(self.spec.paths.run_dir, create=False)
        return seg

    def free_slot(self, pid: int) -> None:
        """Clear a dead worker's process slot now (its operations vanish from the totals at once)."""
        seg = self.segment()
        if seg is not None:
            seg.free_slots_of(pid)

    def check_workers(self) -> None:
        now = time.monotonic()
        if self.stopping:
            if now > self.stop_deadline:
                for pid in self.workers:
                    log.warning("worker %d did not drain in time; killing it", pid)
                    _kill(pid, signal.SIGKILL)
                self.stop_deadline = now + 5.0
            return
        for w in list(self.workers.values()):
            if not w.ready and now - w.started > self.options.boot_timeout:
                log.error("worker %d did not boot within %.0f s; killing it", w.pid, self.options.boot_timeout)
                _kill(w.pid, signal.SIGKILL)
        if self.options.worker_timeout <= 0:
            return
        seg = self.segment()
        if seg is None:
            return
        now_ns = time.monotonic_ns()
        limit = int(self.options.worker_timeout * 1e9)
        for pid, heartbeat in seg.heartbeats().items():  # range-checked: a scribbled slot is not a worker to kill
            candidate = self.workers.get(pid)
            if candidate is not None and candidate.ready and now_ns - heartbeat > limit:
                log.error("worker %d has not been heard of for %.0f s; killing it", pid, self.options.worker_timeout)
                _kill(pid, signal.SIGKILL)

    # -- systemd --------------------------------------------------------------------------------------

    def status_line(self) -> str:
        ready = len([w for w in self.workers.values() if w.ready])
        return f"{ready} workers ready, cache={self.spec.cache}"

    def notify_status(self) -> None:
        now = time.monotonic()
        watchdog = systemd.watchdog_interval()
        if watchdog is not None and now - self._last_watchdog >= watchdog / 2:
            systemd.notify("WATCHDOG=1")
            self._last_watchdog = now
        line = self.status_line()
        if self.booted_once and line != self._last_status and self.reload_started is None and not self.stopping:
            systemd.notify(f"STATUS={line}")
            self._last_status = line

    def cleanup(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spec.paths.run_dir / "proxy.pid")
        if self.seg is not None:
            self.seg.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as err:
        if err.errno != errno.ESRCH:
            raise


def main(options: ProxyOptions) -> int:
    systemd.setup_logging("dsproxy-proxy")
    return Master(options).run()


__all__ = ["Master", "ProxyOptions", "main"]
