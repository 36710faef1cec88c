"""The stress run's judge: reads the actors' logs and checks every answer against the history.

See :mod:`dsproxy.testing.stress` for the invariants, with one host and with a fleet.  The checker
needs no process: it reads ``<base>/logs/*.jsonl`` (:meth:`Checker.poll`, as often as wanted while
they grow) and, at the end, the config files (:meth:`Checker.final_file_check`, and in fleet mode
:meth:`Checker.final_config_check` on etcd's datastores); the unit tests feed it logs by hand.

A record without ``host`` is host 0's (the single-host run).  Each poll reads the writer's log
first and the chaos logs after it: every kill is logged before it is made, so the kill behind a
write that was cut off is known when that write is judged.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import Value, parse, read_raw
from ...config.maintenance import MaintenanceMode
from . import FLEET_GRACE, FLEET_LEASE_TTL, HAND_EDIT_DEADLINE, MANUAL, MANUAL_COMMENT

INF = float("inf")
#: fleet mode: a 503 of the fleet (etcd unreachable, a host that did not answer a remove's question,
#: a manager not caught up after its restart) is expected this long after a member or manager was down
FLEET_CHAOS_MARGIN = FLEET_LEASE_TTL + 2.0


@dataclass
class Ack:
    """A write that may have changed a store: when it was sent and answered (``recv`` INF: in
    flight, or its outcome unknown), the state it set, the host it went to (-1: the initial state,
    in effect everywhere), whether its answer waited for every host (a fleet-wide transition) and
    the hosts that answer named lagging."""

    sent: float
    recv: float
    state: str
    host: int = -1
    fleet_wide: bool = True
    lagging: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Edit:
    """A hand edit of :data:`MANUAL`'s comment in one host's file: visible from ``t0``, in the file from ``t``."""

    t0: float
    t: float
    value: str
    host: int


def host_id(host: int) -> str:
    """The host id the fleet harness gives host ``host`` (``lagging-hosts`` names these)."""
    return f"host{host}"


class Checker:
    """Reads the logs and judges every answer against the acknowledged history (``hosts`` > 0: a fleet)."""

    def __init__(self, base: Path, initial: dict[str, str], hosts: int = 0) -> None:
        self.base = base
        self.fleet = hosts > 0
        self.offsets: dict[Path, int] = {}
        # per store: every write that may have changed it, in order; the first entry is the initial
        # state.  A write whose answer was lost (-1) is in it too: its effect is uncertain, so both
        # states stay possible until the next acknowledged one.
        self.acks: dict[str, list[Ack]] = {s: [Ack(-INF, -INF, st)] for s, st in initial.items()}
        self.gens: dict[int, list[tuple[float, int]]] = defaultdict(list)  # per host: (ack time, generation)
        self.edits: list[tuple[float, str, float]] = []  # one host: (done, value, started)
        self.fleet_edits: list[Edit] = []
        self.kills: dict[int, list[float]] = defaultdict(list)  # per host: worker kills
        self.down: dict[int, list[list[float]]] = defaultdict(list)  # per host: [killed, back] of its manager
        self.etcd_down: list[list[float]] = []  # [killed, back] of etcd members
        self.responses: list[dict[str, Any]] = []
        self.writes: list[dict[str, Any]] = []
        self.violations: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.checked = 0
        self.leased: set[str] = set()  # stores granted an operation lease (their operations must drain)
        self.watermark = -INF
        # stores whose last create/remove lost its answer: the write may land after the writer looked
        # (a manager write takes long at 100,000 stores), so a repeat may meet its effect (409 / 404)
        self.uncertain: set[str] = set()

    # -- reading --------------------------------------------------------------------------------------

    def _read(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        with open(path) as f:
            f.seek(self.offsets.get(path, 0))
            data = f.read()
        cut = data.rfind("\n") + 1
        self.offsets[path] = self.offsets.get(path, 0) + len(data[:cut].encode())
        return [json.loads(line) for line in data[:cut].splitlines() if line]

    def poll(self, final: bool = False) -> None:
        logs = self.base / "logs"
        writes = self._read(logs / "writer.jsonl")  # before the chaos logs (see the module)
        for rec in self._read(logs / "chaos.jsonl"):
            self._chaos(rec)
        for rec in self._read(logs / "fleet-chaos.jsonl"):
            self._fleet_chaos(rec)
        for rec in writes:
            self._write(rec)
        for gens in self.gens.values():
            gens.sort()
        for path in sorted(logs.glob("client-*.jsonl")):
            self.responses.extend(self._read(path))
        # judge an answer only once every write that could have changed it is known: the writer is
        # sequential and logs each write's start, so all writes started before the last start seen
        # are known (``final`` when every process has exited)
        limit = INF if final else self.watermark
        ready = [r for r in self.responses if r["recv"] < limit]
        self.responses = [r for r in self.responses if r["recv"] >= limit]
        for rec in ready:
            self.judge(rec)

    def _chaos(self, rec: dict[str, Any]) -> None:
        host = rec.get("host", 0)
        if rec["event"] == "kill":
            self.kills[host].append(rec["t"])
            self.counts["workers killed"] += 1
        elif rec["event"] == "edit":
            self.counts["hand edits"] += 1
            if self.fleet:
                self.fleet_edits.append(Edit(rec.get("t0", rec["t"]), rec["t"], rec["value"], host))
            else:
                self.edits.append((rec["t"], rec["value"], rec.get("t0", rec["t"])))

    def _fleet_chaos(self, rec: dict[str, Any]) -> None:
        event, t = rec["event"], rec["t"]
        if event == "manager-kill":
            self.down[rec["host"]].append([t, INF])
            self.counts["managers killed"] += 1
        elif event == "manager-up" and self.down[rec["host"]]:
            self.down[rec["host"]][-1][1] = t
        elif event == "etcd-kill":
            self.etcd_down.append([t, INF])
            self.counts["etcd leaders killed" if rec.get("leader") else "etcd members killed"] += 1
        elif event == "etcd-up" and self.etcd_down:
            self.etcd_down[-1][1] = t
        elif event.endswith("-failed"):
            self.violate("no unexpected error", f"fleet chaos: {event}: {rec.get('error')}")

    # -- the writer's records -------------------------------------------------------------------------

    def _write(self, rec: dict[str, Any]) -> None:
        self.watermark = max(self.watermark, rec["sent"])
        store, host = rec["store"], rec.get("host", 0)
        history = self.acks[store]
        if rec.get("phase") == "start":
            if rec["state"] is not None:  # in flight: possible from now on, until we know more
                history.append(Ack(rec["sent"], INF, rec["state"], host, fleet_wide=False))
            return
        self.writes.append(rec)
        in_flight = None
        if history[-1].sent == rec["sent"] and history[-1].recv == INF:
            in_flight = history.pop()  # the entry of this write's start: replaced by what we now know
        if rec["status"] == 200:
            self.uncertain.discard(store)
            self.counts[f"write {rec['action']}"] += 1
            if rec.get("state") is not None:
                fleet_wide = self.fleet and rec["state"] == "offline"  # its answer waited for every live host
                lagging = frozenset(rec.get("lagging") or ())
                history.append(Ack(rec["sent"], rec["recv"], rec["state"], host, fleet_wide, lagging))
                if lagging:
                    self.counts["fleet-wide transitions with lagging hosts"] += 1
            if rec.get("gen") is not None:
                self.gens[host].append((rec["recv"], int(rec["gen"])))
            return
        verdict = self._refusal(rec)
        if verdict is None:
            self.violate(
                "no unexpected error",
                f"writer {rec['action']} {store} on host {host}: {rec['status']} "
                f"{rec.get('message') or rec.get('error')}",
            )
            return
        label, uncertain = verdict
        self.counts[label] += 1
        if uncertain:
            rec["uncertain"] = True
            if in_flight is not None:  # applied or not (or later): both stay possible
                history.append(in_flight)
            if rec["action"] in ("create", "remove"):
                self.uncertain.add(store)

    def _refusal(self, rec: dict[str, Any]) -> tuple[str, bool] | None:
        """What an answer other than 200 to a write is (a count's label, and whether the write may
        have been applied all the same), or None: an unexpected error."""
        status, action, store, host = rec["status"], rec["action"], rec["store"], rec.get("host", 0)
        message = str(rec.get("message") or "")
        if action == "remove" and status == 409 and "active operations" in message:
            return "write remove refused (active operations)", False
        if status == -1 and self.killed_between(host, rec.get("prev", rec["sent"]), rec["recv"]):
            return "writes cut off (worker killed)", True
        if store in self.uncertain and self._met_a_cut_off_write(rec):
            return "repeat met a cut-off write that landed", False
        return self._fleet_refusal(rec, message) if self.fleet else None

    def _fleet_refusal(self, rec: dict[str, Any], message: str) -> tuple[str, bool] | None:
        status, action, store, host = rec["status"], rec["action"], rec["store"], rec.get("host", 0)
        sent, recv = rec["sent"], rec["recv"]
        if status == 409 and "on another host" in message:
            return "writes refused (the host's mirror was behind)", False
        states = self.state_window(store, host, sent, recv)
        if action == "create" and status == 409 and "already exists" in message and states - {"absent"}:
            return "creates/removes refused by the host's state (behind)", False
        if action == "remove" and status == 404 and "no such datastore" in message and "absent" in states:
            return "creates/removes refused by the host's state (behind)", False
        if status == 503 and "the manager is not running" in message and self.manager_down(host, sent, recv):
            return "writes refused (the host's manager was down)", False
        killed = self.manager_down(host, sent - 1.0, recv)
        if killed and (status == 504 or (status == 503 and "the manager closed the connection" in message)):
            return "writes cut off (the host's manager was killed)", True
        fleet_503 = message.startswith("fleet:") or "did not report their operations" in message
        if "also runs as host" in message:  # a restarted manager taken for a duplicate: never expected
            fleet_503 = False
        if status == 503 and fleet_503 and self.chaos_near(sent - FLEET_CHAOS_MARGIN, recv):
            if "may or may not" in message:
                return "writes cut off (etcd: outcome unknown)", True
            return "writes refused (fleet: etcd or a host unavailable)", False
        return None

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

    # -- what happened when ---------------------------------------------------------------------------

    def violate(self, invariant: str, example: str) -> None:
        self.violations[invariant].append(example)

    def killed_between(self, host: int, since: float, until: float) -> bool:
        """A worker of ``host`` was killed while this connection was open and unused or in use: a
        reset then is the kill, not an error (allow 0.5 s)."""
        return any(since - 0.5 <= k <= until + 0.5 for k in self.kills[host])

    def manager_down(self, host: int, since: float, until: float) -> bool:
        """The manager of ``host`` was killed and not back at some moment of ``[since, until]``."""
        return any(k <= until and back >= since for k, back in self.down[host])

    def chaos_near(self, since: float, until: float) -> bool:
        """An etcd member or any host's manager was down at some moment of ``[since, until]``."""
        intervals = [*self.etcd_down, *(i for d in self.down.values() for i in d)]
        return any(k <= until and back >= since for k, back in intervals)

    def in_effect(self, ack: Ack, host: int) -> float:
        """From when ``ack`` is certainly in effect on ``host`` (INF: not known to be, ever): on its
        own host from its answer; with a fleet, on the others too if its answer waited for every live
        host, did not name this one, and this host's manager was not down around it (see the package)."""
        if ack.recv == INF or not self.fleet or ack.host in (host, -1):
            return ack.recv
        waited = ack.fleet_wide and host_id(host) not in ack.lagging
        if waited and not self.manager_down(host, ack.sent - FLEET_GRACE, ack.recv):
            return ack.recv
        return INF

    def state_window(self, store: str, host: int, sent: float, recv: float) -> set[str]:
        """States an answer from ``host`` to a request in flight from ``sent`` to ``recv`` may reflect:
        the one certainly in effect there when it was sent, and every write that was in flight or
        started before the answer came (it may already be published there)."""
        history = self.acks[store]
        settled = max(i for i, ack in enumerate(history) if self.in_effect(ack, host) <= sent)
        states = {history[settled].state}
        for ack in history[settled + 1 :]:
            if ack.sent <= recv:
                states.add(ack.state)
        # an uncertain (cut-off) write before the settled one may have taken effect after all
        states |= {ack.state for ack in history[:settled] if ack.recv == INF}
        return states

    # -- the clients' answers -------------------------------------------------------------------------

    def judge(self, rec: dict[str, Any]) -> None:
        self.checked += 1
        self.counts[f"requests {rec['kind']}"] += 1
        status, host = rec["status"], rec.get("host", 0)
        if status == -1:
            if self.killed_between(host, rec.get("prev", rec["sent"]), rec["recv"]):
                self.counts["connection errors (worker killed)"] += 1
            else:
                self.violate(
                    "no unexpected error",
                    f"{rec['kind']} {rec['store']} on host {host}: {rec['error']} with no worker killed near it",
                )
            return
        if status >= 500:
            self.violate("no unexpected error", f"{rec['kind']} {rec['store']}: {status} {rec.get('message')}")
            return
        if rec["kind"].startswith("lease") and status == 200:
            self.leased.add(rec["store"])
        # 1. the generation is not older than the last write acknowledged (by this host) before the request
        gens = self.gens[host]
        i = bisect.bisect_right(gens, (rec["sent"], INF)) - 1
        if i >= 0 and rec.get("gen") is not None and rec["gen"] < gens[i][1]:
            self.violate(
                "fresh generation",
                f"{rec['kind']} {rec['store']} on host {host} sent {rec['sent']:.3f}: "
                f"served generation {rec['gen']} < acknowledged {gens[i][1]}",
            )
        # 2. the answer fits a state between the last acknowledgement and the answer
        store = rec["store"]
        states = self.state_window(store, host, rec["sent"], rec["recv"]) if store != MANUAL else {"ok"}
        allowed = set()
        for st in states:
            allowed |= _allowed(rec["kind"], st)
        if status not in allowed:
            self.violate(
                "fresh answer",
                f"{rec['kind']} {store} on host {host} sent {rec['sent']:.3f}: {status} {rec.get('message', '')!s} "
                f"but the store was {'/'.join(sorted(states))}",
            )
        # 3. a hand edit is visible 2 s after it was made (a fleet: undone within 2 s, and only there)
        if store == MANUAL and rec["kind"] == "config" and status == 200:
            if self.fleet:
                self._judge_undone(rec, host)
            elif self.edits:
                self._judge_seen(rec)

    def _judge_seen(self, rec: dict[str, Any]) -> None:
        j = bisect.bisect_right(self.edits, (rec["sent"] - HAND_EDIT_DEADLINE, "\uffff")) - 1
        if j >= 0:
            expected = self.edits[j][1]
            # an edit may show from its start on: its rename lands before the chaos actor logs ``t``
            later = {v for _, v, t0 in self.edits[j:] if t0 <= rec["recv"]}
            if rec.get("comment") not in later | {expected}:
                self.violate(
                    "hand edits seen",
                    f"config {MANUAL} sent {rec['sent']:.3f}: comment {rec.get('comment')!r}, "
                    f"expected {expected!r} (edited {rec['sent'] - self.edits[j][0]:.2f} s before)",
                )

    def _judge_undone(self, rec: dict[str, Any], host: int) -> None:
        comment = rec.get("comment")
        if comment == MANUAL_COMMENT:
            return
        for edit in self.fleet_edits:
            mine = edit.value == comment and edit.host == host and edit.t0 <= rec["recv"]
            if mine and self.undone_by(edit) >= rec["sent"]:
                return
        edits = [e for e in self.fleet_edits if e.value == comment]
        where = f"made on host {edits[0].host} at {edits[0].t:.3f}" if edits else "never made"
        self.violate(
            "hand edits undone",
            f"config {MANUAL} on host {host} sent {rec['sent']:.3f}: comment {comment!r} (a hand edit {where}), "
            f"not etcd's {MANUAL_COMMENT!r}",
        )

    def undone_by(self, edit: Edit) -> float:
        """When ``edit`` must be undone: 2 s after it, or 2 s after its host's manager came back
        (INF: not yet) when the manager was down in that time."""
        end = edit.t + HAND_EDIT_DEADLINE
        for killed, back in self.down[edit.host]:
            if killed <= end and back >= edit.t0:
                end = max(end, back + HAND_EDIT_DEADLINE)
        return end

    # -- the end --------------------------------------------------------------------------------------

    def final_file_check(self, cfg_file: Path, where: str | None = None) -> None:
        """The config file at the end (``where`` names it in the violations; default: its path)."""
        try:
            cfg = parse(read_raw(cfg_file), filename=str(cfg_file))
        except Exception as err:
            self.violate("no lost write", f"{where or cfg_file} does not parse at the end: {err}")
            return
        self.final_config_check(dict(cfg.items()), where)

    def final_config_check(self, cfg: dict[str, dict[str, Value]], where: str | None = None) -> None:
        """Every store's last acknowledged state (and comment) in ``cfg``; :data:`MANUAL`: the last hand
        edit (one host), etcd's text (a fleet: hand edits are undone)."""
        prefix = f"{where}: " if where else ""
        for store, history in self.acks.items():
            certain = max(i for i, ack in enumerate(history) if ack.recv != INF)
            possible = {history[certain].state} | {ack.state for ack in history if ack.recv == INF}
            props = cfg.get(store)
            if props is None:
                actual = "absent"
            else:
                raw = props.get("maintenance-mode")
                actual = "ok" if raw is None else MaintenanceMode.parse(str(raw)).type
            if actual not in possible:
                self.violate(
                    "no lost write",
                    f"{prefix}{store}: the file says {actual}, the last acknowledged write {history[certain].state}",
                )
        comments: dict[str, set[str]] = {}  # the last acknowledged comment, and cut-off ones after it
        for rec in self.writes:
            if rec["action"] != "comment":
                continue
            if rec["status"] == 200:
                comments[rec["store"]] = {rec["comment"]}
            elif rec["status"] == -1 or rec.get("uncertain"):
                comments.setdefault(rec["store"], set()).add(rec.get("comment") or "")
        for store, possible_comments in comments.items():
            actual_comment = str(cfg.get(store, {}).get("comment"))
            if actual_comment not in possible_comments and self.acks[store][-1].state != "absent":
                self.violate(
                    "no lost write",
                    f"{prefix}{store}: comment {actual_comment!r}, "
                    f"last acknowledged one of {sorted(possible_comments)}",
                )
        manual = cfg.get(MANUAL, {}).get("comment")
        if self.fleet and manual != MANUAL_COMMENT:
            self.violate(
                "hand edits undone", f"{prefix}{MANUAL}: comment {manual!r} at the end, not {MANUAL_COMMENT!r}"
            )
        elif not self.fleet and self.edits and manual != self.edits[-1][1]:
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
