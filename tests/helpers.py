"""Shared test helpers: instance directories with real stores, a child-process agent, the scripts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from dsproxy.config import update_config
from dsproxy.fsutil import make_store
from dsproxy.ipc import shm
from dsproxy.paths import Paths
from dsproxy.testing.stores import store_path

AGENT = Path(__file__).with_name("agent.py")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def modules_loaded_by_the_daemons(*roots: str) -> list[str]:
    """The modules under ``roots`` (top-level packages or dotted prefixes) that a fresh
    interpreter has loaded after importing dsproxy, its CLI and the three daemons."""
    code = (
        "import sys, dsproxy, dsproxy.cli, dsproxy.daemon.worker, dsproxy.daemon.manager, dsproxy.daemon.master\n"
        f"roots = {roots!r}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if any(m == r or m.startswith(r + '.') for r in roots))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def run_script(
    name: str, *args: str | Path, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/<name> ARGS`` with this interpreter, its output captured as text; ``check``:
    assert that it exited with 0 (the failure shows its output).

    Interrupted (its own ``timeout``, pytest-timeout's, a Ctrl-C), the script gets SIGINT first
    and ``INTERRUPT_GRACE`` s to unwind: its ``finally`` blocks stop the daemons it started and
    unlink their shared memory.  ``subprocess.run`` killed it at once, and a bench-scale run cut
    off by the suite's timeout left its segment in /dev/shm."""
    cmd = [sys.executable, str(SCRIPTS / name), *map(str, args)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=INTERRUPT_GRACE)
            except BaseException:
                proc.kill()
                proc.wait()
            raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


INTERRUPT_GRACE = 30.0  # s an interrupted script has to stop its daemons before it is killed


def run_bench(name: str, out_dir: Path, *args: str) -> tuple[str, Any]:
    """Run the benchmark ``scripts/<name> ARGS --json --plot`` (it must succeed and draw a PNG);
    return what it printed and the figures of its JSON file."""
    out_json, out_png = out_dir / f"{name}.json", out_dir / f"{name}.png"
    result = run_script(name, *args, "--json", out_json, "--plot", out_png, timeout=600, check=True)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result.stdout, json.loads(out_json.read_text())


class Instance:
    """A dsproxy instance on a temp base dir (``etc/``, ``run/``, ``datastores/``)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.paths = Paths.resolve(base)
        self.paths.ensure()
        self.paths.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def config_file(self) -> Path:
        return self.paths.config_file

    def store_dir(self, name: str) -> Path:
        """The store ``name``'s directory under the data dir, laid out (or reused) as a create would."""
        path = store_path(self.paths, name)
        make_store(path)
        return Path(path)

    def write_text(self, text: str) -> None:
        """Replace the config file by hand (no bump), like an admin with an editor."""
        tmp = self.config_file.with_suffix(".edit")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)

    def add_stores(self, *names: str, **props: Any) -> None:
        """Add stores through the manager's write path (locked write + generation bump)."""

        def mutate(cfg: dict[str, dict[str, Any]]) -> None:
            for name in names:
                cfg[name] = {"path": str(self.store_dir(name)), **props}

        self.update(mutate)

    def update(self, mutate: Any) -> int | None:
        seg = self.segment()
        try:
            _, _, gen = update_config(self.config_file, mutate, bump=seg.bump_generation)
        finally:
            seg.close()
        return gen

    def set_maintenance(self, name: str, mode: str | None) -> int | None:
        def mutate(cfg: dict[str, dict[str, Any]]) -> None:
            if mode is None:
                cfg[name].pop("maintenance-mode", None)
            else:
                cfg[name]["maintenance-mode"] = mode

        return self.update(mutate)

    def segment(self) -> shm.Segment:
        return shm.Segment.open(self.paths.run_dir, create=True)

    def cleanup(self) -> None:
        shm.unlink(self.paths.run_dir)


class Agent:
    """A real child process driving its own Registry, one JSON command per line (see agent.py)."""

    def __init__(self, base: Path, **registry_args: Any) -> None:
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), str(base), json.dumps(registry_args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._read()
        assert ready.get("ready"), ready
        self.pid: int = ready["pid"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def send(self, cmd: str, **args: Any) -> None:
        """Send without waiting for the answer (for commands that block)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ask the agent to exit; kill it if it does not within 5 s (it may be blocked on purpose)."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                self.send("exit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
