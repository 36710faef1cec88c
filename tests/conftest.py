from __future__ import annotations

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
    started: list[Agent] = []

    def start(**registry_args: Any) -> Agent:
        agent = Agent(inst.base, **registry_args)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """A running manager + proxy (2 workers, 5 demo stores); stopped and cleaned up after."""
    d = Daemons(tmp_path / "base")
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemons]]:
    """Daemons with other options; the test starts them (start_manager/start_proxy)."""
    made: list[Daemons] = []

    def make(**kwargs: Any) -> Daemons:
        d = Daemons(tmp_path / f"base{len(made)}", **kwargs)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop()
