"""datastore.cfg parsing and writing as an admin (or PBS) would see it."""

from __future__ import annotations

import pytest

from dsproxy import config
from dsproxy.config import ConfigError, MaintenanceMode, Operation, ParseError

PBS_FILE = (
    "datastore:   store1  \r\n"
    "\tcomment Main store with spaces\r\n"
    "\tgc-schedule daily\r\n"
    '\tmaintenance-mode type=read-only,message="disk swap, bay 3"\r\n'
    "\tpath /srv/datastores/store1\r\n"
    "\r\n"
    "datastore: store2\n"
    "\tpath /srv/datastores/store2\n"
    "\tmaintenance-mode offline\n"
    "\tverify-new yes\n"
    "\tkeep-last 3\n"
    "\ttuning chunk-order=inode,sync-level=filesystem\n"
    "\tnotify gc=always,verify=error\n"
    "\tnotify-user backup@pbs\n"
)


def test_pbs_written_file_parses_with_typed_values() -> None:
    cfg = config.parse(PBS_FILE)
    assert list(cfg) == ["store1", "store2"]
    assert cfg["store1"]["comment"] == "Main store with spaces"
    assert cfg["store1"]["path"] == "/srv/datastores/store1"
    assert cfg["store2"]["verify-new"] is True
    assert cfg["store2"]["keep-last"] == 3
    assert cfg["store2"]["maintenance-mode"] == "type=offline"
    mode = MaintenanceMode.parse(str(cfg["store1"]["maintenance-mode"]))
    assert mode == MaintenanceMode("read-only", "disk swap, bay 3")


def test_dump_is_canonical_and_round_trips() -> None:
    cfg = config.parse(PBS_FILE)
    text = config.dump(cfg)
    assert text.startswith("datastore: store1\n\tcomment Main store with spaces\n\tgc-schedule daily\n")
    assert "\n\ndatastore: store2\n\tkeep-last 3\n\tmaintenance-mode type=offline\n" in text
    assert "\tverify-new true\n" in text
    assert not text.endswith("\n\n")
    assert config.parse(text) == cfg
    assert config.dump(config.parse(text)) == text


def test_empty_and_missing_file_is_an_empty_config() -> None:
    assert config.parse("") == {}
    assert config.parse("\n\n  \n") == {}
    assert config.dump({}) == ""


def test_every_bad_line_is_reported_with_file_and_line() -> None:
    text = (
        "datastore: ab\n"  # 1 name too short
        "\tpath relative/dir\n"  # 2
        "\tfoo bar\n"  # 3 unknown key
        "\tkeep-last 0\n"  # 4
        "\tkeep-last 2\n"  # 5 duplicate key
        "\n"
        "datastore: good1\n"  # 7
        "\tpath /x\n"
        "\tverify-new maybe\n"  # 9
        "\n"
        "zfs: other\n"  # 11 unknown type
        "\tpath /y\n"
        "\n"
        "datastore: good1\n"  # 14 a duplicate section is fine (the last wins)...
        "\tpath z\n"  # 15 ...but this one's path is relative
    )
    with pytest.raises(ParseError) as info:
        config.parse(text, filename="/etc/dsproxy/datastore.cfg")
    err = info.value
    assert [line for line, _ in err.errors] == [1, 2, 3, 4, 5, 9, 11, 15]
    lines = str(err).splitlines()
    assert lines[0] == (
        'parsing "/etc/dsproxy/datastore.cfg" failed: line 1 - '
        "syntax error in section identifier: value must be at least 3 characters long"
    )
    assert "line 2 - property 'path': expected absolute path - got \"relative/dir\"" in lines[1]
    assert lines[2].endswith("line 3 - unknown property 'foo'")
    assert lines[3].endswith("line 4 - property 'keep-last': value must have a minimum value of 1 (got 0)")
    assert lines[4].endswith("line 5 - duplicate property 'keep-last'")
    assert lines[5].endswith("line 9 - property 'verify-new': Unable to parse boolean option.")
    assert lines[6].endswith("line 11 - unknown section type 'zfs'")
    assert lines[7].endswith("line 15 - property 'path': expected absolute path - got \"z\"")
    assert isinstance(err, ConfigError) and err.filename == "/etc/dsproxy/datastore.cfg"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("datastore: store1\n", 1, "property 'path' is missing and it is not optional."),
        ("datastore: store1\n\tcomment x\n\n", 3, "property 'path' is missing and it is not optional."),
        ("\tpath /x\n", 1, "syntax error (expected header)"),
        ("# comment\n", 1, "syntax error (expected header)"),
        ("datastore: store1\n\tpath /x\n\tverify-new\n", 3, "syntax error (expected section properties)"),
        (
            "datastore: store1\n\tpath /x\ndatastore: store2\n\tpath /y\n",
            3,
            "syntax error (expected section properties)",
        ),
        (
            "datastore: bad/name\n\tpath /x\n",
            1,
            "syntax error in section identifier: value does not match the regex pattern",
        ),
        (
            "datastore: " + "a" * 33 + "\n\tpath /x\n",
            1,
            "syntax error in section identifier: value may only be 32 characters long",
        ),
        (
            "datastore: store1\n\tpath /x\n\tcomment " + "c" * 129 + "\n",
            3,
            "property 'comment': value may only be 128 characters long",
        ),
        (
            "datastore: store1\n\tpath /x\n\tmaintenance-mode type=broken\n",
            3,
            "'type': value 'broken' is not defined in the enumeration.",
        ),
        (
            "datastore: store1\n\tpath /x\n\tmaintenance-mode type=offline,message=" + "m" * 65 + "\n",
            3,
            "value may only be 64 characters long",
        ),
        (
            "datastore: store1\n\tpath /x\n\ttuning chunk-order=random\n",
            3,
            "'chunk-order': value 'random' is not defined",
        ),
        ("datastore: store1\n\tpath /x\n\tkeep-daily seven\n", 3, "invalid integer value 'seven'"),
        (
            "datastore: store1\n\tpath /x\n\tnotify-user nobody\n",
            3,
            "property 'notify-user': value does not match the regex pattern",
        ),
        ("datastore: store1\n\tpath /x\n\tgc-schedule daily; rm -rf /\n", 3, "unable to parse calendar event"),
    ],
)
def test_bad_input_names_the_line_and_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        config.parse(text)
    assert any(n == line and reason in msg for n, msg in info.value.errors), info.value.errors


