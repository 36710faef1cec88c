"""The stress run's actors: clients, the writer and chaos, each in its own process.

    python -m dsproxy.testing.stress.actors client BASE SEED STOP_AT STORES HOSTS
    python -m dsproxy.testing.stress.actors writer BASE SEED STOP_AT STORES HOSTS PAUSE
    python -m dsproxy.testing.stress.actors chaos BASE SEED STOP_AT STORES HOSTS KILL_EVERY EDIT_EVERY

Each talks to ``BASE/run/proxy.sock`` (with HOSTS > 0, fleet mode: to the proxy.sock of each
host's dir, :func:`~dsproxy.testing.stress.host_dirs`, a random one per request) until ``STOP_AT``
(on :data:`~dsproxy.testing.stress.now`'s clock), on the stores of a run with STORES stable ones
(:class:`~dsproxy.testing.stress.Stores`), and appends what it did and what it was answered to
``BASE/logs/<actor>.jsonl``, one JSON object a line with the ``host`` index, for
:class:`~dsproxy.testing.stress.checker.Checker`.  :func:`command` builds those command lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ...client import ApiError, Client
from ...config import config_lock, read_raw, replace_file
from . import API, MANUAL, VOLATILE, Stores, host_dirs, now


class Log:
    """Append-only JSON lines, one file per process (flushed per line: the checker tails it)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, **record: Any) -> None:
        self.f.write(json.dumps(record, separators=(",", ":")) + "\n")


def _sock(host_dir: Path) -> str:
    return str(host_dir / "run" / "proxy.sock")


def run_client(base: Path, seed: int, stop_at: float, stores: Stores, dirs: list[Path]) -> None:
    rng = random.Random(seed)
    log = Log(base / "logs" / f"client-{seed}.jsonl")
    clients = [Client(_sock(d), timeout=30) for d in dirs]
    prev = [now()] * len(dirs)  # when each host's connection last answered (a kill after it explains a reset)
    while now() < stop_at:
        host = rng.randrange(len(dirs))
        client = clients[host]
        store = stores.any_one(rng)
        roll = rng.random()
        if roll < 0.6:
            kind, method, path, body = "status", "GET", f"{API}/admin/datastore/{store}/status", None
        elif roll < 0.85:
            op = rng.choice(("read", "write"))
            kind, method, path, body = (
                f"lease-{op}",
                "POST",
                f"{API}/admin/datastore/{store}/operation",
                {"operation": op},
            )
        else:
            kind, method, path, body = "config", "GET", f"{API}/config/datastore/{store}", None
        sent = now()
        try:
            resp = client.request(method, path, body)
        except OSError as err:
            log.write(
                kind=kind, store=store, host=host, sent=sent, recv=now(), status=-1, error=type(err).__name__,
                prev=prev[host],
            )  # fmt: skip
            client.close()
            prev[host] = now()
            continue
        prev[host] = now()
        record: dict[str, Any] = {
            "kind": kind, "store": store, "host": host, "sent": sent, "recv": now(), "status": resp.status,
            "gen": resp.generation,
        }  # fmt: skip
        if resp.status == 200 and kind == "config":
            record["comment"] = resp.json()["data"].get("comment")
        elif resp.status != 200:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                record["message"] = resp.json().get("message")
        log.write(**record)
        if resp.status == 200 and kind.startswith("lease"):
            time.sleep(rng.random() * 0.02)
            try:
                client.request("DELETE", f"{API}/admin/datastore/{store}/operation")
            except OSError:
                client.close()  # the lease died with the connection (a killed worker): also fine
    for client in clients:
        client.close()


