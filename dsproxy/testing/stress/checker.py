"""The stress run's judge: reads the actors' logs and checks every answer against the history.

See :mod:`dsproxy.testing.stress` for the invariants.  The checker needs no process: it reads
``<base>/logs/*.jsonl`` (:meth:`Checker.poll`, as often as wanted while they grow) and, at the
end, the config file (:meth:`Checker.final_file_check`); the unit tests feed it logs by hand.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ...config import parse, read_raw
from ...config.maintenance import MaintenanceMode
from . import HAND_EDIT_DEADLINE, MANUAL


class Checker:
    """Reads the logs and judges every answer against the acknowledged history."""

    def __init__(self, base: Path, initial: dict[str, str]) -> None:
        self.base = base
        self.offsets: dict[Path, int] = {}
        # per store: (sent, recv, state) of each write that may have changed it, in order; the
        # first entry is the initial state.  A write whose answer was lost (-1) is in it too: its
        # effect is uncertain, so both states stay possible until the next acknowledged one.
        inf = float("-inf")
        self.acks: dict[str, list[tuple[float, float, str]]] = {s: [(inf, inf, st)] for s, st in initial.items()}
        self.gens: list[tuple[float, int]] = []  # (ack time, generation), sorted by time
        self.edits: list[tuple[float, str]] = []
        self.kills: list[float] = []
        self.responses: list[dict[str, Any]] = []
        self.writes: list[dict[str, Any]] = []
        self.violations: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.checked = 0
        self.leased: set[str] = set()  # stores granted an operation lease (their operations must drain)
        self.watermark = float("-inf")
        # stores whose last create/remove lost its answer: the write may land after the writer looked
        # (a manager write takes long at 100,000 stores), so a repeat may meet its effect (409 / 404)
        self.uncertain: set[str] = set()

    def _met_a_cut_off_write(self, rec: dict[str, Any]) -> bool:
        """A create answered "already exists" (a remove "no such datastore") right after a create
        (remove) of the same store whose answer was lost: that earlier write landed after all."""
        message = str(rec.get("message") or "")
        if rec["action"] == "create" and rec["status"] == 409 and "already exists" in message:
            self.uncertain.discard(rec["store"])
            return True
        if rec["action"] == "remove" and rec["status"] == 404 and "no such datastore" in message:
            self.uncertain.discard(rec["store"])
            return True
        return False

    def _read(self, path: Path) -> list[dict[str, Any]]:
        with open(path) as f:
            f.seek(self.offsets.get(path, 0))
            data = f.read()
        cut = data.rfind("\n") + 1
        self.offsets[path] = self.offsets.get(path, 0) + len(data[:cut].encode())
        return [json.loads(line) for line in data[:cut].splitlines() if line]

    def poll(self, final: bool = False) -> None:
        logs = self.base / "logs"
        if (logs / "chaos.jsonl").exists():
            for rec in self._read(logs / "chaos.jsonl"):
                if rec["event"] == "kill":
                    self.kills.append(rec["t"])
                    self.counts["workers killed"] += 1
                elif rec["event"] == "edit":
                    self.edits.append((rec["t"], rec["value"]))
                    self.counts["hand edits"] += 1
        for rec in self._read(logs / "writer.jsonl") if (logs / "writer.jsonl").exists() else []:
            self.watermark = max(self.watermark, rec["sent"])
            if rec.get("phase") == "start":
                if rec["state"] is not None:  # in flight: possible from now on, until we know more
                    self.acks[rec["store"]].append((rec["sent"], float("inf"), rec["state"]))
                continue
            self.writes.append(rec)
            history = self.acks[rec["store"]]
            in_flight = None
            if history[-1][0] == rec["sent"] and history[-1][1] == float("inf"):
                in_flight = history.pop()  # the entry of this write's start: replaced by what we now know
            if rec["status"] == 200:
                self.uncertain.discard(rec["store"])
                self.counts[f"write {rec['action']}"] += 1
                if rec.get("state") is not None:
                    history.append((rec["sent"], rec["recv"], rec["state"]))
                if rec.get("gen") is not None:
                    self.gens.append((rec["recv"], int(rec["gen"])))
            elif rec["action"] == "remove" and rec["status"] == 409 and "active operations" in rec.get("message", ""):
                self.counts["write remove refused (active operations)"] += 1
            elif rec["status"] == -1 and self.killed_between(rec.get("prev", rec["sent"]), rec["recv"]):
                self.counts["writes cut off (worker killed)"] += 1
                if in_flight is not None:  # applied or not (or later): both stay possible
                    history.append(in_flight)
                if rec["action"] in ("create", "remove"):
                    self.uncertain.add(rec["store"])
            elif rec["store"] in self.uncertain and self._met_a_cut_off_write(rec):
                self.counts["repeat met a cut-off write that landed"] += 1
            else:
                self.violate(
                    "no unexpected error",
                    f"writer {rec['action']} {rec['store']}: {rec['status']} {rec.get('message') or rec.get('error')}",
                )
        self.gens.sort()
        for path in sorted(logs.glob("client-*.jsonl")):
            self.responses.extend(self._read(path))
        # judge an answer only once every write that could have changed it is known: the writer is
        # sequential and logs each write's start, so all writes started before the last start seen
        # are known (``final`` when every process has exited)
        limit = float("inf") if final else self.watermark
        ready = [r for r in self.responses if r["recv"] < limit]
        self.responses = [r for r in self.responses if r["recv"] >= limit]
        for rec in ready:
            self.judge(rec)

    def violate(self, invariant: str, example: str) -> None:
        self.violations[invariant].append(example)

    def killed_between(self, since: float, until: float) -> bool:
        """A worker was killed while this connection was open and unused or in use: a reset then
        is the kill, not an error (the kill is logged just after the signal; allow 0.5 s)."""
        return any(since - 0.5 <= k <= until + 0.5 for k in self.kills)

    def state_window(self, store: str, sent: float, recv: float) -> set[str]:
        """States an answer to a request in flight from ``sent`` to ``recv`` may reflect: the one
        certainly in effect when it was sent (the last write acknowledged before), and every write
        that was in flight or started before the answer came (it may already be published)."""
        history = self.acks[store]
        settled = max(i for i, (_, ack, _) in enumerate(history) if ack <= sent)
        states = {history[settled][2]}
        for write_sent, _, state in history[settled + 1 :]:
            if write_sent <= recv:
                states.add(state)
        # an uncertain (cut-off) write before the settled one may have taken effect after all
        states |= {st for ws, ack, st in history[:settled] if ack == float("inf")}
        return states

    def judge(self, rec: dict[str, Any]) -> None:
        self.checked += 1
        self.counts[f"requests {rec['kind']}"] += 1
        status = rec["status"]
        if status == -1:
            if self.killed_between(rec.get("prev", rec["sent"]), rec["recv"]):
                self.counts["connection errors (worker killed)"] += 1
            else:
                self.violate(
                    "no unexpected error", f"{rec['kind']} {rec['store']}: {rec['error']} with no worker killed near it"
                )
            return
        if status >= 500:
            self.violate("no unexpected error", f"{rec['kind']} {rec['store']}: {status} {rec.get('message')}")
            return
        if rec["kind"].startswith("lease") and status == 200:
            self.leased.add(rec["store"])
        # 1. the generation is not older than the last write acknowledged before the request
        i = bisect.bisect_right(self.gens, (rec["sent"], float("inf"))) - 1
        if i >= 0 and rec.get("gen") is not None and rec["gen"] < self.gens[i][1]:
            self.violate(
                "fresh generation",
                f"{rec['kind']} {rec['store']} sent {rec['sent']:.3f}: "
                f"served generation {rec['gen']} < acknowledged {self.gens[i][1]}",
            )
        # 2. the answer fits a state between the last acknowledgement and the answer
        store = rec["store"]
        states = self.state_window(store, rec["sent"], rec["recv"]) if store != MANUAL else {"ok"}
        allowed = set()
        for st in states:
            allowed |= _allowed(rec["kind"], st)
        if status not in allowed:
            self.violate(
                "fresh answer",
                f"{rec['kind']} {store} sent {rec['sent']:.3f}: {status} {rec.get('message', '')!s} "
                f"but the store was {'/'.join(sorted(states))}",
            )
        # 3. a hand edit is visible 2 s after it was made
        if store == MANUAL and rec["kind"] == "config" and status == 200 and self.edits:
            j = bisect.bisect_right(self.edits, (rec["sent"] - HAND_EDIT_DEADLINE, "\uffff")) - 1
            if j >= 0:
                expected = self.edits[j][1]
                later = {v for t, v in self.edits[j:] if t <= rec["recv"]}
                if rec.get("comment") not in later | {expected}:
                    self.violate(
                        "hand edits seen",
                        f"config {MANUAL} sent {rec['sent']:.3f}: comment {rec.get('comment')!r}, "
                        f"expected {expected!r} (edited {rec['sent'] - self.edits[j][0]:.2f} s before)",
                    )

    def final_file_check(self, cfg_file: Path) -> None:
        try:
            cfg = parse(read_raw(cfg_file), filename=str(cfg_file))
        except Exception as err:
            self.violate("no lost write", f"datastore.cfg does not parse at the end: {err}")
            return
        for store, history in self.acks.items():
            certain = max(i for i, (_, ack, _) in enumerate(history) if ack != float("inf"))
            possible = {history[certain][2]} | {st for _, ack, st in history if ack == float("inf")}
            props = cfg.get(store)
            if props is None:
                actual = "absent"
            else:
                raw = props.get("maintenance-mode")
                actual = "ok" if raw is None else MaintenanceMode.parse(str(raw)).type
            if actual not in possible:
                self.violate(
                    "no lost write",
                    f"{store}: the file says {actual}, the last acknowledged write {history[certain][2]}",
                )
        comments: dict[str, set[str]] = {}  # the last acknowledged comment, and cut-off ones after it
        for rec in self.writes:
            if rec["action"] != "comment":
                continue
            if rec["status"] == 200:
                comments[rec["store"]] = {rec["comment"]}
            elif rec["status"] == -1:
                comments.setdefault(rec["store"], set()).add(rec.get("comment") or "")
        for store, possible in comments.items():
            actual = str(cfg.get(store, {}).get("comment"))
            if actual not in possible and self.acks[store][-1][2] != "absent":
                self.violate(
                    "no lost write", f"{store}: comment {actual!r}, last acknowledged one of {sorted(possible)}"
                )
        if self.edits and cfg.get(MANUAL, {}).get("comment") != self.edits[-1][1]:
            self.violate("no lost write", f"{MANUAL}: the last hand edit {self.edits[-1][1]!r} is not in the file")


def _allowed(kind: str, state: str) -> set[int]:
    if kind == "config":
        return {404} if state == "absent" else {200}
    if state == "absent":
        return {404, 400}
    if state == "offline":
        return {409}
    if state == "read-only" and kind == "lease-write":
        return {409}
    return {200}