def test_header_without_blank_line_is_reported_and_the_next_section_still_parsed() -> None:
    with pytest.raises(ParseError) as info:
        config.parse("datastore: store1\n\tpath /x\ndatastore: store2\n\tpath /y\n\tbogus 1\n")
    # the missing blank line, then the unknown key of the *second* section (it was recognised)
    assert [n for n, _ in info.value.errors] == [3, 5]


def test_invalid_utf8_is_a_parse_error_with_its_line() -> None:
    with pytest.raises(ParseError) as info:
        config.parse(b"datastore: store1\n\tpath /x\n\tcomment caf\xe9\n")
    assert info.value.errors[0][0] == 3
    assert "invalid UTF-8" in info.value.errors[0][1]


def test_quoted_values_with_commas_quotes_and_backslashes_round_trip() -> None:
    mode = MaintenanceMode("offline", 'say "hi", then \\ leave')
    text = f"datastore: store1\n\tmaintenance-mode {mode}\n\tpath /x\n"
    cfg = config.parse(text)
    assert MaintenanceMode.parse(str(cfg["store1"]["maintenance-mode"])) == mode
    assert config.parse(config.dump(cfg)) == cfg


def test_dump_refuses_values_that_would_corrupt_the_file() -> None:
    with pytest.raises(ConfigError, match="comment"):
        config.dump({"store1": {"path": "/x", "comment": "two\nlines"}})
    with pytest.raises(ConfigError, match="path"):
        config.dump({"store1": {"comment": "no path"}})
    with pytest.raises(ConfigError, match="name"):
        config.dump({"x": {"path": "/x"}})


@pytest.mark.parametrize(
    ("mode", "read", "write", "lookup"),
    [
        ("type=read-only,message=disk swap", None, "read-only maintenance mode: disk swap", None),
        ("read-only", None, "read-only maintenance mode: ", None),
        (
            "type=offline,message=disk%20swap",
            "offline maintenance mode: disk swap",
            "offline maintenance mode: disk swap",
            None,
        ),
        ("unmount", "datastore is being unmounted", "datastore is being unmounted", None),
        ("delete", "datastore is being deleted", "datastore is being deleted", "datastore is being deleted"),
    ],
)
def test_maintenance_check_texts(mode: str, read: str | None, write: str | None, lookup: str | None) -> None:
    m = MaintenanceMode.parse(mode)
    assert m.check(Operation.READ) == read
    assert m.check(Operation.WRITE) == write
    assert m.check(Operation.LOOKUP) == lookup


def test_only_delete_may_follow_delete() -> None:
    delete = MaintenanceMode("delete")
    assert delete.allows_transition_to(MaintenanceMode("delete"))
    assert not delete.allows_transition_to(None)
    assert not delete.allows_transition_to(MaintenanceMode("offline"))
    assert MaintenanceMode("offline").allows_transition_to(None)
    assert MaintenanceMode("read-only").allows_transition_to(MaintenanceMode("delete"))


def test_check_section_validates_api_input() -> None:
    props = config.check_section("store1", {"path": " /srv/x ", "keep-last": "4", "verify-new": "on"})
    assert props == {"path": "/srv/x", "keep-last": 4, "verify-new": True}
    with pytest.raises(config.PropertyError) as info:
        config.check_section("store1", {"path": "/x", "gc-schedule": ""})
    assert info.value.key == "gc-schedule"
    assert str(info.value).startswith("parameter verification failed - 'gc-schedule':")
