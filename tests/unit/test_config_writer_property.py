"""Whatever a client sends, the manager's writer either acknowledges a write whose file parses to
exactly what it acknowledged, or refuses it with a 4xx and leaves the file byte-identical."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsproxy import config
from dsproxy.config import check_value
from dsproxy.daemon.writer import ConfigWriter, WriteRefused
from dsproxy.paths import Paths
from tests.unit.test_config_property import VALID, values

# every key but path (a random path would lay a store out anywhere on this machine)
KEYS = sorted(k for k in VALID if k != "path")
NAMES = st.sampled_from(["store1"] * 4 + ["store2"] * 2 + ["be2", "ab", "bad/name", "s" * 33])

_json_values = st.one_of(
    VALID["comment"],
    values,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)


def _value_for(key: str) -> st.SearchStrategy[Any]:
    return st.one_of(VALID[key], VALID[key], VALID[key], _json_values)


bodies = st.lists(st.sampled_from(KEYS), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: _value_for(k) for k in keys})
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), NAMES, bodies, st.just([])),
        st.tuples(st.just("update"), NAMES, bodies, st.lists(st.sampled_from([*KEYS, "path", "bogus"]), max_size=2)),
    ),
    min_size=1,
    max_size=6,
).map(lambda ops: [("create", "store1", {}, []), *ops])


def _expected(key: str, value: Any) -> Any:
    """What an acknowledged value must read back as: the schema's typed value of the text."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int):
        value = str(value)
    return check_value(key, value.strip() if isinstance(value, str) else value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_acknowledged_writes_read_back_and_refused_ones_change_nothing(
    ops: list[tuple[str, str, dict[str, Any], list[str]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths.resolve(Path(tmp))
        paths.ensure()
        writer = ConfigWriter(paths, segment=lambda: None)
        for kind, name, body, delete in ops:
            before = writer.config_file.read_bytes() if writer.config_file.exists() else None
            try:
                if kind == "create":
                    result = writer.create({"name": name, **body})
                else:
                    result = writer.update(name, {**body, **({"delete": delete} if delete else {})})
            except WriteRefused as err:
                assert 400 <= err.status < 500, err.message
                after = writer.config_file.read_bytes() if writer.config_file.exists() else None
                assert after == before
                continue
            data = writer.config_file.read_bytes()
            assert config.digest(data) == result.digest
            section = config.parse(data)[name]
            for key, value in body.items():
                assert section[key] == _expected(key, value), (key, value)
            for key in delete:
                if key not in body:
                    assert key not in section
