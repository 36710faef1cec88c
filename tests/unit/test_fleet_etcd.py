"""dsproxy.fleet.etcd without a cluster: endpoints, key ranges, and gRPC loaded only in fleet mode."""

from __future__ import annotations

import pytest

from dsproxy.fleet import datastores_prefix, hosts_prefix
from dsproxy.fleet.etcd import Etcd, normalize_endpoint, prefix_end
from tests.helpers import modules_loaded_by_the_daemons


def test_endpoints_are_host_port_with_or_without_http() -> None:
    assert normalize_endpoint("127.0.0.1:2379") == "127.0.0.1:2379"
    assert normalize_endpoint(" http://etcd1.example:2379/ ") == "etcd1.example:2379"
    assert normalize_endpoint("[::1]:2379") == "[::1]:2379"
    for bad in ("etcd1", "http://etcd1", "etcd1:port", "etcd1:0", "etcd1:70000", "http://e:1/v3", ":2379"):
        with pytest.raises(ValueError, match="expected host:port") as info:
            normalize_endpoint(bad)
        assert repr(bad) in str(info.value)
    assert normalize_endpoint("https://etcd1:2379") == "etcd1:2379"  # TLS: dsproxy.fleet.tls.wanted
    with pytest.raises(ValueError, match="mix http:// and https://"):
        Etcd(["https://e1:2379", "http://e2:2379"])
    with pytest.raises(ValueError, match="at least one endpoint"):
        Etcd([])
    with pytest.raises(ValueError, match="at least one endpoint"):
        Etcd("127.0.0.1:2379")  # a string is not a list of endpoints


def test_a_prefix_range_covers_exactly_its_keys() -> None:
    assert prefix_end(b"/dsproxy/datastores/") == b"/dsproxy/datastores0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"  # everything from the key on
    assert datastores_prefix("/dsproxy") == datastores_prefix("/dsproxy/") == b"/dsproxy/datastores/"
    assert hosts_prefix("/fleet1") == b"/fleet1/hosts/"


def test_grpc_is_loaded_only_in_fleet_mode() -> None:
    assert modules_loaded_by_the_daemons("grpc", "aetcd", "google") == []
