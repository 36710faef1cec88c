"""The stress checker (dsproxy.testing.stress.checker) judges answers right: it flags stale ones
and forgives what concurrency allows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsproxy.testing.stress.checker import Checker


class Logs:
    def __init__(self, base: Path) -> None:
        self.dir = base / "logs"
        self.dir.mkdir(parents=True)

    def add(self, name: str, **record: Any) -> None:
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(
        self, store: str, sent: float, recv: float, state: str | None, gen: int, action: str = "maintenance"
    ) -> None:
        self.add("writer.jsonl", phase="start", action=action, store=store, sent=sent, state=state)
        self.add("writer.jsonl", action=action, store=store, sent=sent, recv=recv, status=200, gen=gen, state=state)

    def answer(
        self, kind: str, store: str, sent: float, recv: float, status: int, gen: int | None = 10, **extra: Any
    ) -> None:
        self.add("client-1.jsonl", kind=kind, store=store, sent=sent, recv=recv, status=status, gen=gen, **extra)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Logs, Checker]:
    logs = Logs(tmp_path)
    checker = Checker(tmp_path, {"st01": "ok", "vol01": "absent"})
    return logs, checker


def test_an_answer_granted_after_an_offline_transition_returned_is_a_violation(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.write("st01", sent=1.0, recv=1.5, state="offline", gen=11)
    logs.answer("status", "st01", sent=1.6, recv=1.7, status=200, gen=11)
    checker.poll(final=True)
    assert list(checker.violations) == ["fresh answer"]
    assert "but the store was offline" in checker.violations["fresh answer"][0]


def test_an_answer_in_flight_with_the_write_may_show_either_state(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.write("st01", sent=1.0, recv=1.5, state="offline", gen=11)
    logs.answer("status", "st01", sent=1.2, recv=1.3, status=200, gen=10)
    logs.answer("status", "st01", sent=1.2, recv=1.4, status=409, gen=11)
    checker.poll(final=True)
    assert not checker.violations


def test_a_hand_edit_may_show_from_its_start_and_must_show_2_s_after_it_ended(setup: tuple[Logs, Checker]) -> None:
    """An answer may show an edit still being written (its rename lands before the chaos actor
    logs the end: a run in CI flagged that); one sent 2 s after an edit ended must show it or a
    later one."""
    logs, checker = setup
    logs.add("chaos.jsonl", event="edit", value="hand edit 1", t0=1.0, t=1.01)
    logs.add("chaos.jsonl", event="edit", value="hand edit 2", t0=3.5, t=3.52)
    logs.answer("config", "manual01", sent=3.49, recv=3.51, status=200, comment="hand edit 2")  # in flight: fine
    logs.answer("config", "manual01", sent=3.2, recv=3.3, status=200, comment="initial")  # edit 1 ended 2.19 s before
    checker.poll(final=True)
    assert list(checker.violations) == ["hand edits seen"]
    assert len(checker.violations["hand edits seen"]) == 1 and "sent 3.200" in checker.violations["hand edits seen"][0]


def test_a_generation_older_than_an_acknowledged_write_is_a_violation(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.write("st01", sent=1.0, recv=1.5, state=None, gen=11, action="comment")
    logs.answer("status", "st01", sent=1.6, recv=1.7, status=200, gen=10)
    checker.poll(final=True)
    assert list(checker.violations) == ["fresh generation"]


def test_a_created_store_must_be_found_and_a_removed_one_gone(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.write("vol01", sent=1.0, recv=1.1, state="ok", gen=11, action="create")
    logs.answer("status", "vol01", sent=1.2, recv=1.3, status=200, gen=11)
    logs.write("vol01", sent=2.0, recv=2.1, state="absent", gen=12, action="remove")
    logs.answer("status", "vol01", sent=2.2, recv=2.3, status=200, gen=12)
    checker.poll(final=True)
    assert len(checker.violations["fresh answer"]) == 1


def test_connection_errors_are_forgiven_only_around_a_worker_kill(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.add("chaos.jsonl", event="kill", pid=1, t=5.0)
    logs.answer("status", "st01", sent=5.1, recv=5.2, status=-1, error="ConnectionResetError", prev=4.0)
    logs.answer("status", "st01", sent=9.0, recv=9.1, status=-1, error="ConnectionResetError", prev=8.0)
    checker.poll(final=True)
    assert len(checker.violations["no unexpected error"]) == 1
    assert checker.counts["connection errors (worker killed)"] == 1


def test_answers_are_judged_only_once_every_write_before_them_is_known(setup: tuple[Logs, Checker]) -> None:
    logs, checker = setup
    logs.add("writer.jsonl", phase="start", action="maintenance", store="st01", sent=1.0, state="ok")
    logs.answer("status", "st01", sent=3.0, recv=3.1, status=409, gen=12)  # a later write may explain it
    checker.poll()
    assert checker.checked == 0 and not checker.violations
    logs.add("writer.jsonl", action="maintenance", store="st01", sent=1.0, recv=1.1, status=200, gen=11, state="ok")
    logs.write("st01", sent=2.9, recv=3.2, state="offline", gen=12)
    checker.poll(final=True)
    assert checker.checked == 1 and not checker.violations


def test_the_file_must_hold_the_last_acknowledged_state(setup: tuple[Logs, Checker], tmp_path: Path) -> None:
    logs, checker = setup
    logs.write("st01", sent=1.0, recv=1.5, state="offline", gen=11)
    checker.poll(final=True)
    cfg = tmp_path / "datastore.cfg"
    cfg.write_text("datastore: st01\n\tpath /x/st01\n")
    checker.final_file_check(cfg)
    assert "st01: the file says ok, the last acknowledged write offline" in checker.violations["no lost write"][0]


def test_a_repeat_that_meets_a_cut_off_create_is_forgiven_but_a_plain_409_is_not(setup: tuple[Logs, Checker]) -> None:
    """At 100,000 stores a create cut off by a worker kill may land after the writer looked: the
    repeat's 409 'already exists' is that create, not an error -- unless nothing was cut off."""
    logs, checker = setup
    logs.add("chaos.jsonl", event="kill", pid=1, t=2.0)
    logs.add("writer.jsonl", phase="start", action="create", store="vol01", sent=1.9, state="ok")
    logs.add("writer.jsonl", action="create", store="vol01", sent=1.9, recv=2.1, status=-1, error="RemoteDisconnected")
    logs.add("writer.jsonl", phase="start", action="create", store="vol01", sent=3.0, state="ok")
    logs.add("writer.jsonl", action="create", store="vol01", sent=3.0, recv=3.1, status=409,
             message="datastore 'vol01' already exists.")  # fmt: skip
    logs.add("writer.jsonl", phase="start", action="create", store="vol01", sent=4.0, state="ok")
    logs.add("writer.jsonl", action="create", store="vol01", sent=4.0, recv=4.1, status=409,
             message="datastore 'vol01' already exists.")  # fmt: skip
    checker.poll(final=True)
    assert checker.counts["repeat met a cut-off write that landed"] == 1
    assert list(checker.violations) == ["no unexpected error"]  # the second 409 had no cut-off write before it


