"""dsproxy.fleet.etcd against a real 3-member cluster: failover, compare-and-set through a leader kill and
lost answers, deadlines on a frozen member, leases, watch resume and re-list, a 100,000-key prefix.

Every test runs one ``asyncio.run``; the cluster is the module's (tests/fleet/conftest.py), healed
after each test, and each test writes under its own prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dsproxy.fleet import etcd as etcd_module
from dsproxy.fleet.etcd import Etcd, EtcdOutcomeUnknown, EtcdRequestError, EtcdUnavailable, Event, Lease, WatchBatch
from dsproxy.testing.etcd import EtcdCluster


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def starting_with(cluster: EtcdCluster, first: int) -> list[str]:
    """The cluster's endpoints with member ``first``'s first (the one a new Etcd uses)."""
    return [cluster.endpoints[first]] + [e for i, e in enumerate(cluster.endpoints) if i != first]


def without(cluster: EtcdCluster, member: int) -> list[str]:
    return [e for i, e in enumerate(cluster.endpoints) if i != member]


async def collect(etcd: Etcd, prefix: bytes, start: int, until: int, timeout: float = 10.0) -> list[Event]:
    """Every event under ``prefix`` from ``start`` until one at revision >= ``until`` (a watch replay)."""
    events: list[Event] = []

    async def watch() -> None:
        async for batch in etcd.watch_prefix(prefix, start):
            events.extend(batch.events)
            if batch.revision >= until:
                return

    await asyncio.wait_for(watch(), timeout)
    return events


# -- failover and deadlines ---------------------------------------------------------------------------------


def test_writes_go_on_when_the_member_in_use_is_killed(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    victim = etcd_cluster.follower()

    async def main() -> None:
        async with Etcd(starting_with(etcd_cluster, victim), timeout=1.0) as etcd:
            await etcd.put(etcd_prefix + b"before", b"0")
            assert etcd.endpoint == etcd_cluster.endpoints[victim]
            etcd_cluster.kill(victim)
            started = time.monotonic()
            revisions = [await etcd.put(etcd_prefix + b"k%02d" % i, b"%d" % i) for i in range(20)]
            elapsed = time.monotonic() - started
            assert etcd.endpoint != etcd_cluster.endpoints[victim]
            assert etcd.connected and etcd.disconnected_since is None
            _, kvs = await etcd.get_prefix(etcd_prefix)
            assert [kv.value for kv in kvs] == [b"0"] + [b"%d" % i for i in range(20)]
            assert revisions == sorted(revisions)
            assert elapsed < 1.0, f"20 writes took {elapsed:.2f} s after the member in use died"

    run(main())


def test_a_frozen_member_costs_one_deadline_then_the_next_member_answers(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    frozen = etcd_cluster.follower()

    async def main() -> None:
        async with Etcd(starting_with(etcd_cluster, frozen), timeout=0.5) as etcd:
            with etcd_cluster.frozen(frozen):
                started = time.monotonic()
                revision = await etcd.put(etcd_prefix + b"k", b"1")
                elapsed = time.monotonic() - started
            assert revision > 0 and etcd.endpoint != etcd_cluster.endpoints[frozen]
            assert 0.4 < elapsed < 1.5, f"the write took {elapsed:.2f} s"
        async with Etcd([etcd_cluster.endpoints[frozen]], timeout=0.5) as lone:
            with etcd_cluster.frozen(frozen):
                started = time.monotonic()
                with pytest.raises(EtcdUnavailable) as info:
                    await lone.get(etcd_prefix + b"k")
                elapsed = time.monotonic() - started
            assert elapsed < 1.5, f"a call to a frozen member took {elapsed:.2f} s to fail"
            assert etcd_cluster.endpoints[frozen] in str(info.value)
            assert "DEADLINE_EXCEEDED" in str(info.value)
            assert not lone.connected and lone.disconnected_since is not None

    run(main())


def test_unreachable_endpoints_are_all_named(etcd_prefix: bytes) -> None:
    from dsproxy.testing.daemons import free_port

    endpoints = [f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]

    async def main() -> None:
        etcd = Etcd(endpoints, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as info:
            await etcd.connect()
        assert time.monotonic() - started < 1.5
        await etcd.close()
        message = str(info.value)
        assert endpoints[0] in message and endpoints[1].removeprefix("http://") in message
        assert "UNAVAILABLE" in message
        assert not etcd.connected and etcd.disconnected_since is not None

    run(main())


# -- compare-and-set ----------------------------------------------------------------------------------------


def test_no_acknowledged_write_lost_when_the_leader_is_killed(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"counter"

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            first = await etcd.put_if(key, b"0", 0)
            acked: list[tuple[bytes, int]] = [(b"0", first.revision)]
            killed = asyncio.Event()

            async def writer() -> None:
                after_kill = 0
                i = 1
                while after_kill < 60:
                    txn = await etcd.put_if(key, b"%d" % i, acked[-1][1])
                    # one writer: a refused compare would mean an applied write was reported lost
                    assert txn.succeeded, f"write {i} refused: {txn}"
                    acked.append((b"%d" % i, txn.revision))
                    after_kill += killed.is_set()
                    i += 1
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            leader = await asyncio.to_thread(etcd_cluster.leader)
            await asyncio.to_thread(etcd_cluster.kill, leader)
            killed.set()
            await asyncio.wait_for(task, 20)
            history = await collect(etcd, key, first.revision, acked[-1][1])
            assert [(e.value, e.mod_revision) for e in history] == acked
            assert (await etcd.get(key)) is not None

    run(main())


class _LossyConn(etcd_module._Conn):
    """A connection whose Txn answers can be lost (applied, then TimeoutError) or whose requests dropped."""

    plan: list[str | Callable[[], Awaitable[None]]] = []

    def __init__(self, endpoint: str, options: list[tuple[str, int]], credentials: Any = None) -> None:
        super().__init__(endpoint, options, credentials)
        real = self.kv

        class LossyKV:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            async def Txn(self, request: Any, **kwargs: Any) -> Any:
                action = _LossyConn.plan.pop(0) if _LossyConn.plan else None
                if action == "drop":
                    raise TimeoutError("request dropped (test)")
                reply = await real.Txn(request, **kwargs)
                if action is None:
                    return reply
                if callable(action):  # something else happens before the client retries
                    await action()
                raise TimeoutError("answer lost (test)")

        self.kv = LossyKV()


def test_writes_whose_answer_was_lost_are_resolved(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c, d = (etcd_prefix + name for name in (b"a", b"b", b"c", b"d"))

    async def main() -> None:
        other = Etcd(etcd_cluster.endpoints)  # connected before the patch: its answers are never lost
        await other.connect()
        monkeypatch.setattr(etcd_module, "_Conn", _LossyConn)
        async with other, Etcd(etcd_cluster.endpoints, timeout=0.5) as etcd:
            # applied, answer lost: the retry's compare fails on our own value -> success at its revision
            _LossyConn.plan[:] = ["lost"]
            txn = await etcd.put_if(a, b"mine", 0)
            kv = await other.get(a)
            assert kv is not None and kv.value == b"mine"
            assert txn.succeeded and txn.revision == kv.mod_revision

            # never sent: the retry applies
            _LossyConn.plan[:] = ["drop"]
            txn = await etcd.put_if(a, b"second", kv.mod_revision)
            kv = await other.get(a)
            assert kv is not None and txn.succeeded and txn.revision == kv.mod_revision and kv.value == b"second"

            # applied, answer lost, then another host changed the key: a conflict naming their value
            async def theirs() -> None:
                await other.put(a, b"theirs")

            _LossyConn.plan[:] = [theirs]
            txn = await etcd.put_if(a, b"third", kv.mod_revision)
            assert not txn.succeeded and txn.current is not None and txn.current.value == b"theirs"

            # a delete whose answer was lost: success at the delete's own revision
            created = await other.put_if(b, b"x", 0)
            await other.put(c, b"later")  # the cluster revision moves past the delete's
            _LossyConn.plan[:] = ["lost"]
            txn = await etcd.delete_if(b, created.revision)
            assert txn.succeeded and await other.get(b) is None
            history = await collect(other, b, created.revision, txn.revision)
            assert [(e.kind, e.mod_revision) for e in history] == [("put", created.revision), ("delete", txn.revision)]

            # a create-only batch whose answer was lost
            _LossyConn.plan[:] = ["lost"]
            result = await etcd.txn_batch([(d + b"%d" % i, b"v") for i in range(5)])
            assert result.created == 5 and not result.conflicts
            assert len((await other.get_prefix(d))[1]) == 5

            # every attempt lost: the caller is told the outcome is unknown (it did apply)
            _LossyConn.plan[:] = ["lost"] * 100
            with pytest.raises(EtcdOutcomeUnknown, match="outcome unknown"):
                await etcd.put_if(c, b"unknown", 0)
            _LossyConn.plan[:] = []

    run(main())


def test_racing_creates_have_one_winner(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    key = etcd_prefix + b"store"

    async def main() -> None:
        clients = [Etcd(starting_with(etcd_cluster, i)) for i in range(3)]
        try:
            for c in clients:
                await c.connect()
            txns = await asyncio.gather(*(c.put_if(key, b"from %d" % i, 0) for i, c in enumerate(clients)))
            winners = [t for t in txns if t.succeeded]
            assert len(winners) == 1
            kv = await clients[0].get(key)
            assert kv is not None
            for t in txns:
                if not t.succeeded:
                    assert t.current == kv  # the loser sees the winner's value, for its 409
            removed = await clients[1].delete_if(key, kv.mod_revision)
            again = await clients[2].delete_if(key, kv.mod_revision)
            assert removed.succeeded and not again.succeeded and again.current is None
        finally:
            for c in clients:
                await c.close()

    run(main())


def test_batches_respect_etcd_limits_and_refuse_conflicts(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            big = [(etcd_prefix + b"big%03d" % i, b"v" * 10_000) for i in range(300)]  # 3 MB: 3+ requests
            result = await etcd.txn_batch(big)
            assert result.created == 300 and not result.conflicts
            assert len((await etcd.get_prefix(etcd_prefix + b"big"))[1]) == 300
            many = [(etcd_prefix + b"n%04d" % i, b"v") for i in range(1000)]  # 8 txns of <= 128 ops
            assert (await etcd.txn_batch(many)).created == 1000

            await etcd.put(etcd_prefix + b"c5", b"already here")
            clash = [(etcd_prefix + b"c%d" % i, b"new") for i in range(10)]
            result = await etcd.txn_batch(clash)
            assert result.created == 0
            assert [(kv.key, kv.value) for kv in result.conflicts] == [(etcd_prefix + b"c5", b"already here")]
            assert len((await etcd.get_prefix(etcd_prefix + b"c"))[1]) == 1  # nothing of the txn written

            with pytest.raises(ValueError, match="too large"):
                await etcd.txn_batch([(etcd_prefix + b"ok", b"1"), (etcd_prefix + b"huge", b"v" * 2_000_000)])
            assert await etcd.get(etcd_prefix + b"ok") is None

    run(main())


# -- leases -------------------------------------------------------------------------------------------------


def alive(lease: Lease) -> bool:
    return lease.alive and not lease.expired.is_set()


def lease_alive(lease: Lease) -> bool:
    """``lease.alive`` as a call (a property mypy would take for constant between two reads)."""
    return lease.alive


def test_a_lease_whose_refresh_hangs_is_not_alive_past_its_ttl(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh that never returns (a stream write to a dead member once did) does not keep a
    lease alive: past its TTL since the last good refresh it is gone, as it is in etcd -- what a
    ``--fleet-fencing offline`` host waits for before it fences."""

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints, timeout=0.5) as etcd:
            lease = await etcd.grant(1)
            hung = asyncio.Event()

            async def hang(lease_id: int, budget: float) -> int:
                hung.set()
                await asyncio.Event().wait()  # for ever
                return 0

            monkeypatch.setattr(etcd, "_keepalive", hang)
            await asyncio.wait_for(hung.wait(), 2 * lease.ttl)
            assert lease_alive(lease)  # within its TTL
            await asyncio.sleep(lease.ttl + 0.1)
            assert not lease_alive(lease) and lease.expired.is_set() and "no refresh succeeded" in lease.reason

    run(main())


