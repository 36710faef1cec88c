"""acl.cfg, user.cfg and token.shadow in PBS's formats: files as a PBS host writes them parse,
resolve as PBS resolves them and are written back unchanged."""

from __future__ import annotations

import pytest

from dsproxy.auth import acl as acl_mod
from dsproxy.auth.errors import AuthConfigError
from dsproxy.auth.files import AccessConfig
from dsproxy.auth.shadow import parse_shadow, render_shadow
from dsproxy.auth.users import check_auth_id, parse_users, render_users

# as PBS writes them (docs: user-management.rst, config/acl; the writer groups ids per role set)
PBS_ACL = b"""acl:1:/:admin@pbs:Admin
acl:0:/datastore:audit@pbs,root@pam!mon:DatastoreAudit
acl:1:/datastore/store1:backup@pbs!job:DatastoreBackup
acl:1:/datastore/store1:user1@pbs:DatastoreAdmin
acl:1:/datastore/store2:user1@pbs:NoAccess
acl:1:/remote:admin@pbs!sync:RemoteAdmin,RemoteSyncPushOperator
acl:1:/system:admin@pbs!sync:Audit
"""

PBS_USERS = b"""user: root@pam
\tcomment Superuser
\temail root@example.com

user: backup@pbs
\tenable true
\texpire 0

token: backup@pbs!job
\tcomment nightly job
\tenable true
\texpire 0

token: root@pam!mon
\texpire 0

user: old@pbs
\tenable false
\texpire 1

token: user1@pbs!off
\tenable false
"""


def test_pbs_acl_parses_and_writes_back_unchanged() -> None:
    tree = acl_mod.parse_acl(PBS_ACL)
    assert acl_mod.render_acl(tree) == PBS_ACL


def test_acl_resolution_as_pbs() -> None:
    tree = acl_mod.parse_acl(PBS_ACL)
    users = parse_users(PBS_USERS)
    cfg = AccessConfig(users, tree)
    store1, store2 = ("datastore", "store1"), ("datastore", "store2")
    assert cfg.privileges("user1@pbs", store1) & acl_mod.DATASTORE_MODIFY
    assert cfg.privileges("user1@pbs", store2) == 0  # NoAccess
    # not propagated: /datastore only, not the stores below
    assert cfg.privileges("audit@pbs", ("datastore",)) == acl_mod.DATASTORE_AUDIT
    assert cfg.privileges("audit@pbs", store1) == 0
    # a token never has more than its user: backup@pbs has no ACL of its own
    assert cfg.privileges("backup@pbs!job", store1) == 0
    # root@pam has everything, its tokens only what their ACL says
    assert cfg.privileges("root@pam", store1) == acl_mod.ALL
    assert cfg.privileges("root@pam!mon", ("datastore",)) == acl_mod.DATASTORE_AUDIT
    assert cfg.privileges("root@pam!mon", store1) == 0
    # propagated from / and replaced by a more specific entry
    assert cfg.privileges("admin@pbs", store1) == acl_mod.ALL


def test_more_specific_replaces() -> None:
    tree = acl_mod.parse_acl(b"acl:1:/:root@pam!t:Admin\nacl:1:/datastore/a:root@pam!t:DatastoreAudit\n")
    cfg = AccessConfig(parse_users(b""), tree)
    assert cfg.privileges("root@pam!t", ("datastore", "a")) == acl_mod.DATASTORE_AUDIT
    assert cfg.privileges("root@pam!t", ("datastore", "b")) == acl_mod.ALL


@pytest.mark.parametrize(
    "line",
    ["acl:2:/:a@pbs:Admin", "acl:1:/:a@pbs:NoSuchRole", "acl:1:/:a@pbs", "acx:1:/:a@pbs:Admin", "acl:1:/: :Admin"],
)
def test_bad_acl_lines_name_the_line(line: str) -> None:
    with pytest.raises(AuthConfigError, match="line 2"):
        acl_mod.parse_acl(b"acl:1:/:a@pbs:Admin\n" + line.encode() + b"\n")


def test_pbs_user_cfg_round_trip_and_activity() -> None:
    users = parse_users(PBS_USERS)
    assert parse_users(render_users(users)) == users
    assert render_users(users) == PBS_USERS
    now = 1_800_000_000
    assert users.active("backup@pbs!job", now)
    assert users.active("root@pam!mon", now)
    assert not users.active("user1@pbs!off", now)  # disabled, and no user section
    assert not users.active("backup@pbs!nosuch", now)
    assert not users.active("old@pbs", now)


def test_expired_token_inactive() -> None:
    users = parse_users(b"token: root@pam!t\n\texpire 1000\n")
    assert users.active("root@pam!t", 999)
    assert not users.active("root@pam!t", 1001)


def test_bad_user_cfg() -> None:
    with pytest.raises(AuthConfigError, match="unknown section type"):
        parse_users(b"group: admins\n\tcomment x\n")
    with pytest.raises(AuthConfigError, match="line 1"):
        parse_users(b"token: root@pam\n")  # a token id needs !name


@pytest.mark.parametrize("good", ["root@pam!t", "a.b-c_d@pbs!x.y", "user@realm-1!T_1"])
def test_token_ids(good: str) -> None:
    assert check_auth_id(good, token=True) == good


@pytest.mark.parametrize("bad", ["root@pam", "root!t", "ro ot@pam!t", "root@p!t", "root@pam!", "a:b@pam!t", "r@pam!-x"])
def test_bad_token_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        check_auth_id(bad, token=True)


def test_shadow_as_pbs_writes_it() -> None:
    pbs = b'{"root@pam!mon":"$5$abcdefghijklmnop$0123456789012345678901234567890123456789012","a@pbs!b":"$5$x$y"}'
    entries = parse_shadow(pbs)
    assert entries["root@pam!mon"].startswith("$5$")
    assert parse_shadow(render_shadow(entries)) == entries
    assert parse_shadow(b"") == {} and parse_shadow(b"null") == {}


@pytest.mark.parametrize("bad", [b"[1]", b'{"a": 1}', b"{not json", b'{"a@pbs!b": "$5$SECRETHASH$x"'])
def test_bad_shadow_never_quotes_content(bad: bytes) -> None:
    with pytest.raises(AuthConfigError) as info:
        parse_shadow(bad)
    assert "SECRETHASH" not in str(info.value) and "$5$" not in str(info.value)
