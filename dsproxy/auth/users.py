"""Auth ids and ``user.cfg`` (users and API-token metadata) in PBS's section-config format.

An auth id is a user ``name@realm`` or a token ``name@realm!tokenname`` (PBS ``Authid``): the user
name has no white space, ``:``, ``/`` or control character; realm and token name are PBS "safe ids"
(``[A-Za-z0-9_][A-Za-z0-9._-]*``, realm 2-32 characters, token name up to 64); the whole id at
most 64 + 1 + 64 characters.

``user.cfg`` is section config (the grammar of :mod:`dsproxy.config.section`): ``user: ID`` and
``token: ID`` headers, tab-indented ``key value`` properties, a blank line between sections.  The
properties dsproxy reads are ``enable`` (default true) and ``expire`` (epoch seconds, 0 = never);
the others (``comment``, ``email``, ``firstname``, ``lastname``, whatever a newer PBS adds) are kept
as text and written back unchanged, so a file from a PBS host round-trips.  An unknown section type
is an error, as in PBS.  ``root@pam`` exists even when the file does not name it (PBS adds it when
it loads the file).

A token is *active* when its section exists, is enabled and not expired, and its user's section is
too (PBS's ``is_active_auth_id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from .errors import AuthConfigError

ROOT_USER: Final = "root@pam"
_SAFE_ID: Final = r"[A-Za-z0-9_][A-Za-z0-9._\-]*"
_USER_RE: Final = re.compile(r"([^\s:/\x00-\x1f\x7f@]+)@(" + _SAFE_ID + r")")
_TOKEN_NAME_RE: Final = re.compile(_SAFE_ID)
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
SECTION_TYPES: Final = ("user", "token")


def check_user_id(text: str) -> str:
    m = _USER_RE.fullmatch(text)
    if m is None or len(text) > 64 or not 2 <= len(m.group(2)) <= 32:
        raise ValueError(f"invalid user id '{_show(text)}' (expected NAME@REALM)")
    return text


def check_auth_id(text: str, *, token: bool | None = None) -> str:
    """Validate a user or token id (``token=True``: must be a token; ``False``: must be a user)."""
    user, bang, name = text.partition("!")
    check_user_id(user)
    if bang and (_TOKEN_NAME_RE.fullmatch(name) is None or len(name) > 64):
        raise ValueError(f"invalid token name '{_show(name)}' in '{_show(text)}'")
    if token is True and not bang:
        raise ValueError(f"'{_show(text)}' is not an API token id (USER@REALM!TOKENNAME)")
    if token is False and bang:
        raise ValueError(f"'{_show(text)}' is a token id, not a user id")
    return text


def user_of(auth_id: str) -> str:
    return auth_id.partition("!")[0]


def _show(text: str) -> str:
    return text[:80].encode("unicode_escape").decode("ascii")


@dataclass
class Section:
    kind: str  # "user" or "token"
    props: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.props.get("enable", "true").lower() not in _FALSE

    @property
    def expire(self) -> int:
        value = self.props.get("expire", "0")
        return int(value) if value.isdigit() else 0

    def live(self, now: float) -> bool:
        return self.enabled and (self.expire == 0 or self.expire > now)


class UserConfig(dict[str, Section]):
    """``user.cfg`` parsed: id -> section, in file order."""

    def active(self, auth_id: str, now: float) -> bool:
        if "!" in auth_id:
            token = self.get(auth_id)
            if token is None or token.kind != "token" or not token.live(now):
                return False
        user = self.get(user_of(auth_id))
        if user is None:
            return user_of(auth_id) == ROOT_USER
        return user.kind == "user" and user.live(now)

    def tokens(self, user: str | None = None) -> list[tuple[str, Section]]:
        return [(i, s) for i, s in self.items() if s.kind == "token" and (user is None or user_of(i) == user)]


def parse_users(data: bytes, filename: str = "user.cfg") -> UserConfig:
    """Parse ``user.cfg``; :class:`AuthConfigError` names every bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthConfigError(f"unable to parse '{filename}': not UTF-8") from None
    cfg = UserConfig()
    errors: list[str] = []
    current: Section | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            current = None
            continue
        if line[0].isspace():
            if current is None:
                errors.append(f"line {lineno}: property outside a section")
                continue
            key, _, value = line.strip().partition(" ")
            current.props[key] = value.strip()
            continue
        current = _header(cfg, line, lineno, errors)
    if errors:
        raise AuthConfigError(f"unable to parse '{filename}': " + "; ".join(errors[:10]))
    return cfg


def _header(cfg: UserConfig, line: str, lineno: int, errors: list[str]) -> Section | None:
    kind, colon, ident = line.partition(":")
    kind, ident = kind.strip(), ident.strip()
    if not colon or kind not in SECTION_TYPES:
        errors.append(f"line {lineno}: unknown section type '{_show(kind)}'")
        return None
    try:
        check_auth_id(ident, token=kind == "token")
    except ValueError as err:
        errors.append(f"line {lineno}: {err}")
        return None
    section = cfg[ident] = Section(kind)
    return section


def render_users(cfg: UserConfig) -> bytes:
    """``user.cfg`` text: sections in order, properties sorted, tab-indented, a blank line between."""
    out = []
    for ident, section in cfg.items():
        lines = [f"{section.kind}: {ident}"]
        for key in sorted(section.props):
            value = section.props[key]
            if any(c in value for c in "\r\n") or any(ord(c) < 32 for c in value):
                raise ValueError(f"property '{key}' of '{ident}' contains a control character")
            lines.append(f"\t{key} {value}")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out).encode()


def parse_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"parameter verification failed - '{name}': value '{_show(str(value))}' is not a boolean")
