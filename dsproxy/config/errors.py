"""The config package's exception hierarchy.

Every failure that has to do with ``datastore.cfg`` -- a bad line, a bad value handed in through the
API, a lock that could not be taken, a digest that no longer matches, a write that failed -- is a
:class:`ConfigError`.  Callers that only want to say "the config is unusable" catch the base class;
callers that map errors onto HTTP statuses (the manager) catch the subclasses.

The parser collects *every* bad line and raises once (like ``configparser.ParsingError``), so
:attr:`ConfigError.errors` is a list of ``(line, message)`` pairs, 1-based, in file order.
"""

from __future__ import annotations


class ConfigError(Exception):
    """Base of all config errors.

    ``errors`` lists ``(line, message)`` pairs (line 0 when the error is not about a line);
    ``filename`` names the file the error is about, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        filename: str | None = None,
        errors: list[tuple[int, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.errors: list[tuple[int, str]] = list(errors) if errors else [(0, message)]

    def __str__(self) -> str:
        return self.message


class ParseError(ConfigError):
    """``datastore.cfg`` (or text handed to :func:`dsproxy.config.parse`) does not parse.

    ``str(err)`` has one line per bad line: ``parsing "<file>" failed: line N - <reason>``.
    """

    def __init__(self, filename: str, errors: list[tuple[int, str]]) -> None:
        lines = [f'parsing "{filename}" failed: line {line} - {msg}' for line, msg in errors]
        super().__init__("\n".join(lines), filename=filename, errors=errors)


class PropertyError(ConfigError):
    """One property (or the section name) has a bad value; ``key`` names it.

    The text follows the PBS schema wording:
    ``parameter verification failed - '<key>': <reason>``.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"parameter verification failed - '{key}': {reason}")
        self.key = key
        self.reason = reason


class LockError(ConfigError):
    """The config lock file could not be locked in time."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f'unable to acquire lock "{path}" - {reason}', filename=path)
        self.path = path


class DigestMismatch(ConfigError):
    """The client's ``digest`` is not the digest of the file on disk."""

    def __init__(self) -> None:
        super().__init__("detected modified configuration - file changed by other user? Try again.")


class WriteError(ConfigError):
    """Writing the new file failed; the old file is still in place."""