# -- a fleet (scripts/stress --fleet N): each record names its host ------------------------------------------


class FleetLogs(Logs):
    def write_on(
        self, host: int, store: str, sent: float, recv: float, state: str | None, gen: int, **extra: Any
    ) -> None:
        action = extra.pop("action", "maintenance")
        self.add("writer.jsonl", phase="start", action=action, store=store, host=host, sent=sent, state=state)
        self.add("writer.jsonl", action=action, store=store, host=host, sent=sent, recv=recv, status=200, gen=gen,
                 state=state, **extra)  # fmt: skip

    def refused_on(
        self, host: int, store: str, sent: float, status: int, message: str, action: str = "comment"
    ) -> None:
        self.add("writer.jsonl", phase="start", action=action, store=store, host=host, sent=sent, state=None)
        self.add("writer.jsonl", action=action, store=store, host=host, sent=sent, recv=sent + 0.1, status=status,
                 message=message)  # fmt: skip

    def answer_on(
        self, host: int, kind: str, store: str, sent: float, status: int, gen: int = 10, **extra: Any
    ) -> None:
        self.add("client-1.jsonl", kind=kind, store=store, host=host, sent=sent, recv=sent + 0.1, status=status,
                 gen=gen, **extra)  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[FleetLogs, Checker]:
    return FleetLogs(tmp_path), Checker(tmp_path, {"st01": "ok", "vol01": "absent", "manual01": "ok"}, hosts=3)


