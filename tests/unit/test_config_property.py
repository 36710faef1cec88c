"""Whatever bytes it is given, the parser answers with a config or a ConfigError -- nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsproxy import config
from dsproxy.config import ConfigError, MaintenanceMode, section
from dsproxy.config.schema import MAINTENANCE_TYPES
from dsproxy.daemon.kept import canonical_text

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


# -- values: every kind the schema has, and what breaks naive checkers --------------------------------

_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["9" * 5000, "-" + "1" * 4400, "+5", "0x10", "1_000", "٣", "1e3", " 7", "\uff17"]),
)
_control = st.text(alphabet=st.characters(max_codepoint=0x9F), max_size=12)
_surrogates = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
_quoting = st.text(alphabet='"\\,=n abc\t', max_size=16)
_unicode = st.text(max_size=20)
_calendar = st.lists(
    st.sampled_from(
        ["mon", "fri", "..", ",", ":", "*", "/", "0", "2", "15", "24", "60", " ", "UTC", "-", "2024", "daily"]
    ),
    max_size=8,
).map("".join)
_sizes = st.builds(
    lambda n, sp, u: f"{n}{sp}{u}",
    st.sampled_from(["1", "1.5", "64", "-1", "inf", ".5", "1e3", "9" * 400]),
    st.sampled_from(["", " ", "\n"]),
    st.sampled_from(["", "b", "KiB", "gib", "TB", "iB", "x", "P"]),
)
_sub_keys = [
    "type", "message", "client", "bucket", "max-cache-size", "chunk-order", "gc-atime-cutoff",
    "s3-get", "s3-upload", "gc", "bogus",
]  # fmt: skip
_atoms = st.one_of(
    _ints, _quoting, _calendar, _sizes, _surrogates,
    st.sampled_from(["s3", "filesystem", "offline", "read-only", "s3-refresh", "inode", "always", "minio01", "bkt01"]),
)  # fmt: skip
_property_strings = st.lists(
    st.builds(
        lambda k, v, quote: f"{k}={v}" if quote is None else f'{k}="{v.replace(chr(34), quote)}"',
        st.sampled_from(_sub_keys),
        _atoms,
        st.sampled_from([None, '\\"', "", '"']),
    )
    | _atoms,
    max_size=5,
).map(",".join)
values = st.one_of(_ints, _control, _surrogates, _quoting, _unicode, _calendar, _sizes, _property_strings)
VALUE_KEYS = [
    "comment", "gc-schedule", "prune-schedule", "counter-reset-schedule", "keep-last", "keep-daily",
    "verify-new", "notify-user", "notify", "notification-mode", "tuning", "maintenance-mode",
    "backing-device", "gc-on-unmount", "backend", "notification-thresholds", "path",
]  # fmt: skip


_text = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=40)
_messages = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=64)
_good_sizes = st.builds(
    lambda n, sp, u: f"{n}{sp}{u}",
    st.sampled_from(["1", "1.5", "64", ".5", "1e3", "0"]),
    st.sampled_from(["", " "]),
    st.sampled_from(["", "b", "KiB", "gib", "TB", "k", "P", "Mi"]),
)
_positive = st.integers(min_value=1, max_value=2**63 - 1).map(str)
VALID: dict[str, st.SearchStrategy[str]] = {
    "comment": _text,
    "gc-schedule": st.sampled_from(["daily", "mon..fri 02:30", "*:0/15", "sat 18:15", "2024-01-01", "0 UTC"]),
    "prune-schedule": _calendar,
    "counter-reset-schedule": st.sampled_from(["monthly", "1..7,15 4:00", "*-*-1"]),
    "keep-last": _positive,
    "keep-daily": _positive,
    "verify-new": st.sampled_from(["1", "0", "Yes", "off", "TRUE"]),
    "gc-on-unmount": st.sampled_from(["on", "false"]),
    "notify-user": st.sampled_from(["backup@pbs", "a@b@pbs", "root@pam"]),
    "notify": st.sampled_from(["gc=always,verify=error", "prune=never", ""]),
    "notification-mode": st.sampled_from(["legacy-sendmail", "notification-system"]),
    "tuning": st.builds(
        lambda c, a: f"chunk-order={c},gc-atime-cutoff={a}", st.sampled_from(["none", "inode"]), st.integers(1, 2880)
    ),
    "maintenance-mode": st.builds(
        lambda t, m: str(MaintenanceMode(t, m)), st.sampled_from(MAINTENANCE_TYPES), _messages
    ),
    "backing-device": st.just("6c2d6f4e-8a4b-4d38-9d5c-3e2f0c1a7b90"),
    "backend": st.one_of(
        st.just("filesystem"),
        st.builds(lambda size: f"type=s3,client=minio01,bucket=bkt-01,max-cache-size={size}", _good_sizes),
    ),
    "notification-thresholds": st.builds(
        lambda n, size: f"s3-get={n},s3-upload={size}", st.integers(0, 2**63 - 1), _good_sizes
    ),
    "path": st.sampled_from(["/srv/x", "on/device", "/"]),
}


@st.composite
def valued_documents(draw: st.DrawFn) -> str:
    sections = []
    for i in range(draw(st.integers(min_value=1, max_value=3))):
        lines = [f"datastore: store{i}"]
        path = draw(st.sampled_from(["/srv/s"] * 6 + ["rel/s", None]))
        if path is not None:
            lines.append(f"\tpath {path}")
        for key in draw(st.lists(st.sampled_from(VALUE_KEYS), max_size=4, unique=True)):
            value = draw(VALID[key]) if draw(st.integers(0, 7)) else draw(values)
            lines.append(f"\t{key} {value}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(valued_documents())
def test_any_values_parse_or_raise_a_config_error_and_what_parses_writes_back(text: str) -> None:
    try:
        cfg = config.parse(text)
    except ConfigError as err:
        assert isinstance(err, config.ParseError)
        assert err.errors and all(isinstance(n, int) and isinstance(m, str) for n, m in err.errors)
        str(err).encode("utf-8")  # printable by `dsproxy config check`, whatever the value held
        return
    dumped = config.dump(cfg)  # whatever the parser accepts, the writer accepts
    assert config.parse(dumped) == cfg
    assert config.dump(config.parse(dumped)) == dumped


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALUE_KEYS).flatmap(lambda k: st.tuples(st.just(k), VALID[k] | values)))
def test_the_api_checker_and_the_file_agree_on_every_value(item: tuple[str, str]) -> None:
    key, value = item
    try:
        typed = config.check_section("store1", {"path": "/srv/s", key: value} if key != "path" else {key: value})
    except config.PropertyError:
        return
    assert config.parse(config.dump({"store1": typed})) == {"store1": typed}


# -- the fast path of parse() and the full parser agree ------------------------------------------------


def _full(text: str) -> config.SectionConfig | None:
    try:
        return section._Parser("datastore.cfg").feed(text)
    except ConfigError:
        return None


def _agree(text: str) -> None:
    fast = section._fast(text)
    if fast is None:
        return  # the full parser decides
    full = _full(text)
    assert full is not None, "the fast path accepted what the full parser refuses"
    assert list(fast.items()) == list(full.items()) and fast.duplicates == full.duplicates


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_the_fast_path_accepts_nothing_the_full_parser_reads_otherwise(text: str) -> None:
    _agree(text)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(valued_documents())
def test_what_parses_renders_canonically_without_a_second_check(text: str) -> None:
    cfg = _full(text)
    if cfg is None:
        return
    for name, props in cfg.items():  # the manager keeps a hand-edited file's texts this way
        assert canonical_text(name, props) == section.render_section(name, props)[0].encode()


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(valued_documents())
def test_the_fast_path_agrees_on_every_kind_of_value(text: str) -> None:
    _agree(text)
    cfg = _full(text)
    if cfg is not None:  # what dsproxy writes takes the fast path (else its speed is lost unnoticed)
        canonical = config.dump(cfg)
        assert section._fast(canonical) == cfg
        _agree(canonical)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(valued_documents(), st.lists(st.integers(min_value=0), max_size=6))
def test_parse_values_reads_the_pieces_as_the_joined_file(text: str, cuts: list[int]) -> None:
    """Fleet mode's first read parses etcd's values in turn (section.parse_values): whatever it
    takes is what the joined file parses to, and a canonical file cut at its sections takes it."""
    data = text.encode("utf-8", "surrogatepass")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    joined = b"\n".join(pieces)  # (each joint a line break more: the pieces are files of their own)
    got = section.parse_values(pieces)
    if got is not None:
        full = _full(joined.decode("utf-8", "surrogatepass"))
        assert full is not None and list(got.items()) == list(full.items()) and got.duplicates == full.duplicates
    cfg = _full(text)
    if cfg:
        sections = [config.dump({n: p}).encode() for n, p in cfg.items()]
        taken = section.parse_values(sections)
        assert taken is not None and list(taken.items()) == list(cfg.items())


def test_parse_values_leaves_a_carriage_return_or_bad_utf8_to_the_full_parser() -> None:
    good = b"datastore: store1\n\tpath /srv/a\n"
    assert section.parse_values([good]) == {"store1": {"path": "/srv/a"}}
    assert section.parse_values([good, b"datastore: store2\r\n\tpath /srv/b\n"]) is None
    assert section.parse_values([good, b"datastore: store2\n\tcomment \xff\n\tpath /srv/b\n"]) is None


_ODD_SPACE = ["", " ", "  ", "\t", "\xa0", "\x1c", "\u2028", "\x85"]


def _mostly(draw: st.DrawFn, plain: str, odd: list[str]) -> str:
    """``plain`` nine times in ten, else one of ``odd``: most files stay plain, many do not."""
    return plain if draw(st.integers(0, 9)) else draw(st.sampled_from(odd))


@st.composite
def near_canonical(draw: st.DrawFn) -> str:
    """Canonical-looking files with white space of every kind where the grammar trims or splits."""
    props = [("comment", "a b"), ("comment", ""), ("gc-schedule", "daily"), ("keep-last", "3"), ("notify", "x")]
    out = []
    for i in range(draw(st.integers(min_value=1, max_value=3))):
        name = _mostly(draw, f"store{i}", ["store0", "ab", "s" * 33, "store 1", "store1:"])
        header = _mostly(draw, "datastore: {}", ["datastore:  {}", "datastore : {}", "datastore:{}", "Datastore: {}"])
        lines = [header.format(name) + _mostly(draw, "", _ODD_SPACE)]
        for key, value in [("path", "/srv/s"), *draw(st.lists(st.sampled_from(props), max_size=3))]:
            lead = _mostly(draw, "\t", [" ", "\t\t", "\t ", "\xa0"])
            sep = _mostly(draw, " ", ["  ", "\t", "\xa0", "\x1c", ""])
            tail = _mostly(draw, "", [" ", "\t", "\xa0", "  "])
            lines.append(f"{lead}{key}{sep}{value}{tail}")
        out.append("\n".join(lines))
    blank = _mostly(draw, "\n\n", ["\n \n", "\n\t\n", "\n\n\n", "\r\n\r\n", "\n"])
    return blank.join(out) + _mostly(draw, "", ["\n", "\n\n", " "])


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(near_canonical())
def test_the_fast_path_agrees_on_white_space_of_every_kind(text: str) -> None:
    _agree(text)
