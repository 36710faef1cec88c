"""Errors of the lookup API.  ``status`` is the HTTP status the daemon answers with (docs/design.md §6)."""

from __future__ import annotations


class DatastoreError(Exception):
    """A lookup was refused or failed; ``str(err)`` is the text a client sees."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchDatastore(DatastoreError):
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"no such datastore '{name}'")
        self.name = name


class MaintenanceRefused(DatastoreError):
    """``datastore 'NAME' is unavailable: <reason>`` (the maintenance mode forbids the operation) or
    ``datastore 'NAME' is not mounted`` (a removable store whose device is absent)."""

    status = 409


class ConfigUnavailable(DatastoreError):
    """No config could be loaded at all (the file does not parse and nothing was cached)."""

    status = 503


class InstanceError(DatastoreError):
    """The store is configured but its directory cannot be opened."""

    status = 500


class OutOfDescriptors(InstanceError):
    """The process ran out of file descriptors (EMFILE/ENFILE) while opening a store's files.

    Transient and the server's problem, not the client's: 503.  The cure is a higher
    ``LimitNOFILE`` (docs/design.md §7) or fewer stores open at once.
    """

    status = 503
