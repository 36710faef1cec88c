"""The daemon options as a user meets them: flags, defaults, ``dsproxy run``'s pass-through, the README."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from dsproxy import cli
from dsproxy.daemon import options
from dsproxy.daemon.manager import ManagerOptions
from dsproxy.daemon.master import ProxyOptions
from dsproxy.daemon.worker import WorkerSpec

README = Path(__file__).resolve().parents[2] / "README.md"

PROXY_FLAGS = [
    "--workers", "--cache", "--ttl", "--graceful-timeout", "--forward-timeout", "--crash-limit",
    "--worker-timeout", "--no-prewarm", "--listen", "--tls-cert", "--tls-key",
]  # fmt: skip
MANAGER_FLAGS = ["--demo-stores", "--watch-interval", "--maintenance-timeout", "--admin-group", "--proxy-user"]
MANAGER_FLAGS += ["--store-owner"]
MANAGER_FLAGS += ["--etcd", "--etcd-prefix", "--host-id", "--fleet-lease-ttl", "--fleet-fencing", "--etcd-timeout"]
MANAGER_FLAGS += ["--etcd-cacert", "--etcd-cert", "--etcd-key"]


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(argv)


def subparser(command: str) -> argparse.ArgumentParser:
    sub: Any = cli.build_parser()._subparsers
    parser: argparse.ArgumentParser = sub._group_actions[0].choices[command]
    return parser


def flags(command: str) -> list[str]:
    sub = subparser(command)
    dirs = {"--base-dir", "--config-dir", "--run-dir", "--data-dir", "-h"}
    return [a.option_strings[0] for a in sub._actions if a.option_strings and a.option_strings[0] not in dirs]


def test_each_daemon_command_takes_the_same_flags_as_before() -> None:
    assert flags("manager") == MANAGER_FLAGS
    assert flags("proxy") == PROXY_FLAGS
    assert flags("run") == ["--demo-stores", *PROXY_FLAGS]


def test_defaults_are_the_documented_ones() -> None:
    args = parse("run")
    assert (args.demo_stores, args.workers, args.cache, args.ttl) == (0, os.cpu_count() or 1, "on", 60.0)
    assert (args.graceful_timeout, args.forward_timeout, args.crash_limit, args.worker_timeout) == (
        10.0,
        30.0,
        10,
        30.0,
    )
    assert args.prewarm is True
    m = parse("manager")
    assert (m.watch_interval, m.maintenance_timeout, m.admin_group, m.proxy_user, m.store_owner) == (
        0.5, 10.0, None, None, None,
    )  # fmt: skip
    assert (m.etcd, m.etcd_prefix, m.host_id, m.fleet_lease_ttl, m.fleet_fencing, m.etcd_timeout) == (
        None, "/dsproxy", None, 10, "serve", 2.0,
    )  # fmt: skip
    fleet = parse("manager", "--etcd", "http://10.0.0.1:2379, e2:2379", "--etcd-prefix", "/x/y/")
    assert (fleet.etcd, fleet.etcd_prefix) == (("10.0.0.1:2379", "e2:2379"), "/x/y")
    secure = parse("manager", "--etcd", "https://e1:2379,e2:2379", "--etcd-cacert", "/etc/ca.pem")
    assert (secure.etcd, secure.etcd_cacert, secure.etcd_cert) == (("https://e1:2379", "e2:2379"), "/etc/ca.pem", None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["proxy", "--workers", "0"], "argument --workers: must be positive, not 0"),
        (["run", "--ttl", "soon"], "argument --ttl: 'soon' is not a number"),
        (["manager", "--watch-interval", "-1"], "argument --watch-interval: must be positive, not -1"),
        (["proxy", "--cache", "maybe"], "argument --cache: invalid choice: 'maybe'"),
        (["manager", "--etcd", "127.0.0.1:2379,"], "argument --etcd: '127.0.0.1:2379,': an empty etcd endpoint"),
        (["manager", "--etcd", "https://e1:2379,http://e2:2379"], "http:// and https:// mixed"),
        (["manager", "--etcd", "e1"], "argument --etcd: 'e1' is not HOST:PORT"),
        (["manager", "--etcd-prefix", "dsproxy"], "argument --etcd-prefix: 'dsproxy' is not a key prefix"),
        (["manager", "--host-id", "a/b"], "argument --host-id: 'a/b' is not a host id"),
        (["manager", "--fleet-fencing", "maybe"], "argument --fleet-fencing: invalid choice: 'maybe'"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        parse(*argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_every_help_line_shows_its_default() -> None:
    text = subparser("proxy").format_help()
    assert "(default CPU count)" in text and "(default 30)" in text and "(default on)" in text


def test_the_option_objects_take_their_defaults_from_the_declarations() -> None:
    by_name = {s.name: s for s in options.SETTINGS}
    fields: dict[type, dict[str, dataclasses.Field[Any]]] = {
        cls: {f.name: f for f in dataclasses.fields(cls)} for cls in (ManagerOptions, ProxyOptions, WorkerSpec)
    }
    for setting in options.SETTINGS:
        owners: list[type] = [ManagerOptions] if setting.daemon == "manager" else [ProxyOptions, WorkerSpec]
        held = [fields[cls][setting.name] for cls in owners if setting.name in fields[cls]]
        assert len(held) == 1, f"{setting.name} is a field of exactly one of {owners}"
        if held[0].default is not dataclasses.MISSING:
            assert held[0].default == setting.default, setting.name
    for cls, named in fields.items():
        for name, f in named.items():
            if name in by_name and f.default is not dataclasses.MISSING:
                assert f.default == by_name[name].default, f"{cls.__name__}.{name}"


def test_cli_builds_the_daemons_options_from_the_flags(tmp_path: Path) -> None:
    args = parse(
        "--base-dir", str(tmp_path), "proxy", "--workers", "3", "--cache", "config", "--ttl", "1.5",
        "--forward-timeout", "4", "--worker-timeout", "0", "--no-prewarm",
    )  # fmt: skip
    proxy = options.proxy_options(args, cli._paths(args))
    assert (proxy.workers, proxy.crash_limit, proxy.worker_timeout) == (3, 10, 0.0)
    spec = proxy.spec
    assert (spec.cache, spec.ttl, spec.forward_timeout, spec.prewarm, spec.master_pid) == (
        "config", 1.5, 4.0, False, os.getpid(),
    )  # fmt: skip
    assert spec.paths.run_dir == tmp_path / "run"
    args = parse("manager", "--demo-stores", "4", "--admin-group", "wheel", "--maintenance-timeout", "2")
    manager = options.manager_options(args, cli._paths(args))
    assert (manager.demo_stores, manager.admin_group, manager.maintenance_timeout, manager.watch_interval) == (
        4, "wheel", 2.0, 0.5,
    )  # fmt: skip


def test_run_passes_every_option_through_to_the_daemon_that_reads_it() -> None:
    given = [
        "run", "--demo-stores", "7", "--workers", "3", "--cache", "off", "--ttl", "0.1", "--graceful-timeout",
        "2.5", "--forward-timeout", "4", "--crash-limit", "2", "--worker-timeout", "0", "--no-prewarm",
        "--listen", "127.0.0.1:8007", "--listen", "[::1]:8007", "--tls-cert", "/c.pem", "--tls-key", "/c.key",
    ]  # fmt: skip
    run = parse(*given)
    to_manager, to_proxy = options.argv(run, "manager"), options.argv(run, "proxy")
    assert to_manager == ["--demo-stores", "7"]
    manager, proxy = parse("manager", *to_manager), parse("proxy", *to_proxy)
    for setting in options.settings_for("run"):
        child = manager if setting.daemon == "manager" else proxy
        assert getattr(child, setting.name) == getattr(run, setting.name), setting.name
        assert getattr(run, setting.name) != setting.default, f"the test should give {setting.option}"


def test_run_with_no_options_passes_none() -> None:
    run = parse("run")
    assert options.argv(run, "manager") == [] and options.argv(run, "proxy") == []


def test_the_readme_table_is_the_declared_one() -> None:
    assert options.readme_table() in README.read_text(), (
        "README.md's daemon options table differs from dsproxy/daemon/options.py; "
        "replace it with the output of `python -m dsproxy.daemon.options`"
    )
