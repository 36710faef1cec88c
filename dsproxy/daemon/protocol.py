"""The names the dsproxy processes share beyond HTTP itself: headers and exit codes.

One module with no imports of its own, so that a worker (:mod:`.api`), the manager, the master and
the clients agree on them without importing each other: a worker must not load the manager's
writer (and with it ``shutil``, ``grp``, ``pwd``, ``concurrent.futures``) to name a header.
"""

from __future__ import annotations

from typing import Final

#: worker -> manager, on a forwarded config write: the end client's ``uid,gid,pid`` (``SO_PEERCRED``),
#: believed only from a trusted peer
CLIENT_HEADER: Final = "x-dsproxy-client"
#: worker -> manager, on a forwarded write of a TCP client: the token id the worker authenticated
#: (the manager re-checks its privileges from the files), believed only from a trusted peer
AUTH_ID_HEADER: Final = "x-dsproxy-auth-id"
#: on every answer of a worker: the generation of the config it served the answer under
GENERATION_HEADER: Final = "x-dsproxy-generation"
#: on every answer of a worker in fleet mode: the etcd revision of the config it served the answer
#: under (never a newer one than it has loaded: see "The fleet record" in dsproxy.ipc.shm)
REVISION_HEADER: Final = "x-dsproxy-revision"
#: client -> worker in fleet mode: answer only once this worker serves this etcd revision or a
#: later one (read-your-writes across hosts: the ``revision`` a write's answer carried), waiting
#: up to ``x-dsproxy-wait`` s for it (else MIN_REVISION_WAIT) -- then 504
MIN_REVISION_HEADER: Final = "x-dsproxy-min-revision"
WAIT_HEADER: Final = "x-dsproxy-wait"
#: the wait of a min-revision request without ``x-dsproxy-wait``, and the most it may ask
MIN_REVISION_WAIT: Final = 10.0
MIN_REVISION_WAIT_LIMIT: Final = 60.0
#: on every answer of a worker: its pid (the stress checker logs it with each answer)
WORKER_HEADER: Final = "x-dsproxy-worker"

#: exit code of a daemon (manager, master) or worker that cannot start: socket in use, no access,
#: a registry that cannot open -- restarting it will not help
EXIT_BOOT_FAILURE: Final = 3