def test_a_lease_lives_past_its_ttl_and_expires_when_etcd_is_gone(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    key = etcd_prefix + b"host"

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints, timeout=0.5) as etcd:
            lease = await etcd.grant(2)
            await etcd.put(key, b"on a lease", lease=lease.id)
            await asyncio.sleep(3 * lease.ttl + 0.5)
            assert await etcd.get(key) is not None and alive(lease)

            with etcd_cluster.frozen(0, 1, 2):
                started = time.monotonic()
                await asyncio.wait_for(lease.expired.wait(), lease.ttl + 2)
                elapsed = time.monotonic() - started
            assert not alive(lease) and "no refresh succeeded" in lease.reason
            # not before a whole TTL since the last good refresh (at most TTL/3 before the freeze)
            assert elapsed >= lease.ttl * 2 / 3 - 0.1, f"expired after {elapsed:.2f} s"

            await asyncio.to_thread(etcd_cluster.heal)
            gone = await etcd.grant(3)
            await etcd.revoke(gone.id)  # as another host might
            await asyncio.wait_for(gone.expired.wait(), gone.ttl)
            assert "gone" in gone.reason

    run(main())


# -- watch --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_watch_resumes_without_lost_or_repeated_events(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, fault: signal.Signals
) -> None:
    watched = etcd_cluster.follower()
    writes = 60

    async def main() -> None:
        async with (
            Etcd(without(etcd_cluster, watched), timeout=0.5) as writer,
            Etcd(starting_with(etcd_cluster, watched), timeout=0.5) as watcher,
        ):
            start = await writer.revision() + 1
            seen: list[tuple[bytes, bytes, int]] = []
            batches: list[WatchBatch] = []

            async def watch() -> None:
                async for batch in watcher.watch_prefix(etcd_prefix, start, heartbeat=0.5):
                    batches.append(batch)
                    seen.extend((e.key, e.value, e.mod_revision) for e in batch.events)
                    if len(seen) >= writes:
                        return

            task = asyncio.create_task(watch())
            acked: list[tuple[bytes, bytes, int]] = []
            for i in range(writes):
                if i == writes // 3:
                    etcd_cluster.kill(watched, fault)
                key, value = etcd_prefix + b"k%d" % (i % 7), b"%d" % i
                acked.append((key, value, await writer.put(key, value)))
                await asyncio.sleep(0.01)
            await asyncio.wait_for(task, 10)
            assert seen == acked
            assert all(b.relist is None for b in batches)
            assert watcher.endpoint != etcd_cluster.endpoints[watched]

    run(main())


