"""What the fd limit means for a store count, in the words an operator reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from dsproxy.config import parse
from dsproxy.daemon import limits
from dsproxy.daemon.limits import FD_RESERVE, FdLimit


def test_enough_and_short_limits_name_their_numbers() -> None:
    ok = FdLimit(soft=20000, hard=20000, stores=1000)
    assert ok.enough and ok.needed == 1000 + FD_RESERVE and ok.budget == 20000 - FD_RESERVE
    short = FdLimit(soft=20000, hard=20000, stores=30000)
    assert not short.enough and short.needed == 30000 + FD_RESERVE
    text = short.describe()
    assert "RLIMIT_NOFILE 20000/20000" in text and f"{30000 + FD_RESERVE} needed for 30000 datastores" in text
    assert f"at most {20000 - FD_RESERVE} datastores can be open at once" in text and "LimitNOFILE" in text
    assert FdLimit(soft=100, hard=100, stores=0).budget == 0  # below the reserve: nothing, never negative


def test_check_at_start_raises_the_soft_limit_and_warns_with_the_numbers(tmp_path: Path) -> None:
    cfg = tmp_path / "datastore.cfg"
    cfg.write_text("".join(f"datastore: s{i:04d}\n\tpath /srv/s{i:04d}\n\n" for i in range(300)))
    code = textwrap.dedent(
        f"""
        import logging, resource, sys
        from dsproxy.daemon import limits
        logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
        limit = limits.check_at_start({str(cfg)!r}, logging.getLogger("t"))
        print("SOFT", resource.getrlimit(resource.RLIMIT_NOFILE)[0], limit.enough)
        """
    )
    # a child with a soft limit of 100 and a hard one of 500 (what a container may give)
    result = subprocess.run(
        ["prlimit", "--nofile=100:500", "--", sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "SOFT 500 False" in result.stdout
    warning = next(line for line in result.stdout.splitlines() if line.startswith("WARNING"))
    assert "RLIMIT_NOFILE 500/500" in warning and f"below the {300 + FD_RESERVE} needed for 300" in warning
    assert "soft raised from 100" in warning


def test_the_start_counts_the_sections_without_parsing_as_the_parser_does() -> None:
    text = (
        b"datastore: aaa\n\tpath /srv/a\n\tcomment datastore: in a value\n\n"
        b"datastore :bbb\n\tpath /srv/b\n\n"
        b"datastore: ccc\n\tpath /srv/c\n"
    )
    assert limits.count_sections(text) == len(parse(text)) == 3
    assert limits.count_sections(b"") == 0
