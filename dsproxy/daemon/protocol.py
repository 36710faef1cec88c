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
#: on every answer of a worker: its pid (the stress checker logs it with each answer)
WORKER_HEADER: Final = "x-dsproxy-worker"

#: exit code of a daemon (manager, master) or worker that cannot start: socket in use, no access,
#: a registry that cannot open -- restarting it will not help
EXIT_BOOT_FAILURE: Final = 3
