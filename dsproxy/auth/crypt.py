"""SHA-256 crypt (``$5$``), the hash PBS keeps in ``token.shadow``: verify and create.

PBS hashes token secrets with ``proxmox_sys::crypt::encrypt_pw`` (glibc ``crypt`` with a ``$5$``
salt: 5000 rounds, 16 salt characters) and verifies with ``crypt`` again.  The standard library's
``crypt`` module is deprecated in 3.11 and gone in 3.13, so dsproxy needs another way.

Candidates, measured on the project machine (Python 3.11.7, 2 shared cores; one verification of a
5000-round ``$5$`` hash of a 36-character secret, median of 50, two runs;
``python -m dsproxy.auth.crypt`` reprints it):

========================================  ===========  ============================================
candidate                                 per verify   notes
========================================  ===========  ============================================
libcrypt ``crypt_r`` via ``ctypes``       2.55-2.60 ms libxcrypt 4.4 (``libcrypt.so.1``): its own
                                                       SHA-256, slower than OpenSSL's
``passlib`` 1.7.4                         --           unmaintained (last release 2020; warns on
                                                       3.12, breaks with bcrypt >= 4.1): excluded
``libpass`` 1.9.4 (maintained fork)       1.95-2.13 ms pure-Python "builtin" backend over hashlib
pure Python here (``hashlib``)            2.02-2.06 ms no dependency; same speed as libpass
========================================  ===========  ============================================

Choice: **the pure-Python implementation in this module** (Drepper's "Unix crypt using SHA-256",
each round one ``hashlib.sha256`` call over a precomputed 42-round cycle).  It is as fast as the
best candidate, needs no package and no C library, and behaves the same on 3.11-3.13.  It is
checked against glibc's published test vectors and, where ``libcrypt.so.1`` loads, against
libcrypt itself (:func:`libcrypt_crypt`; ``tests/unit/test_auth_crypt.py``).  A verification
costs ~2 ms of CPU, so the verification cache (:mod:`dsproxy.auth.cache`) pays it once per token
and generation, not per request.

Rounds below 1000 are refused by libxcrypt (it returns ``*0``) while Drepper's spec clamps them to
1000; both paths here refuse them (PBS never writes them) so they cannot disagree.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import secrets
import threading
from typing import Final

ROUNDS_DEFAULT: Final = 5000
ROUNDS_MIN: Final = 1000
ROUNDS_MAX: Final = 999_999_999
SALT_CHARS: Final = 16
_ALPHABET: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# byte order of the final base-64 encoding (Drepper, "Unix crypt using SHA-256 and SHA-512")
_ORDER: Final = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5), (6, 16, 26), (27, 7, 17),
    (18, 28, 8), (9, 19, 29),
)  # fmt: skip
#: a glibc test vector: the self-test of the libcrypt backend
_VECTOR: Final = (
    "Hello world!",
    "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
)


class CryptError(ValueError):
    """A hash string that is not a usable ``$5$`` hash (the message never contains it)."""


def _b64(data: bytes, a: int, b: int, c: int, n: int) -> str:
    w = (data[a] << 16) | (data[b] << 8) | data[c]
    return "".join(_ALPHABET[(w >> (6 * i)) & 0x3F] for i in range(n))


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // 32 + 1))[:length]


def parse_setting(setting: str) -> tuple[int, bool, str]:
    """``$5$[rounds=N$]salt[$hash]`` -> ``(rounds, rounds given, salt)``; :class:`CryptError` if not."""
    if not setting.startswith("$5$"):
        raise CryptError("not a SHA-256 crypt hash ($5$)")
    rest = setting[3:]
    rounds, explicit = ROUNDS_DEFAULT, False
    if rest.startswith("rounds="):
        text, sep, rest = rest[7:].partition("$")
        if not sep or not text.isdigit() or not ROUNDS_MIN <= int(text) <= ROUNDS_MAX:
            raise CryptError("bad rounds in a $5$ hash")
        rounds, explicit = int(text), True
    salt = rest.split("$", 1)[0][:SALT_CHARS]
    if any(ch not in _ALPHABET for ch in salt):
        raise CryptError("bad salt in a $5$ hash")
    return rounds, explicit, salt


def sha256_crypt_python(password: str, setting: str) -> str:
    """The ``$5$`` hash of ``password`` with the salt (and rounds) of ``setting``, in pure Python."""
    rounds, explicit, salt_text = parse_setting(setting)
    pw, salt = password.encode(), salt_text.encode()
    alt = hashlib.sha256(pw + salt + pw).digest()
    ctx = hashlib.sha256(pw + salt + _repeat(alt, len(pw)))
    i = len(pw)
    while i:
        ctx.update(alt if i & 1 else pw)
        i >>= 1
    a = ctx.digest()
    p = _repeat(hashlib.sha256(pw * len(pw)).digest(), len(pw))
    s = _repeat(hashlib.sha256(salt * (16 + a[0])).digest(), len(salt))
    c = _rounds(a, p, s, rounds)
    out = "".join(_b64(c, a, b, d, 4) for a, b, d in _ORDER)
    tail = (c[31] << 8) | c[30]
    out += "".join(_ALPHABET[(tail >> (6 * k)) & 0x3F] for k in range(3))
    prefix = f"$5$rounds={rounds}$" if explicit else "$5$"
    return f"{prefix}{salt_text}${out}"


def _rounds(c: bytes, p: bytes, s: bytes, rounds: int) -> bytes:
    """The spec's loop.  What is hashed around ``C`` repeats every 42 rounds (odd/even, ``% 3``,
    ``% 7``), so the 42 byte strings are built once and each round is one concatenation and one
    ``sha256`` call: ~25% faster than building each round's input piece by piece."""
    cycle = []
    for r in range(42):
        middle = (s if r % 3 else b"") + (p if r % 7 else b"")
        cycle.append((p + middle, b"") if r & 1 else (b"", middle + p))
    sha = hashlib.sha256
    full, rest = divmod(rounds, 42)
    for _ in range(full):
        for before, after in cycle:
            c = sha(before + c + after).digest()
    for before, after in cycle[:rest]:
        c = sha(before + c + after).digest()
    return c


