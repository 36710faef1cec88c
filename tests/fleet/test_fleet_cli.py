"""``dsproxy fleet import`` and ``dsproxy fleet status`` against a real 3-member etcd cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dsproxy import cli
from dsproxy.config import parse
from dsproxy.config.section import render_section
from dsproxy.fleet.etcd import KV, Etcd
from dsproxy.paths import Paths
from dsproxy.testing.etcd import EtcdCluster
from dsproxy.testing.stores import write_stores


def etcd_call(cluster: EtcdCluster, work: Any) -> Any:
    async def main() -> Any:
        async with Etcd(cluster.endpoints) as etcd:
            return await work(etcd)

    return asyncio.run(main())


def keys_under(cluster: EtcdCluster, prefix: bytes) -> list[KV]:
    return etcd_call(cluster, lambda etcd: etcd.get_prefix(prefix))[1]  # type: ignore[no-any-return]


def fleet(cluster: EtcdCluster, prefix: bytes, *args: str) -> list[str]:
    """``fleet ARGS`` with this cluster and prefix."""
    return ["fleet", *args, "--etcd", ",".join(cluster.endpoints), "--etcd-prefix", prefix.decode()]


@pytest.fixture
def host(tmp_path: Path) -> Paths:
    """An instance on ``tmp/base`` with three stores in its datastore.cfg (one in maintenance)."""
    paths = Paths.resolve(tmp_path / "base")
    write_stores(
        paths,
        {
            "alpha": {"comment": "first one"},
            "beta": {"maintenance-mode": 'offline,message="disk swap"'},
            "gamma": {"gc-schedule": "daily"},
        },
    )
    return paths


def test_import_pushes_every_section_as_its_canonical_text(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, host: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--base-dir", str(host.config_dir.parent), *fleet(etcd_cluster, etcd_prefix, "import")])
    out = capsys.readouterr().out
    assert code == 0
    kvs = keys_under(etcd_cluster, etcd_prefix + b"datastores/")
    assert f"imported 3 datastores from {host.config_file}" in out and f"at revision {kvs[-1].mod_revision}" in out
    local = parse(host.config_file.read_bytes())
    assert [kv.key for kv in kvs] == [etcd_prefix + b"datastores/" + n for n in (b"alpha", b"beta", b"gamma")]
    for kv in kvs:
        name = kv.key.rsplit(b"/", 1)[1].decode()
        assert kv.value.decode() == render_section(name, local[name])[0]
        assert parse(kv.value) == {name: local[name]}  # the mirror's check: one section, named NAME
    assert b"\tmaintenance-mode type=offline,message=disk swap\n" in kvs[1].value


def test_import_refuses_when_a_store_exists_and_writes_nothing(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, host: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--base-dir", str(host.config_dir.parent), *fleet(etcd_cluster, etcd_prefix, "import")]) == 0
    capsys.readouterr()
    other = Paths.resolve(tmp_path / "other")
    write_stores(other, {"beta": {"comment": "another beta"}, "delta": {}, "gamma": {"gc-schedule": "daily"}})
    text = other.config_file.read_text().replace(str(other.data_dir), str(host.data_dir))  # gamma: the same text
    other.config_file.write_text(text)

    code = cli.main(fleet(etcd_cluster, etcd_prefix, "import", "--config", str(other.config_file)))
    err = capsys.readouterr().err
    assert code == 1
    assert "2 of its 3 datastores exist already" in err and "nothing was written" in err
    listed = {line.split()[0]: line for line in err.splitlines() if line.startswith("  ")}
    assert sorted(listed) == ["beta", "gamma"]
    assert "the same text" in listed["gamma"] and "the same text" not in listed["beta"]
    names = [kv.key.rsplit(b"/", 1)[1] for kv in keys_under(etcd_cluster, etcd_prefix + b"datastores/")]
    assert names == [b"alpha", b"beta", b"gamma"]  # no delta, beta untouched
    beta = keys_under(etcd_cluster, etcd_prefix + b"datastores/beta")[0]
    assert b"another beta" not in beta.value


def test_import_pushes_what_the_host_serves_with_its_overlay(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, host: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host whose recent changes are in the overlay beside its file (fleet mode's, not flushed
    yet) imports them too: what its workers serve, not the file alone."""
    from dsproxy.config import overlay
    from dsproxy.daemon.writer import ConfigWriter
    from dsproxy.ipc import shm

    host.ensure()
    seg = shm.Segment.open(host.run_dir, create=True)
    try:
        writer = ConfigWriter(host, lambda: seg)
        writer.check_file()
        writer.enable_fleet()
        local = dict(parse(host.config_file.read_bytes()))
        local["alpha"] = {**local["alpha"], "comment": "from etcd"}  # (a whole write: the overlay's base)
        writer.mirror_replace(local, dict.fromkeys(local, 2), 2)
        delta = parse(f"datastore: delta\n\tpath {host.data_dir / 'delta'}\n")["delta"]
        writer.mirror_apply({"delta": delta, "gamma": None}, {"delta": 3, "gamma": None}, 3)
        assert sorted(parse(host.config_file.read_bytes())) == ["alpha", "beta", "gamma"]  # (the file alone)
        assert sorted(overlay.served(host.config_file)) == ["alpha", "beta", "delta"]
        code = cli.main(["--base-dir", str(host.config_dir.parent), *fleet(etcd_cluster, etcd_prefix, "import")])
        assert code == 0, capsys.readouterr().err
    finally:
        seg.close()
        shm.unlink(host.run_dir)
    names = [kv.key.rsplit(b"/", 1)[1] for kv in keys_under(etcd_cluster, etcd_prefix + b"datastores/")]
    assert names == [b"alpha", b"beta", b"delta"]


