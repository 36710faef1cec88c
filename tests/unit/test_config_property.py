"""Whatever bytes it is given, the parser answers with a config or a ConfigError -- nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsproxy import config
from dsproxy.config import ConfigError

KEYS = ["path", "comment", "gc-schedule", "keep-last", "verify-new", "maintenance-mode", "tuning", "notify", "bogus"]
VALUES = [
    "/srv/a",
    "relative",
    "daily",
    "3",
    "0",
    "yes",
    "maybe",
    "offline",
    'type=read-only,message="a, b"',
    "type=offline,message=x\\y",
    "chunk-order=inode",
    "gc=always",
    "",
    " ",
    '"',
]

line = st.one_of(
    st.builds(lambda n: f"datastore: {n}", st.text(min_size=0, max_size=40)),
    st.builds(lambda n: f"datastore: {n}", st.sampled_from(["store1", "store2", "ab", "s" * 33])),
    st.builds(
        lambda ws, k, v: f"{ws}{k} {v}",
        st.sampled_from(["\t", " ", "  \t"]),
        st.sampled_from(KEYS),
        st.sampled_from(VALUES),
    ),
    st.builds(lambda k, v: f"\t{k} {v}", st.text(max_size=12), st.text(max_size=30)),
    st.sampled_from(["", " ", "\t", "#", ":", "x:", "datastore:", "\r"]),
)
documents = st.lists(line, max_size=30).map("\n".join)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_parse_or_raise_config_error(data: bytes) -> None:
    try:
        cfg = config.parse(data)
    except ConfigError as err:
        assert err.errors and all(isinstance(n, int) and isinstance(m, str) for n, m in err.errors)
        return
    assert config.parse(config.dump(cfg)) == cfg


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_structured_documents_round_trip(text: str) -> None:
    try:
        cfg = config.parse(text)
    except ConfigError as err:
        lines = text.split("\n")
        assert all(1 <= n <= max(len(lines), 1) for n, _ in err.errors), (err.errors, len(lines))
        return
    again = config.parse(config.dump(cfg))
    assert again == cfg
    assert config.dump(again) == config.dump(cfg)
