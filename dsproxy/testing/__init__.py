"""The harness of dsproxy's tests, benchmarks and scripts -- never imported by the daemons.

* :mod:`.stores` -- instances on disk: real datastores (:func:`dsproxy.fsutil.make_store`, the
  lay-out the manager's create makes) and a ``datastore.cfg`` naming them;
* :mod:`.daemons` -- a manager and a proxy on a base dir as one context manager (built on
  :class:`dsproxy.daemon.run.DaemonPair`, the one ``dsproxy run`` uses);
* :mod:`.etcd` -- a real etcd cluster on loopback (plain ``etcd`` processes) for the fleet tests,
  and ``python -m dsproxy.testing.etcd --measure``, the client's figures;
* :mod:`.loadgen` -- the load generator of the benchmarks (keep-alive HTTP over the Unix socket);
* :mod:`.stress` -- the stress run's actors and the checker that judges every answer.

It ships with the package so that every script, test and child process imports it the same way
(``python -m dsproxy.testing.loadgen``); nothing under ``dsproxy/`` outside this package imports
it (a unit test checks that a worker, the manager and the master never load it).
"""