def test_a_fleet_wide_offline_transition_holds_on_every_host_it_waited_for(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.write_on(0, "st01", sent=1.0, recv=1.5, state="offline", gen=11, revision=40, lagging=["host2"])
    logs.answer_on(1, "lease-read", "st01", sent=1.6, status=200)  # host1 was waited for: a violation
    logs.answer_on(2, "lease-read", "st01", sent=1.6, status=200)  # host2 was named lagging: may be behind
    logs.answer_on(0, "lease-read", "st01", sent=1.6, status=409, gen=11)
    checker.poll(final=True)
    assert list(checker.violations) == ["fresh answer"]
    assert "on host 1" in checker.violations["fresh answer"][0]


def test_a_host_whose_manager_was_down_around_a_transition_is_not_held_to_it(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.add("fleet-chaos.jsonl", event="manager-kill", host=1, t=0.5)
    logs.add("fleet-chaos.jsonl", event="manager-up", host=1, t=0.9)  # within FLEET_GRACE before the write
    logs.write_on(0, "st01", sent=1.0, recv=1.5, state="offline", gen=11, revision=40, lagging=[])
    logs.answer_on(1, "lease-read", "st01", sent=1.6, status=200)
    logs.answer_on(2, "lease-read", "st01", sent=1.6, status=200)
    checker.poll(final=True)
    assert len(checker.violations["fresh answer"]) == 1 and "on host 2" in checker.violations["fresh answer"][0]


def test_a_plain_write_holds_at_once_only_on_the_host_that_acknowledged_it(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.write_on(0, "st01", sent=1.0, recv=1.1, state="read-only", gen=11, revision=40)
    logs.answer_on(1, "lease-write", "st01", sent=1.2, status=200)  # host1's watch may not have it yet
    logs.answer_on(0, "lease-write", "st01", sent=1.2, status=200, gen=11)  # host0 answered it: a violation
    checker.poll(final=True)
    assert list(checker.violations) == ["fresh answer"] and "on host 0" in checker.violations["fresh answer"][0]


def test_generations_are_judged_per_host(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.write_on(0, "st01", sent=1.0, recv=1.1, state=None, gen=50, action="comment", revision=40)
    logs.answer_on(1, "status", "st01", sent=1.2, status=200, gen=12)  # host1 counts its own generations
    logs.answer_on(0, "status", "st01", sent=1.2, status=200, gen=49)
    checker.poll(final=True)
    assert list(checker.violations) == ["fresh generation"] and "on host 0" in checker.violations["fresh generation"][0]


def test_a_hand_edit_is_undone_on_its_host_and_never_seen_on_another(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.add("chaos.jsonl", event="edit", value="hand edit 1", host=1, t0=1.0, t=1.01)
    logs.add("writer.jsonl", phase="start", action="comment", store="st01", host=0, sent=9.0, state=None)
    logs.answer_on(1, "config", "manual01", sent=1.5, status=200, comment="hand edit 1")  # not undone yet: fine
    logs.answer_on(1, "config", "manual01", sent=4.0, status=200, comment="hand edit 1")  # 3 s later: a violation
    logs.answer_on(2, "config", "manual01", sent=1.5, status=200, comment="hand edit 1")  # another host: a violation
    logs.answer_on(2, "config", "manual01", sent=1.5, status=200, comment="initial")
    checker.poll(final=True)
    found = checker.violations["hand edits undone"]
    assert len(found) == 2 and "on host 1 sent 4.000" in found[0] and "on host 2" in found[1]


def test_a_hand_edit_on_a_host_whose_manager_is_down_lasts_until_it_is_back(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.add("fleet-chaos.jsonl", event="manager-kill", host=1, t=0.9)
    logs.add("chaos.jsonl", event="edit", value="hand edit 1", host=1, t0=1.0, t=1.01)
    logs.add("fleet-chaos.jsonl", event="manager-up", host=1, t=5.0)
    logs.add("writer.jsonl", phase="start", action="comment", store="st01", host=0, sent=9.0, state=None)
    logs.answer_on(1, "config", "manual01", sent=6.5, status=200, comment="hand edit 1")
    logs.answer_on(1, "config", "manual01", sent=7.5, status=200, comment="hand edit 1")
    checker.poll(final=True)
    assert (
        len(checker.violations["hand edits undone"]) == 1 and "sent 7.500" in checker.violations["hand edits undone"][0]
    )


def test_a_fleet_refuses_what_a_host_behind_cannot_know_and_only_that(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.write_on(0, "vol01", sent=1.0, recv=1.1, state="ok", gen=11, action="create", revision=40)
    logs.write_on(0, "vol01", sent=2.0, recv=2.1, state="absent", gen=12, action="remove", revision=41)
    logs.refused_on(1, "vol01", 2.2, 409, "datastore 'vol01' already exists.", "create")  # host1 still has it
    logs.refused_on(0, "vol01", 2.4, 409, "datastore 'vol01' already exists.", "create")  # host0 removed it itself
    logs.refused_on(2, "st01", 2.6, 409, "datastore 'st01' was changed on another host (...); read it again")
    logs.refused_on(2, "st01", 2.8, 503, "the manager is not running (x: Connection refused)")  # it was running
    checker.poll(final=True)
    found = checker.violations["no unexpected error"]
    assert len(found) == 2 and "create vol01 on host 0: 409" in found[0] and "st01 on host 2: 503" in found[1]
    assert checker.counts["creates/removes refused by the host's state (behind)"] == 1


def test_a_write_cut_off_by_a_manager_kill_may_or_may_not_have_landed(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.add("fleet-chaos.jsonl", event="manager-kill", host=1, t=1.05)
    logs.add("writer.jsonl", phase="start", action="maintenance", store="st01", host=1, sent=1.0, state="offline")
    logs.add("writer.jsonl", action="maintenance", store="st01", host=1, sent=1.0, recv=1.1, status=503,
             message="the manager closed the connection: ...")  # fmt: skip
    logs.answer_on(2, "lease-read", "st01", sent=1.5, status=409)
    logs.answer_on(2, "lease-read", "st01", sent=1.6, status=200)
    checker.poll(final=True)
    assert not checker.violations and checker.counts["writes cut off (the host's manager was killed)"] == 1
    checker.final_config_check(
        {"st01": {"maintenance-mode": "type=offline"}, "manual01": {"comment": "initial"}}, "etcd"
    )
    assert not checker.violations


def test_the_end_of_a_fleet_holds_etcd_s_text_of_the_hand_edited_store(fleet: tuple[FleetLogs, Checker]) -> None:
    logs, checker = fleet
    logs.add("chaos.jsonl", event="edit", value="hand edit 1", host=1, t0=1.0, t=1.01)
    checker.poll(final=True)
    checker.final_config_check({"st01": {}, "manual01": {"comment": "hand edit 1"}}, "host1 datastore.cfg")
    assert checker.violations["hand edits undone"] == [
        "host1 datastore.cfg: manual01: comment 'hand edit 1' at the end, not 'initial'"
    ]