class _CryptData(ctypes.Structure):
    # libxcrypt's ``struct crypt_data`` is 32768 bytes; glibc's older one is smaller: 32 KiB fits both
    _fields_ = (("opaque", ctypes.c_char * 32768),)


class _LibCrypt:
    """``crypt_r`` of ``libcrypt.so.1``; one ``crypt_data`` per thread."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
        lib = ctypes.CDLL(name, use_errno=True)
        self._crypt_r = lib.crypt_r
        self._crypt_r.restype = ctypes.c_char_p
        self._crypt_r.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
        self._local = threading.local()

    def __call__(self, password: str, setting: str) -> str:
        data = getattr(self._local, "data", None)
        if data is None:
            data = self._local.data = _CryptData()
        out = self._crypt_r(password.encode(), setting.encode(), ctypes.byref(data))
        if not out or out.startswith(b"*"):
            raise CryptError("libcrypt refused the $5$ setting")
        return str(out.decode("ascii"))


def libcrypt_crypt() -> _LibCrypt | None:
    """libcrypt's ``crypt_r``, if it loads and passes a known vector (a cross-check for tests)."""
    try:
        lib = _LibCrypt()
        if lib(_VECTOR[0], _VECTOR[1]) == _VECTOR[1]:
            return lib
    except (OSError, AttributeError, CryptError, UnicodeDecodeError):
        pass
    return None


def sha256_crypt(password: str, setting: str) -> str:
    """The ``$5$`` hash of ``password`` under ``setting`` (a salt or a whole hash)."""
    if "\x00" in password:
        raise CryptError("a secret cannot contain NUL")
    return sha256_crypt_python(password, setting)


def hash_secret(secret: str, rounds: int = ROUNDS_DEFAULT) -> str:
    """A new ``$5$`` hash of ``secret`` with a random 16-character salt (PBS's default form)."""
    salt = "".join(secrets.choice(_ALPHABET) for _ in range(SALT_CHARS))
    setting = "$5$" + (f"rounds={rounds}$" if rounds != ROUNDS_DEFAULT else "") + salt
    return sha256_crypt(secret, setting)


def verify(secret: str, hashed: str) -> bool:
    """Whether ``secret`` matches ``hashed``, compared in constant time; False for a bad hash."""
    try:
        return hmac.compare_digest(sha256_crypt(secret, hashed).encode(), hashed.encode())
    except (CryptError, UnicodeEncodeError):
        return False


def _measure() -> None:  # pragma: no cover - prints the docstring's table
    import statistics
    import time

    h = hash_secret("x" * 36)
    candidates: list[tuple[str, object]] = [("python", sha256_crypt_python)]
    lib = libcrypt_crypt()
    if lib is not None:
        candidates.insert(0, ("libcrypt", lib))
    try:
        import importlib

        libpass = importlib.import_module("passlib.hash").sha256_crypt  # libpass installs as "passlib"
        candidates.append(("libpass", lambda p, s: libpass.verify(p, s) and s))
    except ImportError:
        pass
    for name, fn in candidates:
        times = []
        for _ in range(50):
            t = time.perf_counter()
            fn("x" * 36, h)  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        print(f"{name:10} {statistics.median(times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    _measure()
