"""scripts/stress runs end to end: real daemons, chaos, and a verdict it can back up."""

from __future__ import annotations

import json
from pathlib import Path

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
