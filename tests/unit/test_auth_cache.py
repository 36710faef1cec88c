"""The verification cache: coherent across processes through the shared generations, like the
datastore cache.  Two caches (two "workers") over one real segment and the manager's writer."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsproxy.auth import crypt
from dsproxy.auth.cache import AuthCache, parse_authorization
from dsproxy.auth.errors import AuthConfigError, AuthenticationFailed, Refused
from dsproxy.auth.writer import AccessWriter
from dsproxy.ipc import shm


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Path, shm.Segment]]:
    run = tmp_path / "run"
    cfg = tmp_path / "etc"
    run.mkdir()
    cfg.mkdir()
    seg = shm.Segment.open(run, create=True)
    try:
        yield cfg, seg
    finally:
        seg.close()
        shm.unlink(run)


def header(token: str, secret: str, sep: str = "=") -> str:
    return f"PBSAPIToken{sep}{token}:{secret}"


def make(cfg: Path, seg: shm.Segment, mode: str = "on", ttl: float = 60.0) -> AuthCache:
    return AuthCache(cfg, lambda: seg, mode=mode, ttl=ttl)


def test_create_verify_revoke_across_two_workers(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    created = w.create_token("root@pam!bench", {"comment": "bench"})
    secret = created["value"]
    a, b = make(cfg, seg), make(cfg, seg)
    for cache in (a, b):
        assert cache.authenticate(header("root@pam!bench", secret)) == "root@pam!bench"
        assert cache.authenticate(header("root@pam!bench", secret, " ")) == "root@pam!bench"
    assert a.hashes == 1 and a.hits == 1  # the second request did not hash
    w.remove_token("root@pam!bench")
    for cache in (a, b):
        with pytest.raises(AuthenticationFailed):
            cache.authenticate(header("root@pam!bench", secret))


def test_disable_and_expire_refused_at_once(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    cache = make(cfg, seg)
    cache.authenticate(header("root@pam!t", secret))
    w.update_token("root@pam!t", {"enable": False})
    with pytest.raises(AuthenticationFailed, match="disabled or expired"):
        cache.authenticate(header("root@pam!t", secret))
    w.update_token("root@pam!t", {"enable": True, "expire": int(time.time()) - 1})
    with pytest.raises(AuthenticationFailed, match="disabled or expired"):
        cache.authenticate(header("root@pam!t", secret))
    w.update_token("root@pam!t", {"expire": 0})
    assert cache.authenticate(header("root@pam!t", secret)) == "root@pam!t"


def test_wrong_and_unknown_secrets(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    cache = make(cfg, seg)
    cache.authenticate(header("root@pam!t", secret))  # now cached
    for bad in (secret[:-1] + ("1" if secret.endswith("0") else "0"), secret + "x", "", "x"):
        with pytest.raises(AuthenticationFailed):
            cache.authenticate(header("root@pam!t", bad))
    with pytest.raises(AuthenticationFailed):
        cache.authenticate(header("root@pam!other", secret))
    for value in (None, "", "Bearer x", "PBSAPIToken=nocolon", "PBSAPITokenX=root@pam!t:" + secret):
        with pytest.raises(AuthenticationFailed):
            parse_authorization(value)


def test_hand_edit_seen_by_the_manager_watch(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    w.check_files()
    cache = make(cfg, seg)
    cache.authenticate(header("root@pam!t", secret))
    other = "0f2ab7c4-6a3e-4a4b-8b53-2b7cf25f8e01"
    (cfg / "token.shadow").write_text(json.dumps({"root@pam!t": crypt.hash_secret(other)}))
    assert w.check_files() == ["token.shadow"]
    with pytest.raises(AuthenticationFailed):
        cache.authenticate(header("root@pam!t", secret))
    assert cache.authenticate(header("root@pam!t", other)) == "root@pam!t"
    # acl.cfg by hand: the privileges follow
    assert cache.privileges("root@pam!t", ("datastore", "a")) == 0
    (cfg / "acl.cfg").write_text("acl:1:/datastore:root@pam!t:DatastoreAudit\n")
    assert w.check_files() == ["acl.cfg"]
    assert cache.privileges("root@pam!t", ("datastore", "a")) != 0


def test_hand_edit_without_manager_caught_by_ttl(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    cache = make(cfg, seg, ttl=0.05)
    cache.authenticate(header("root@pam!t", secret))
    (cfg / "token.shadow").write_text("{}")  # nobody bumps
    time.sleep(0.1)
    with pytest.raises(AuthenticationFailed):
        cache.authenticate(header("root@pam!t", secret))


def test_secret_not_cached_when_generation_moves_during_hash(
    env: tuple[Path, shm.Segment], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    cache = make(cfg, seg)
    real = crypt.verify

    def slow_verify(s: str, h: str) -> bool:
        seg.bump_generation(shm.GEN_TOKEN)  # a write lands while this request hashes
        return real(s, h)

    monkeypatch.setattr(crypt, "verify", slow_verify)
    cache.authenticate(header("root@pam!t", secret))
    monkeypatch.setattr(crypt, "verify", real)
    before = cache.hashes
    cache.authenticate(header("root@pam!t", secret))
    assert cache.hashes == before + 1  # it was not cached: hashed again


@pytest.mark.parametrize("mode", ["off", "config"])
def test_baseline_modes_hash_every_request(env: tuple[Path, shm.Segment], mode: str) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    cache = make(cfg, seg, mode=mode)
    for _ in range(3):
        cache.authenticate(header("root@pam!t", secret))
    assert cache.hashes == 3
    w.remove_token("root@pam!t")
    with pytest.raises(AuthenticationFailed):
        cache.authenticate(header("root@pam!t", secret))


def test_broken_acl_fails_closed(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    w.update_acl({"path": "/datastore", "role": "Admin", "auth-id": "root@pam!t"})
    cache = make(cfg, seg)
    cache.authenticate(header("root@pam!t", secret))
    (cfg / "acl.cfg").write_text("acl:1:/datastore:root@pam!t:Admin\ngarbage\n")
    w.check_files()
    with pytest.raises(AuthConfigError, match="line 2"):
        cache.privileges("root@pam!t", ("datastore",))
    with pytest.raises(Refused) as info:  # and the manager will not overwrite the admin's edit
        w.update_acl({"path": "/", "role": "Audit", "auth-id": "root@pam!t"})
    assert info.value.status == 503


def test_files_are_0640_and_in_pbs_form(env: tuple[Path, shm.Segment]) -> None:
    cfg, seg = env
    w = AccessWriter(cfg, lambda: seg)
    w.create_token("alice@pbs!job", {"comment": "nightly"})
    w.update_acl({"path": "/datastore/s1", "role": "DatastoreBackup", "auth-id": "alice@pbs!job", "propagate": 0})
    for name in ("token.shadow", "user.cfg", "acl.cfg"):
        assert os.stat(cfg / name).st_mode & 0o777 == 0o640
    assert (cfg / "acl.cfg").read_text() == "acl:0:/datastore/s1:alice@pbs!job:DatastoreBackup\n"
    assert (cfg / "user.cfg").read_text() == (
        "user: alice@pbs\n\tenable true\n\texpire 0\n\n"
        "token: alice@pbs!job\n\tcomment nightly\n\tenable true\n\texpire 0\n"
    )
    w.remove_token("alice@pbs!job")
    assert (cfg / "acl.cfg").read_text() == ""  # its ACL entries went with it


def test_no_secret_or_hash_in_logs(env: tuple[Path, shm.Segment], caplog: pytest.LogCaptureFixture) -> None:
    cfg, seg = env
    caplog.set_level(logging.DEBUG)
    w = AccessWriter(cfg, lambda: seg)
    secret = w.create_token("root@pam!t", {})["value"]
    hashed = (cfg / "token.shadow").read_text().split('"')[3]
    cache = make(cfg, seg)
    cache.authenticate(header("root@pam!t", secret))
    messages = []
    for bad in (secret + "x", secret[:8]):
        with pytest.raises(AuthenticationFailed) as info:
            cache.authenticate(header("root@pam!t", bad))
        messages.append(info.value.message)
    w.update_token("root@pam!t", {"enable": False})
    w.remove_token("root@pam!t")
    text = caplog.text + " ".join(messages)
    assert "root@pam!t" in caplog.text  # the ids are logged ...
    assert secret not in text and secret[:8] not in text and hashed not in text and "$5$" not in text