def test_import_of_many_stores_spans_several_txns(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "datastore.cfg"
    cfg.write_text(
        "".join(f"datastore: s{i:04d}\n\tpath /srv/s{i:04d}\n\tcomment {'c' * 120}\n\n" for i in range(1000))
    )
    code = cli.main(fleet(etcd_cluster, etcd_prefix, "import", "--config", str(cfg)))  # 8 txns of <= 128 keys
    assert code == 0, capsys.readouterr().err
    assert "imported 1000 datastores" in capsys.readouterr().out
    kvs = keys_under(etcd_cluster, etcd_prefix + b"datastores/")
    assert len(kvs) == 1000 and len({kv.mod_revision for kv in kvs}) == 8


def test_import_refuses_a_bad_file_naming_the_line(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "datastore.cfg"
    cfg.write_text("datastore: ok\n\tpath /srv/ok\n\ndatastore: bad\n\tpath /srv/bad\n\tgc-schedule not a schedule\n")
    assert cli.main(fleet(etcd_cluster, etcd_prefix, "import", "--config", str(cfg))) == 1
    err = capsys.readouterr().err
    assert str(cfg) in err and "gc-schedule" in err and "line 6" in err
    assert keys_under(etcd_cluster, etcd_prefix) == []
    assert cli.main(fleet(etcd_cluster, etcd_prefix, "import", "--config", str(tmp_path / "missing.cfg"))) == 1
    assert "missing.cfg" in capsys.readouterr().err


def test_status_shows_every_host_with_its_lag(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = etcd_prefix + b"hosts/"

    stores = etcd_prefix + b"datastores/"

    async def register(etcd: Etcd) -> tuple[int, int]:
        for name in ("s1", "s2", "s3"):  # three datastore changes: s1, s2, s3 in that order
            await etcd.put(stores + name.encode(), f"datastore: {name}\n\tpath /srv/{name}\n".encode())
        newest = await etcd.revision()
        now = time.time()
        # host-a serves the newest change, host-b misses s3, host-d misses s2 and s3
        for name, revision, workers in (("host-a", newest, 4), ("host-b", newest - 1, 2), ("host-d", newest - 2, 1)):
            state = {"host": name, "revision": revision, "generation": 7, "workers": workers, "active": {},
                     "connected_since": now, "pid": 123, "version": 1, "updated": now}  # fmt: skip
            await etcd.put(hosts + name.encode(), json.dumps(state).encode())
        await etcd.put(hosts + b"host-c", b"{not json")
        return newest, await etcd.revision()

    newest, current = etcd_call(etcd_cluster, register)
    assert cli.main(fleet(etcd_cluster, etcd_prefix, "status", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["revision"] == current and data["datastore-revision"] == newest and data["datastores"] == 3
    by_id = {h["id"]: h for h in data["hosts"]}
    assert sorted(by_id) == ["host-a", "host-b", "host-c", "host-d"]
    # the hosts' own key puts since the newest change are no lag
    assert (by_id["host-a"]["lag"], by_id["host-a"]["behind"]) == (0, 0) and current > newest
    assert (by_id["host-b"]["lag"], by_id["host-b"]["behind"]) == (1, 1)
    assert (by_id["host-d"]["lag"], by_id["host-d"]["behind"]) == (2, 2)
    assert by_id["host-a"]["workers"] == 4 and "not JSON" in by_id["host-c"]["error"]

    assert cli.main(fleet(etcd_cluster, etcd_prefix, "status")) == 0
    out = capsys.readouterr().out
    assert f"etcd revision {current}" in out and "4 hosts" in out and f"newest change at revision {newest}" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert lines["host-a"][1:5] == [str(newest), "0", "0", "4"]
    assert lines["host-b"][2:8] == ["1", "1", "2", lines["host-b"][5], "s", "ago"]
    assert lines["host-c"][1:7] == ["-", "-", "-", "-", "at", "revision"] and "JSON" in out.split("host-c")[1]


def test_status_of_an_empty_fleet_and_of_an_unreachable_etcd(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    # the real entry point: exit codes, and the errors on stderr
    base = [sys.executable, "-m", "dsproxy", "fleet", "status", "--etcd-prefix", etcd_prefix.decode()]
    empty = subprocess.run([*base, "--etcd", etcd_cluster.endpoints[1]], capture_output=True, text=True, timeout=30)
    assert empty.returncode == 0 and "0 hosts under" in empty.stdout
    dead = etcd_cluster.follower()
    etcd_cluster.kill(dead)
    gone = subprocess.run(
        [*base, "--etcd", etcd_cluster.endpoints[dead], "--etcd-timeout", "0.3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith("dsproxy: fleet: etcd unreachable") and etcd_cluster.endpoints[dead] in gone.stderr