def run_writer(base: Path, seed: int, stop_at: float, stores: Stores, dirs: list[Path], pause: float) -> None:
    rng = random.Random(seed)
    log = Log(base / "logs" / "writer.jsonl")
    clients = [Client(_sock(d), timeout=60) for d in dirs]
    present = set()  # volatile stores we created
    n = 0
    prev = [now()] * len(dirs)  # when each host's connection last answered
    while now() < stop_at:
        n += 1
        host = rng.randrange(len(dirs))
        client = clients[host]
        roll = rng.random()
        if roll < 0.35:
            store = stores.stable_one(rng)
            action, method, path = "comment", "PUT", f"{API}/config/datastore/{store}"
            body: dict[str, Any] = {"comment": f"write {n}"}
            state = None
        elif roll < 0.75:
            store = stores.stable_one(rng)
            state = rng.choice(("ok", "read-only", "offline"))
            action, method, path = "maintenance", "PUT", f"{API}/config/datastore/{store}"
            body = (
                {"delete": ["maintenance-mode"]}
                if state == "ok"
                else {"maintenance-mode": f"type={state},message=stress {n}"}
            )
        else:
            store = rng.choice(VOLATILE)
            if store in present:
                action, method, path, body, state = "remove", "DELETE", f"{API}/config/datastore/{store}", {}, "absent"
            else:
                # remove keeps the data, so every create needs a fresh (empty) directory
                body = {"name": store, "path": str(base / "datastores" / f"{store}-{n}")}
                action, method, path, state = "create", "POST", f"{API}/config/datastore", "ok"
        sent = now()
        # the intent first: the checker must know of a write in flight before judging answers
        # that arrive while it is (they may already reflect it)
        log.write(phase="start", action=action, store=store, host=host, sent=sent, state=state)
        try:
            resp = client.request(method, path, body or None)
        except OSError as err:
            log.write(
                action=action, store=store, host=host, sent=sent, recv=now(), status=-1, error=type(err).__name__,
                prev=prev[host], comment=body.get("comment"),
            )  # fmt: skip
            client.close()
            if action in ("create", "remove"):
                # the answer was lost, not necessarily the write: look (once the manager is done)
                time.sleep(0.3)
                with contextlib.suppress(OSError):
                    if client.get(f"{API}/config/datastore/{store}").status == 200:
                        present.add(store)
                    else:
                        present.discard(store)
            prev[host] = now()
            continue
        recv = prev[host] = now()
        record: dict[str, Any] = {
            "action": action, "store": store, "host": host, "sent": sent, "recv": recv, "status": resp.status,
            "comment": body.get("comment"),
        }  # fmt: skip
        if resp.status == 200:
            data = resp.json()["data"]
            record["gen"] = data.get("generation")
            record["state"] = state
            if "revision" in data:  # fleet mode: the etcd revision, and who had not acknowledged it
                record["revision"] = data["revision"]
                record["lagging"] = data.get("lagging-hosts", [])
            if action == "create":
                present.add(store)
            elif action == "remove":
                present.discard(store)
        else:
            with contextlib.suppress(ValueError, AttributeError):
                record["message"] = resp.json().get("message")
            if action == "create" and resp.status == 409:  # an earlier create whose answer was lost landed
                present.add(store)
            elif action == "remove" and resp.status == 404:
                present.discard(store)
        log.write(**record)
        if pause:
            time.sleep(rng.random() * pause * 2)
    for client in clients:
        client.close()


def run_chaos(base: Path, seed: int, stop_at: float, dirs: list[Path], kill_every: float, edit_every: float) -> None:
    rng = random.Random(seed)
    log = Log(base / "logs" / "chaos.jsonl")
    next_kill, next_edit, edits = now() + kill_every, now() + edit_every, 0
    while now() < stop_at:
        time.sleep(0.05)
        if now() >= next_kill:
            next_kill = now() + kill_every * (0.5 + rng.random())
            host = rng.randrange(len(dirs))
            try:
                with Client(_sock(dirs[host]), timeout=10) as c:
                    workers = [w["pid"] for w in c.get(f"{API}/nodes/localhost/status").data["workers"]]
                victim = rng.choice(workers)
                log.write(event="kill", pid=victim, host=host, t=now())  # before: the checker knows of it first
                os.kill(victim, signal.SIGKILL)
            except (OSError, ApiError, IndexError) as err:
                log.write(event="kill-failed", host=host, error=repr(err), t=now())
        if now() >= next_edit:
            next_edit = now() + edit_every * (0.5 + rng.random())
            edits += 1
            host = rng.randrange(len(dirs))
            _hand_edit(dirs[host] / "etc", f"hand edit {edits}", host, log)
        log.write(event="tick", t=now())


def _hand_edit(config_dir: Path, value: str, host: int, log: Log) -> None:
    """The comment of :data:`MANUAL` set to ``value`` in ``config_dir/datastore.cfg``, as an admin
    with a locking editor would (the manager's writes and this one never interleave)."""
    cfg_file = config_dir / "datastore.cfg"
    with config_lock(config_dir / ".datastore.lck"):
        lines = read_raw(cfg_file).decode().split("\n")
        try:
            start = lines.index(f"datastore: {MANUAL}")
        except ValueError:  # a fleet host whose file does not hold it (yet): nothing to edit
            log.write(event="edit-skipped", host=host, t=now())
            return
        for i in range(start + 1, len(lines)):
            if lines[i].startswith("\tcomment "):
                lines[i] = f"\tcomment {value}"
                break
        t0 = now()  # the edit may be visible from here on, and is certainly in the file from t
        replace_file(cfg_file, "\n".join(lines).encode())
        log.write(event="edit", value=value, host=host, t0=t0, t=now())


def command(role: str, base: Path, seed: int, stop_at: float, stores: int, hosts: int, *rest: float) -> list[str]:
    """The command line of one actor process (see the module)."""
    head = [sys.executable, "-m", __name__, role, str(base), str(seed), str(stop_at), str(stores), str(hosts)]
    return [*head, *map(str, rest)]


def main(argv: list[str]) -> None:
    role, base, seed, stop_at, count, hosts, *rest = argv
    stores = Stores(int(count))
    dirs = host_dirs(Path(base), int(hosts))
    if role == "client":
        run_client(Path(base), int(seed), float(stop_at), stores, dirs)
    elif role == "writer":
        run_writer(Path(base), int(seed), float(stop_at), stores, dirs, float(rest[0]))
    elif role == "chaos":
        run_chaos(Path(base), int(seed), float(stop_at), dirs, float(rest[0]), float(rest[1]))
    else:
        sys.exit(f"unknown stress actor {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
