"""scripts/stress runs end to end: real daemons, chaos, and a verdict it can back up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_script


def test_a_short_heavy_stress_run_holds_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    result = run_script("stress", "--duration", "6", "--chaos", "heavy", "--json", out)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(out.read_text())
    assert summary["violations"] == {}
    counts = summary["counts"]
    assert summary["answers_checked"] > 500
    assert counts["workers killed"] >= 1 and counts["hand edits"] >= 1
    assert counts["write maintenance"] >= 1 and counts["write create"] >= 1
    for name in ("fresh generation", "fresh answer", "no lost write", "operations drain", "workers alive"):
        assert name in result.stdout


@pytest.mark.timeout(120)
def test_a_short_heavy_stress_run_of_a_fleet_holds_every_invariant(tmp_path: Path) -> None:
    """3 hosts on a 3-member etcd cluster: clients and writes to random hosts, workers, managers and
    etcd members (the leader among them) killed and restarted; every invariant, fleet-wide."""
    out = tmp_path / "stress.json"
    result = run_script("stress", "--fleet", "3", "--duration", "10", "--chaos", "heavy", "--json", out)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(out.read_text())
    assert summary["violations"] == {} and summary["fleet"] == 3
    counts = summary["counts"]
    assert summary["answers_checked"] > 500
    assert counts["workers killed"] >= 1 and counts["hand edits"] >= 1 and counts["managers killed"] >= 1
    assert counts.get("etcd members killed", 0) + counts.get("etcd leaders killed", 0) >= 1
    assert counts["write maintenance"] >= 1 and counts["write create"] >= 1
    for name in ("hand edits undone", "hosts converge", "fresh answer", "no lost write"):
        assert name in result.stdout
