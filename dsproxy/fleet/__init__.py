"""Fleet mode (issue 13): many hosts' datastore configuration kept in etcd, one key per store.

* :mod:`.etcd` -- the etcd client (failover, deadlines, compare-and-set writes safe to retry,
  self-refreshing leases, resumable watches); the only module that imports ``grpc``/``aetcd``, which
  come with the ``fleet`` extra (``pip install dsproxy[fleet]``);
* :mod:`.admin` -- ``dsproxy fleet import`` / ``dsproxy fleet status``: what they do to etcd;
* :mod:`.mirror` -- the manager's fleet mode: etcd mirrored into the local ``datastore.cfg``.

Layout in etcd (``PREFIX`` default ``/dsproxy``): ``PREFIX/datastores/NAME`` holds the store's
section in canonical PBS syntax (:func:`dsproxy.config.section.render_section`); ``PREFIX/hosts/ID``
holds each host's JSON state on a lease (the revision all its serving processes have loaded).
Nothing imports this package unless fleet mode is asked for (``--etcd``, ``dsproxy fleet``).
"""

DEFAULT_PREFIX = "/dsproxy"


def datastores_prefix(prefix: str) -> bytes:
    """``PREFIX/datastores/`` as the key prefix (``prefix`` with or without its trailing slash)."""
    return f"{prefix.rstrip('/')}/datastores/".encode()


def hosts_prefix(prefix: str) -> bytes:
    """``PREFIX/hosts/`` as the key prefix."""
    return f"{prefix.rstrip('/')}/hosts/".encode()
