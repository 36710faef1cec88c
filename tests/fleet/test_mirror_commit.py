"""A fleet write whose transaction applied but that this host's mirror did not apply in time.

A 200 from a host promises that its workers serve the change; when the host's watch is behind (here:
never started, so the mirror stays at the revision of its first read), the answer must be an error
that says the change is in etcd -- not a 200 that the next read on this host contradicts, and
not an undo of what the write made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import pytest

from dsproxy.config.section import render_section
from dsproxy.daemon.writer import ConfigWriter
from dsproxy.fleet.etcd import Etcd
from dsproxy.fleet.mirror import FleetRefused, Mirror
from dsproxy.paths import Paths
from dsproxy.testing.etcd import EtcdCluster

pytestmark = pytest.mark.timeout(60)


def test_a_committed_write_the_mirror_did_not_apply_in_time_is_a_504_naming_the_revision(
    tmp_path: Path, etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    prefix = etcd_prefix.decode().rstrip("/")
    paths = Paths.resolve(tmp_path / "base")
    paths.ensure()
    store = tmp_path / "store1"
    section = render_section("store1", {"path": str(store)}, "etcd")[0].encode()

    async def scenario() -> tuple[FleetRefused, Any]:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            await etcd.put_if(etcd_prefix + b"datastores/store1", section, 0)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()

        async def in_writer(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(pool, fn, *args)

        writer = ConfigWriter(paths, lambda: None)
        mirror = Mirror(
            writer,
            in_writer,
            lambda: None,
            endpoints=etcd_cluster.endpoints,
            prefix=prefix,
            maintenance_timeout=0.5,
            timeout=0.5,
        )
        try:
            await in_writer(writer.enable_fleet)
            await mirror.load()  # the first read; no watch follows it
            write = await in_writer(writer.fleet_update, "store1", {"comment": "late"})
            with pytest.raises(FleetRefused) as caught:
                await mirror.commit(write)
            async with Etcd(etcd_cluster.endpoints) as etcd:
                kv = await etcd.get(etcd_prefix + b"datastores/store1")
            return caught.value, kv
        finally:
            await mirror.etcd.close()
            pool.shutdown()

    refused, kv = asyncio.run(scenario())
    assert refused.status == 504 and refused.committed and not refused.unknown
    assert "is in etcd (revision" in refused.message and "'store1'" in refused.message
    assert kv is not None and b"comment late" in kv.value  # the change was made, and is not undone
    assert b"late" not in paths.config_file.read_bytes()  # this host does not serve it yet
