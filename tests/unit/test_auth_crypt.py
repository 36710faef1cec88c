"""``$5$`` SHA-256 crypt: glibc's published vectors, libcrypt agreement, PBS-style hashes."""

from __future__ import annotations

import pytest

from dsproxy.auth import crypt

# Drepper's "Unix crypt using SHA-256 and SHA-512" test vectors, as glibc's crypt prints them
VECTORS = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1",
    ),
    (
        "$5$rounds=77777$short",
        "we have a short salt string but not a short password",
        "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/",
    ),
    (
        "$5$rounds=123456$asaltof16chars..",
        "a short string",
        "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD",
    ),
]


@pytest.mark.parametrize(("setting", "password", "expected"), VECTORS)
def test_glibc_vectors(setting: str, password: str, expected: str) -> None:
    assert crypt.sha256_crypt(password, setting) == expected
    assert crypt.verify(password, expected)
    assert not crypt.verify(password + "x", expected)


def test_new_hash_is_pbs_form_and_verifies() -> None:
    secret = "d4a3c9a0-5c5e-4f6b-9a34-0b1e0e6a7c11"
    h = crypt.hash_secret(secret)
    assert h.startswith("$5$") and "rounds=" not in h  # 5000 rounds: the default, not written
    assert len(h.split("$")[2]) == crypt.SALT_CHARS
    assert crypt.verify(secret, h)
    assert not crypt.verify(secret.upper(), h)


def test_agrees_with_libcrypt_when_present() -> None:
    lib = crypt.libcrypt_crypt()
    if lib is None:
        pytest.skip("libcrypt.so.1 not loadable here")
    for secret in ("a", "b" * 36, "üñï", "x" * 200):
        h = crypt.hash_secret(secret)
        assert lib(secret, h) == h
        h2 = lib(secret, "$5$rounds=6000$abcdefgh")
        assert crypt.verify(secret, h2)


@pytest.mark.parametrize(
    "bad", ["", "$6$salt$hash", "$5$rounds=10$salt$x", "$5$rounds=x$salt$", "$5$sa*t$hash", "plain", "$5$rounds=5000"]
)
def test_bad_hashes_never_verify(bad: str) -> None:
    assert not crypt.verify("secret", bad)


def test_nul_in_secret_refused() -> None:
    h = crypt.hash_secret("abc")
    assert not crypt.verify("abc\x00", h)
