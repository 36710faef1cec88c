"""``datastore.cfg``: format, schema, maintenance modes, reading and locked writing.

Public surface (docs/design.md §5.3)::

    cfg = dsproxy.config.parse(text, filename="datastore.cfg")   # name -> properties
    text = dsproxy.config.dump(cfg)                              # canonical form
    # dsproxy.config.ConfigError: .errors is a list of (line, message), all bad lines at once
"""

from . import request
from .errors import ConfigError, DigestMismatch, LockError, ParseError, PropertyError, WriteError
from .file import config_lock, digest, read_config, read_raw, replace_file, update_config, verified_bytes
from .maintenance import MaintenanceMode, Operation
from .schema import SchemaError, Value, check_name, check_value
from .section import SectionConfig, check_section, dump, parse, render

__all__ = [
    "ConfigError",
    "DigestMismatch",
    "LockError",
    "MaintenanceMode",
    "Operation",
    "ParseError",
    "PropertyError",
    "SchemaError",
    "SectionConfig",
    "Value",
    "WriteError",
    "check_name",
    "check_section",
    "check_value",
    "config_lock",
    "digest",
    "dump",
    "parse",
    "read_config",
    "read_raw",
    "render",
    "replace_file",
    "request",
    "update_config",
    "verified_bytes",
]
