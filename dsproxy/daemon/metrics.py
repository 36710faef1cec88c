"""``GET /metrics``: Prometheus text exposition, built with ``prometheus_client``.

The figures come from the shared-memory process slots at scrape time (a custom collector), so any
worker answers for the whole proxy; the per-worker series are labelled by pid.  Imported only when
``/metrics`` is first asked for: it is not on the lookup path.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ..ipc import shm
from ..registry import Registry


class _SlotCollector(Collector):
    def __init__(self, registry: Registry, fleet: Mapping[str, Any] | None = None) -> None:
        self.registry = registry
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        reg = self.registry
        gen = GaugeMetricFamily("dsproxy_generation", "Shared datastore config generation (low 53 bits)")
        gen.add_metric([], float((reg.generation or 0) & ((1 << 53) - 1)))
        yield gen
        degraded = GaugeMetricFamily("dsproxy_degraded", "1 if this worker runs without shared memory")
        degraded.add_metric([], 1.0 if reg.degraded else 0.0)
        yield degraded
        config_error = GaugeMetricFamily("dsproxy_config_error", "1 if datastore.cfg does not parse now")
        config_error.add_metric([], 1.0 if reg.config_error else 0.0)
        yield config_error
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = GaugeMetricFamily("dsproxy_rlimit_nofile", "Soft RLIMIT_NOFILE of the answering worker")
        nofile.add_metric([], float(soft))
        yield nofile
        yield from _fd_figures(reg)
        changes = (
            ("applied", "Config loads of the answering worker that applied the ring's per-store changes"),
            ("patched", "Of those, loads that read only the changed bytes of the file (the manager's file record)"),
            ("overlaid", "Of those, loads that read only the fleet mirror's overlay (dsproxy.config.overlay)"),
        )
        values = {"applied": reg.changes_applied, "patched": reg.changes_patched, "overlaid": reg.changes_overlaid}
        for kind, text in changes:
            family = CounterMetricFamily(f"dsproxy_worker_changes_{kind}", text, labels=["pid"])
            family.add_metric([str(os.getpid())], float(values[kind]))
            yield family
        lookups = CounterMetricFamily("dsproxy_worker_lookups", "Datastore lookups per worker", labels=["pid"])
        hits = CounterMetricFamily("dsproxy_worker_cache_hits", "Lookups answered from the cache", labels=["pid"])
        reloads = CounterMetricFamily("dsproxy_worker_reloads", "Slow-path config reloads", labels=["pid"])
        errors = CounterMetricFamily("dsproxy_worker_errors", "Failed lookups and config errors", labels=["pid"])
        config_errors = CounterMetricFamily(
            "dsproxy_worker_config_errors", "Reads of datastore.cfg that failed or did not parse", labels=["pid"]
        )
        lookup_errors = CounterMetricFamily(
            "dsproxy_worker_lookup_errors", "Lookups answered with an error", labels=["pid"]
        )
        lag = GaugeMetricFamily(
            "dsproxy_worker_behind", "1 if the worker has not loaded the current generation", labels=["pid"]
        )
        workers = GaugeMetricFamily("dsproxy_workers", "Live worker processes")
        seg = reg.segment
        count = 0
        if seg is not None:
            current = seg.generation()
            for s in seg.slots():
                if s.role != shm.Role.WORKER:
                    continue
                count += 1
                pid = str(s.pid)
                lookups.add_metric([pid], float(s.lookups))
                hits.add_metric([pid], float(s.cache_hits))
                reloads.add_metric([pid], float(s.reloads))
                errors.add_metric([pid], float(s.errors))
                config_errors.add_metric([pid], float(s.config_errors))
                lookup_errors.add_metric([pid], float(s.lookup_errors))
                lag.add_metric([pid], 0.0 if s.generation == current else 1.0)
        workers.add_metric([], float(count))
        yield from (workers, lookups, hits, reloads, errors, config_errors, lookup_errors, lag)
        if self.fleet is not None:
            yield from _fleet_figures(self.fleet)


def _fleet_figures(fleet: Mapping[str, Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Fleet mode (``dsproxy manager --etcd``): the revision served and the link to etcd."""
    since = fleet["disconnected-since"]
    for name, kind, text, value in (
        ("revision", GaugeMetricFamily, "etcd revision of the config the answering worker serves", fleet["revision"]),
        ("mirror_revision", GaugeMetricFamily, "etcd revision the manager mirrors", fleet["mirror-revision"]),
        ("connected", GaugeMetricFamily, "1 if the manager reaches etcd", fleet["state"] in ("connected", "duplicate")),
        ("duplicate_host_id", GaugeMetricFamily, "1 if another manager runs with this --host-id (writes refused)",
         fleet["state"] == "duplicate"),
        ("fenced", GaugeMetricFamily, "1 if every store is offline here (--fleet-fencing offline)",
         fleet["state"] == "fenced"),
        ("disconnected_since_seconds", GaugeMetricFamily, "Unix time since when etcd is unreachable (0: reached)",
         since or 0),
        ("hand_edits_refused", CounterMetricFamily, "Hand edits of datastore.cfg undone (fleet mode)",
         fleet["hand-edits-refused"]),
    ):  # fmt: skip
        family = kind(f"dsproxy_fleet_{name}", text)
        family.add_metric([], float(value or 0))
        yield family


def _fd_figures(reg: Registry) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The answering worker's fd budget (:mod:`dsproxy.fdbudget`)."""
    fds = reg.fds
    for key, kind, text in (
        ("budget", GaugeMetricFamily, "Store fds the answering worker may hold (RLIMIT_NOFILE minus the reserve)"),
        ("open", GaugeMetricFamily, "Store fds the answering worker holds now"),
        ("opens", CounterMetricFamily, "Store fds opened for the first time by the answering worker"),
        ("reopens", CounterMetricFamily, "Store fds reopened after the fd budget closed them"),
        ("closes", CounterMetricFamily, "Idle store fds closed by the fd budget"),
        ("refused", CounterMetricFamily, "Lookups refused because every fd of the budget was in use"),
    ):
        family = kind(f"dsproxy_fd_{key}", text)
        family.add_metric([], float(fds[key]))
        yield family


def render(registry: Registry, fleet: Mapping[str, Any] | None = None) -> tuple[bytes, bytes]:
    """The exposition of ``registry``'s view of the proxy: ``(body, content type)``; with the
    fleet figures of node status' ``fleet`` in fleet mode."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_SlotCollector(registry, fleet))
    return generate_latest(collectors), CONTENT_TYPE_LATEST.encode()
