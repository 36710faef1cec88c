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
