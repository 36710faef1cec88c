"""A real 3-member etcd cluster per test module (``etcd_cluster``), healed between tests.

Starting the cluster costs ~1 s, so a module shares one: the function-scoped ``etcd_cluster``
continues frozen members and restarts killed ones after each test (and waits for a leader), and
``etcd_prefix`` gives each test its own key prefix, so that tests never see each other's keys.
The module fixture stops every member and removes the data dirs, also when a test failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dsproxy.testing.etcd import EtcdCluster


@pytest.fixture(scope="module")
def etcd_cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster.start()


@pytest.fixture
def etcd_cluster(etcd_cluster_module: EtcdCluster) -> Iterator[EtcdCluster]:
    """The module's cluster, all members healthy; whatever the test killed or froze is healed after it."""
    etcd_cluster_module.heal()
    yield etcd_cluster_module
    etcd_cluster_module.heal()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> bytes:
    """A key prefix of this test's own: ``/test/<test name>/``."""
    return f"/test/{request.node.name}/".encode()
