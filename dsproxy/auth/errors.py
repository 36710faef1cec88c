"""The auth package's errors: each carries the HTTP status a client gets and a message with no
secret and no hash in it."""

from __future__ import annotations


class AuthError(Exception):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthenticationFailed(AuthError):
    """401: no, unknown, bad, disabled or expired credentials."""

    status = 401


class PermissionDenied(AuthError):
    """403: authenticated, but without the privilege on the path."""

    status = 403


class AuthConfigError(AuthError):
    """503: ``user.cfg``, ``acl.cfg`` or ``token.shadow`` cannot be read or parsed (fail closed)."""

    status = 503


class Refused(AuthError):
    """A token or ACL write the manager will not do (400 bad input, 404 unknown, 409 exists, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