def test_check_watches_moves_a_silent_watch_off_a_frozen_member_without_waiting_for_the_heartbeat(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    """A writer that knows its revision exists asks the watch to check its stream: a stream on a
    frozen member (TCP still open, nothing sent) is re-created on the next member within about
    two deadlines, not after the heartbeat (60 s here)."""
    frozen = etcd_cluster.follower()

    async def main() -> None:
        async with (
            Etcd(without(etcd_cluster, frozen), timeout=0.5) as writer,
            Etcd(starting_with(etcd_cluster, frozen), timeout=0.5) as watcher,
        ):
            start = await writer.revision() + 1
            seen: list[int] = []

            async def watch() -> None:
                async for batch in watcher.watch_prefix(etcd_prefix, start, heartbeat=60):
                    seen.extend(e.mod_revision for e in batch.events)

            task = asyncio.create_task(watch())
            try:
                first = await writer.put(etcd_prefix + b"k", b"1")
                await _until(lambda: first in seen, 5)
                with etcd_cluster.frozen(frozen):
                    second = await writer.put(etcd_prefix + b"k", b"2")
                    await asyncio.sleep(1.0)
                    assert second not in seen  # the frozen member's stream is silent
                    watcher.check_watches()
                    started = time.monotonic()
                    await _until(lambda: second in seen, 5)
                    took = time.monotonic() - started
                assert took < 1.5, f"the watch took {took:.2f} s to come back"
                assert watcher.endpoint != etcd_cluster.endpoints[frozen]
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    run(main())


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_one_client_shared_by_a_watch_a_lease_and_writers_survives_the_kill_of_its_member(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes
) -> None:
    """As the manager uses it (uvloop, one Etcd): whichever call sees the dead member first fails over,
    and the calls in flight on the closed channel retry instead of raising."""
    import uvloop

    victim = etcd_cluster.follower()

    async def main() -> None:
        async with Etcd(starting_with(etcd_cluster, victim), timeout=1.0) as etcd:
            start = await etcd.revision() + 1
            lease = await etcd.grant(2)
            seen: list[tuple[bytes, int]] = []
            acked: list[tuple[bytes, int]] = []

            async def watch() -> None:
                async for batch in etcd.watch_prefix(etcd_prefix, start, heartbeat=0.5):
                    seen.extend((e.key, e.mod_revision) for e in batch.events)
                    if len(seen) >= 5 * 30:
                        return

            async def writer(n: int) -> None:
                for i in range(30):
                    key = etcd_prefix + b"w%d/%02d" % (n, i)
                    # create-only: a retried write whose first answer was lost is applied once (a plain
                    # put would be applied twice, both in the history -- harmless for host keys)
                    txn = await etcd.put_if(key, b"x", 0, lease=lease.id)
                    assert txn.succeeded, txn
                    acked.append((key, txn.revision))
                    await asyncio.sleep(0.01)

            watching = asyncio.create_task(watch())
            writers = asyncio.gather(*(writer(n) for n in range(5)))
            await asyncio.sleep(0.1)
            etcd_cluster.kill(victim)
            await asyncio.wait_for(writers, 15)
            await asyncio.wait_for(watching, 10)
            assert seen == sorted(acked, key=lambda a: a[1])
            assert lease.alive and etcd.endpoint != etcd_cluster.endpoints[victim]

    uvloop.run(main())


def test_a_compacted_watch_relists_then_goes_on(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            for i in range(5):
                await etcd.put(etcd_prefix + b"k%d" % i, b"old")
            stopped_at = await etcd.revision()  # a watcher (a host) stops here
            k0 = await etcd.get(etcd_prefix + b"k0")
            assert k0 is not None
            await etcd.delete_if(k0.key, k0.mod_revision)
            await etcd.put(etcd_prefix + b"k1", b"new")
            await etcd.put(etcd_prefix + b"k9", b"new")
            await etcd.compact(await etcd.revision())

            batches = etcd.watch_prefix(etcd_prefix, stopped_at + 1)
            try:
                first = await asyncio.wait_for(anext(batches), 10)
                revision, now = await etcd.get_prefix(etcd_prefix)
                assert first.events == [] and first.relist == now and first.revision == revision
                assert [kv.key for kv in now] == [etcd_prefix + b"k%d" % i for i in (1, 2, 3, 4, 9)]
                after = await etcd.put(etcd_prefix + b"k5", b"after")
                second = await asyncio.wait_for(anext(batches), 10)
                assert second.relist is None and second.revision == after
                assert [(e.kind, e.key) for e in second.events] == [("put", etcd_prefix + b"k5")]
            finally:
                await batches.aclose()

    run(main())


async def _five_keys(etcd: Etcd, prefix: bytes) -> None:
    for i in range(5):
        await etcd.put(prefix + b"k%d" % i, b"v")


def _after_each_call(monkeypatch: pytest.MonkeyPatch, etcd: Etcd, after: Callable[[str, Any], Awaitable[None]]) -> None:
    """``await after(what, fn)`` once each call of the client (a page, a put...) has its answer."""
    real = etcd._call

    async def wrapped(what: str, fn: Any, **kw: Any) -> Any:
        reply = await real(what, fn, **kw)
        await after(what, fn)
        return reply

    monkeypatch.setattr(etcd, "_call", wrapped)


def test_a_paged_read_is_one_revision_and_starts_over_after_a_compaction(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get_prefix reads in pages pinned at the first one's revision: writes between pages are
    not in it; a compaction of that revision before the last page starts the read over (a
    caller's own revision, compacted, is an error)."""
    monkeypatch.setattr(etcd_module, "PAGE_KEYS", 2)

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            await _five_keys(etcd, etcd_prefix)
            pages = []

            async def between_pages(what: str, fn: Any) -> None:
                if not what.startswith("get_prefix"):
                    return
                pages.append(what)
                if len(pages) == 1:  # after the first page: a new key, a change -- and, once, a compaction
                    await etcd.put(etcd_prefix + b"k0a", b"new")
                    await etcd.put(etcd_prefix + b"k4", b"changed")
                    if compact:
                        await etcd.compact(await etcd.revision())

            before = await etcd.revision()
            _after_each_call(monkeypatch, etcd, between_pages)
            compact = False
            revision, kvs = await etcd.get_prefix(etcd_prefix)
            assert revision == before and [kv.key[len(etcd_prefix) :] for kv in kvs] == [b"k%d" % i for i in range(5)]
            assert kvs[-1].value == b"v" and len(pages) == 3  # (pages of 2, 2, 1 keys)

            pages.clear()
            compact = True
            revision, kvs = await etcd.get_prefix(etcd_prefix)  # started over after the first page
            now = {kv.key[len(etcd_prefix) :]: kv.value for kv in kvs}
            assert revision == await etcd.revision() and now[b"k0a"] == b"new" and now[b"k4"] == b"changed"
            assert len(pages) == 1 + 3  # (the first page, then 2, 2, 2 keys)
            pages.clear()
            with pytest.raises(EtcdRequestError, match="compacted"):
                await etcd.get_prefix(etcd_prefix, revision=before)

    run(main())


def test_a_read_compacted_after_every_first_page_ends_as_one_range(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three restarts, then one Range at the current revision (which no compaction overtakes):
    a caller that pinned no revision never gets the compacted error a single Range never gave."""
    monkeypatch.setattr(etcd_module, "PAGE_KEYS", 2)

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            await _five_keys(etcd, etcd_prefix)
            firsts = []

            async def compact_after_first_page(what: str, fn: Any) -> None:
                if what.endswith("(page)") and fn.__defaults__[0].revision == 0:  # a first page
                    firsts.append(what)
                    await etcd.put(etcd_prefix + b"noise", b"%d" % len(firsts))
                    await etcd.compact(await etcd.revision())

            _after_each_call(monkeypatch, etcd, compact_after_first_page)
            revision, kvs = await etcd.get_prefix(etcd_prefix)
            assert len(firsts) == 3 and revision == await etcd.revision()
            assert [kv.key[len(etcd_prefix) :] for kv in kvs] == [b"k0", b"k1", b"k2", b"k3", b"k4", b"noise"]

    run(main())


def test_only_an_answer_too_large_makes_the_pages_smaller(
    etcd_cluster: EtcdCluster, etcd_prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another RESOURCE_EXHAUSTED (a proxy's rate limit) is raised as it is, as a single Range
    raised it: no walk down to pages of one key."""
    monkeypatch.setattr(etcd_module, "PAGE_KEYS", 8)

    async def main() -> None:
        async with Etcd(etcd_cluster.endpoints) as etcd:
            for i in range(20):
                await etcd.put(etcd_prefix + b"k%02d" % i, b"v")
            real, calls = etcd._call, []

            async def refuse_the_second(what: str, fn: Any, **kw: Any) -> Any:
                calls.append(what)
                if len(calls) == 2:
                    raise EtcdRequestError(what, "RESOURCE_EXHAUSTED", "etcdserver: too many requests")
                return await real(what, fn, **kw)

            monkeypatch.setattr(etcd, "_call", refuse_the_second)
            with pytest.raises(EtcdRequestError, match="too many requests"):
                await etcd.get_prefix(etcd_prefix)
            assert len(calls) == 2

    run(main())


# -- size ---------------------------------------------------------------------------------------------------


def test_a_100000_key_prefix_in_one_read(etcd_cluster: EtcdCluster, etcd_prefix: bytes) -> None:
    value = b"x" * 200
    items = [(etcd_prefix + b"store%06d" % i, value) for i in range(100_000)]

    async def main() -> dict[str, float]:
        timings: dict[str, float] = {}
        async with Etcd(etcd_cluster.endpoints, timeout=5.0) as etcd:
            try:
                started = time.monotonic()
                result = await etcd.txn_batch(items, parallel=2)
                timings["load"] = time.monotonic() - started
                assert result.created == 100_000 and not result.conflicts

                started = time.monotonic()
                revision, kvs = await etcd.get_prefix(etcd_prefix)  # ~25 MB, past gRPC's 4 MiB default
                timings["read"] = time.monotonic() - started
                assert revision == result.revision and len(kvs) == 100_000
                assert [kv.key for kv in kvs[:2]] == [items[0][0], items[1][0]] and kvs[-1].value == value

                async with Etcd(etcd_cluster.endpoints, timeout=5.0, max_message=4 << 20) as small:
                    started = time.monotonic()
                    paged = await small.get_prefix(etcd_prefix)  # too large for one message: pages, one revision
                    timings["paged"] = time.monotonic() - started
                assert paged == (revision, kvs)
            finally:
                with contextlib.suppress(EtcdUnavailable):
                    await etcd.delete_prefix(etcd_prefix)
        return timings

    timings = run(main())
    print(", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
