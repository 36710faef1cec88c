"""The daemons (docs/design.md §2), one module per process role.

* :mod:`.manager` -- ``dsproxy manager``: the only writer of ``datastore.cfg`` (its writes live in
  :mod:`.writer`), owner of the shared memory, watcher of hand edits;
* :mod:`.master` -- ``dsproxy proxy``: binds the socket, forks and supervises the workers;
* :mod:`.worker` -- one proxy worker's life: a registry, an event loop, the API of :mod:`.api`;
* :mod:`.http` -- HTTP/1.1 on httptools for both daemons; :mod:`.metrics` -- Prometheus text;
* :mod:`.systemd` -- sd_notify, socket activation, journald; :mod:`.run` -- ``dsproxy run``.
"""
