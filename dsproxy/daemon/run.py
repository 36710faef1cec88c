"""``dsproxy run``: manager + proxy in the foreground for local use (Ctrl-C stops both).

Both are started as child processes of this one (``python -m dsproxy ... manager|proxy``), the
manager first; the proxy starts once ``manager.sock`` answers, so the demo datastores exist before
the first worker loads the config.  If either child exits, the other is stopped and ``run`` exits
with the failed child's status.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from ..client import wait_for_daemon
from ..paths import Paths
from . import systemd

log = logging.getLogger("dsproxy.run")


def run(paths: Paths, manager_args: list[str], proxy_args: list[str], ready_timeout: float = 60.0) -> int:
    systemd.setup_logging("dsproxy-run")
    paths.ensure()
    base = [
        sys.executable,
        "-m",
        "dsproxy",
        "--config-dir",
        str(paths.config_dir),
        "--run-dir",
        str(paths.run_dir),
        "--data-dir",
        str(paths.data_dir),
    ]
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    manager = subprocess.Popen([*base, "manager", *manager_args])
    procs = [manager]
    proxy: subprocess.Popen[bytes] | None = None
    try:
        if not wait_for_daemon(str(paths.run_dir / "manager.sock"), ready_timeout, manager):
            log.error("the manager did not come up")
            return manager.poll() or 1
        proxy = subprocess.Popen([*base, "proxy", *proxy_args])
        procs.append(proxy)
        if not wait_for_daemon(str(paths.run_dir / "proxy.sock"), ready_timeout, proxy):
            log.error("the proxy did not come up")
            return proxy.poll() or 1
        print(
            f"dsproxy running: proxy {paths.run_dir / 'proxy.sock'}, manager {paths.run_dir / 'manager.sock'}"
            " (Ctrl-C stops both)",
            file=sys.stderr,
            flush=True,
        )
        while not stop:
            for p in procs:
                code = p.poll()
                if code is not None:
                    log.error("%s exited with status %d; stopping", "manager" if p is manager else "proxy", code)
                    return code or 1
            time.sleep(0.2)
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


__all__ = ["run"]
