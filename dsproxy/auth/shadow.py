"""``token.shadow``: a JSON object, token id -> ``$5$`` hash of its secret (PBS ``token_shadow.rs``).

Written compact with sorted keys (PBS writes ``serde_json::to_vec`` of a map: compact, any order;
either form reads back the same).  A missing or empty file is no tokens.  A file that is not a JSON
object of strings is an :class:`AuthConfigError` whose message never quotes the file: it holds
hashes.
"""

from __future__ import annotations

import json

from .errors import AuthConfigError


def parse_shadow(data: bytes, filename: str = "token.shadow") -> dict[str, str]:
    if not data.strip():
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        value = None
    if value is None and data.strip() == b"null":
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise AuthConfigError(f"unable to parse '{filename}'")  # never the content: it holds hashes
    return value


def render_shadow(entries: dict[str, str]) -> bytes:
    return json.dumps(dict(sorted(entries.items())), separators=(",", ":")).encode()
