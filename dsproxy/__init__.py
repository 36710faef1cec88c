"""dsproxy: datastore lookups with a shared-memory generation cache.

The stable public API (docs/design.md §5.3)::

    import dsproxy
    reg = dsproxy.Registry(base_dir="/tmp/x", cache="on", ttl=60.0)
    with reg.lookup("store1", dsproxy.Operation.WRITE) as h:
        h.name, h.path
    reg.active_operations("store1")     # {"read": N, "write": M}
    reg.generation
    reg.close()
"""

from . import config
from .config import ConfigError, Operation
from .errors import ConfigUnavailable, DatastoreError, InstanceError, MaintenanceRefused, NoSuchDatastore
from .registry import Handle, Registry

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConfigUnavailable",
    "DatastoreError",
    "Handle",
    "InstanceError",
    "MaintenanceRefused",
    "NoSuchDatastore",
    "Operation",
    "Registry",
    "config",
]
