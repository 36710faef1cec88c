from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import Daemons
from tests.helpers import Agent, Instance


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    """A fresh instance directory; its shared memory (named after the run dir) is unlinked after."""
    instance = Instance(tmp_path / "base")
    try:
        yield instance
    finally:
        instance.cleanup()


@pytest.fixture
def agents(inst: Instance) -> Iterator[Callable[..., Agent]]:
    """Factory of child processes with their own Registry; all are stopped after the test."""
    with contextlib.ExitStack() as started:

        def start(**registry_args: Any) -> Agent:
            agent = Agent(inst.base, **registry_args)
            started.callback(agent.close)
            return agent

        yield start


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """A running manager + proxy (2 workers, 5 demo stores); stopped and cleaned up after."""
    with Daemons(tmp_path / "base") as d:
        yield d.start()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemons]]:
    """Daemons with other options; the test starts them (start_manager/start_proxy)."""
    numbers = itertools.count()
    with contextlib.ExitStack() as made:
        yield lambda **kwargs: made.enter_context(Daemons(tmp_path / f"base{next(numbers)}", **kwargs))
