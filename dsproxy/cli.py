"""The ``dsproxy`` command line (docs/design.md §6.1).

Built on :mod:`argparse`.  The directory options (``--base-dir`` -- env ``DSPROXY_BASE_DIR`` --
``--config-dir``, ``--run-dir``, ``--data-dir``) are accepted before or after the subcommand.
Tables are drawn with ``rich``; every read command takes ``--json`` for the raw answer.

Daemons: ``manager``, ``proxy``, ``run``.  Clients of ``<run>/proxy.sock``: ``datastore``,
``status``, ``token``, ``acl`` (the last two are forwarded to the manager, the only writer of
``token.shadow``, ``user.cfg`` and ``acl.cfg``).  Offline: ``config check``, ``cert info``.  Clients
of etcd: ``fleet import``, ``fleet status`` (:mod:`dsproxy.fleet.admin`; gRPC is imported by them only).

Exit codes: 0 success, 1 failure (bad input, refused request, daemon not reachable), 2 usage error,
3 a daemon could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import config
from .daemon import options
from .paths import Paths


def _add_dirs(parser: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--base-dir",
        default=default,
        metavar="DIR",
        help="instance base directory (etc/, run/, datastores/); env DSPROXY_BASE_DIR",
    )
    parser.add_argument(
        "--config-dir", default=default, metavar="DIR", help="directory of datastore.cfg (default BASE/etc)"
    )
    parser.add_argument(
        "--run-dir", default=default, metavar="DIR", help="sockets, pid files, shared-memory name (default BASE/run)"
    )
    parser.add_argument(
        "--data-dir", default=default, metavar="DIR", help="default parent of new datastores (default BASE/datastores)"
    )


def _paths(args: argparse.Namespace) -> Paths:
    return Paths.resolve(args.base_dir, args.config_dir, args.run_dir, args.data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsproxy", description="datastore lookup daemon and its tools")
    _add_dirs(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        _add_dirs(p, top=False)
        return p

    m = command("manager", "run the manager: the only writer of datastore.cfg")
    options.add_arguments(m, "manager")
    m.set_defaults(func=cmd_manager)

    p = command("proxy", "run the proxy: a master and N workers serving the API on proxy.sock")
    options.add_arguments(p, "proxy")
    p.set_defaults(func=cmd_proxy)

    r = command("run", "run manager and proxy in the foreground (local use; Ctrl-C stops both)")
    options.add_arguments(r, "run")
    r.set_defaults(func=cmd_run)

    ds = command("datastore", "list, show, create, update or remove datastores (via proxy.sock)")
    ds_sub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a = ds_sub.add_parser(name, help=help, description=help)
        _add_dirs(a, top=False)
        a.add_argument("--socket", metavar="PATH", help="proxy socket (default RUN/proxy.sock)")
        return a

    a = action("list", "list the datastores")
    a.add_argument("--json", action="store_true", help="print the raw JSON answer")
    a.set_defaults(func=cmd_ds_list)
    a = action("show", "show one datastore's configuration")
    a.add_argument("name")
    a.add_argument("--json", action="store_true", help="print the raw JSON answer")
    a.set_defaults(func=cmd_ds_show)
    a = action("create", "create a datastore (lays out its directory)")
    a.add_argument("name")
    a.add_argument("--path", help="absolute path (default DATA/NAME); must be missing or empty")
    a.add_argument("--comment")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other property")
    a.set_defaults(func=cmd_ds_create)
    a = action("update", "change properties of a datastore")
    a.add_argument("name")
    a.add_argument("--comment")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a property")
    a.add_argument("--delete", action="append", default=[], metavar="KEY", help="remove a property")
    a.add_argument(
        "--maintenance",
        metavar="TYPE[:MESSAGE]",
        help="read-only, offline, s3-refresh, unmount or delete (with a message); 'none' clears",
    )
    a.add_argument("--digest", help="refuse if the config changed since this digest was read")
    a.set_defaults(func=cmd_ds_update)
    a = action("remove", "remove a datastore from the configuration (its data stays)")
    a.add_argument("name")
    a.add_argument("--digest", help="refuse if the config changed since this digest was read")
    a.set_defaults(func=cmd_ds_remove)

    st = command("status", "status of the proxy, or of one datastore")
    st.add_argument("store", nargs="?")
    st.add_argument("--verbose", action="store_true", help="with a store: add gc-status and snapshot counts")
    st.add_argument("--json", action="store_true", help="print the raw JSON answer")
    st.add_argument("--socket", metavar="PATH", help="proxy socket (default RUN/proxy.sock)")
    st.set_defaults(func=cmd_status)

    _add_token_commands(command)
    _add_acl_commands(command)

    cfg = command("config", "inspect datastore.cfg")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_sub.add_parser("check", help="check that a datastore.cfg parses; print every bad line")
    _add_dirs(check, top=False)
    check.add_argument("file", nargs="?", help="file to check (default: the instance's datastore.cfg)")
    check.set_defaults(func=cmd_config_check)

    _add_fleet_commands(command)

    cert = command("cert", "the certificate of the HTTPS listeners (proxy --listen)")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    info = cert_sub.add_parser(
        "info", help="subject, validity, SANs and SHA-256 fingerprint (the AA:BB:... form clients pin)"
    )
    _add_dirs(info, top=False)
    info.add_argument("file", nargs="?", help="PEM certificate (default: CONFIG/proxy.pem, what --listen serves)")
    info.add_argument("--json", action="store_true", help="print the fields as JSON")
    info.set_defaults(func=cmd_cert_info)
    return parser


def _sub_action(parent: argparse.ArgumentParser, dest: str) -> Any:
    sub = parent.add_subparsers(dest=dest, required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        _add_dirs(a, top=False)
        a.add_argument("--socket", metavar="PATH", help="proxy socket (default RUN/proxy.sock)")
        return a

    return action


def _add_token_commands(command: Any) -> None:
    action = _sub_action(command("token", "create, list, update or remove API tokens (PBS format)"), "action")
    a = action("create", "create an API token; prints its secret once")
    a.add_argument("tokenid", metavar="USER@REALM!NAME")
    a.add_argument("--comment")
    a.add_argument("--expire", type=int, metavar="EPOCH", help="expiry, seconds since the epoch (0 = never)")
    a.add_argument("--json", action="store_true", help="print the raw JSON answer")
    a.set_defaults(func=cmd_token_create)
    a = action("list", "list API tokens (of one user, or all)")
    a.add_argument("user", nargs="?", metavar="USER@REALM")
    a.add_argument("--json", action="store_true", help="print the raw JSON answer")
    a.set_defaults(func=cmd_token_list)
    a = action("update", "enable, disable or change a token")
    a.add_argument("tokenid", metavar="USER@REALM!NAME")
    group = a.add_mutually_exclusive_group()
    group.add_argument("--enable", dest="enable", action="store_true", default=None)
    group.add_argument("--disable", dest="enable", action="store_false")
    a.add_argument("--comment")
    a.add_argument("--expire", type=int, metavar="EPOCH")
    a.set_defaults(func=cmd_token_update)
    a = action("remove", "remove a token (its secret and ACL entries too)")
    a.add_argument("tokenid", metavar="USER@REALM!NAME")
    a.set_defaults(func=cmd_token_remove)


def _add_acl_commands(command: Any) -> None:
    action = _sub_action(command("acl", "list or change the access control list (acl.cfg)"), "action")
    a = action("list", "list ACL entries")
    a.add_argument("--json", action="store_true", help="print the raw JSON answer")
    a.set_defaults(func=cmd_acl_list)
    a = action("update", "grant (or with --delete revoke) ROLE on PATH")
    a.add_argument("path", help="/, /datastore or /datastore/NAME")
    a.add_argument("role", help="a PBS role: Admin, Audit, DatastoreAudit, DatastoreReader, DatastoreAdmin, ...")
    a.add_argument("--auth-id", required=True, metavar="ID", help="user@realm or user@realm!token")
    a.add_argument("--propagate", type=int, choices=(0, 1), default=1)
    a.add_argument("--delete", action="store_true")
    a.set_defaults(func=cmd_acl_update)


# -- daemons ------------------------------------------------------------------------------------------


def _add_fleet_commands(command: Any) -> None:
    fleet = command("fleet", "fleet mode: the datastore configuration of many hosts in etcd")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        _add_dirs(a, top=False)
        return a

    def etcd_options(a: argparse.ArgumentParser) -> None:
        a.add_argument(
            "--etcd",
            default="127.0.0.1:2379",
            metavar="ENDPOINT[,ENDPOINT...]",
            help="etcd members, host:port, http://host:port or https://host:port (default 127.0.0.1:2379)",
        )
        a.add_argument("--etcd-cacert", metavar="FILE", help="TLS: CA certificates (PEM) that verify the members")
        a.add_argument("--etcd-cert", metavar="FILE", help="TLS: this client's certificate (PEM)")
        a.add_argument("--etcd-key", metavar="FILE", help="TLS: the private key of --etcd-cert (PEM)")
        a.add_argument(
            "--etcd-prefix", default="/dsproxy", metavar="PREFIX", help="key prefix of the fleet (default /dsproxy)"
        )
        a.add_argument(
            "--etcd-timeout",
            type=options.positive_float,
            default=2.0,
            metavar="S",
            help="deadline of each etcd call, in seconds; a call tries every member (default 2)",
        )

    a = action("import", "push every datastore of a datastore.cfg into etcd (refused if any exists there)")
    etcd_options(a)
    a.add_argument("--config", metavar="FILE", help="file to import (default: the instance's datastore.cfg)")
    a.set_defaults(func=cmd_fleet_import)
    a = action(
        "status",
        "every host of the fleet: the etcd revision it serves, its lag (revisions to the newest datastore "
        "change) and how many stores changed after it (behind)",
    )
    etcd_options(a)
    a.add_argument("--json", action="store_true", help="print the raw JSON")
    a.set_defaults(func=cmd_fleet_status)


def cmd_manager(args: argparse.Namespace) -> int:
    from .daemon.manager import main

    return main(options.manager_options(args, _paths(args)))


def cmd_proxy(args: argparse.Namespace) -> int:
    from .daemon.master import main

    return main(options.proxy_options(args, _paths(args)))


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon.run import run

    return run(_paths(args), options.argv(args, "manager"), options.argv(args, "proxy"))


# -- clients ------------------------------------------------------------------------------------------


class CommandError(Exception):
    pass


def _client(args: argparse.Namespace) -> Any:
    from .client import CLI_CONNECT_RETRY, Client

    path = args.socket or str(_paths(args).run_dir / "proxy.sock")
    return Client(path, connect_retry=CLI_CONNECT_RETRY)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from .client import ApiError

    try:
        with _client(args) as c:
            return c.request(method, path, body).raise_for_status().json()
    except ApiError as err:
        raise CommandError(err.message) from None
    except (FileNotFoundError, ConnectionRefusedError):
        sock = args.socket or str(_paths(args).run_dir / "proxy.sock")
        raise CommandError(f"cannot connect to {sock}: is the proxy running? (dsproxy run)") from None
    except BlockingIOError:
        sock = args.socket or str(_paths(args).run_dir / "proxy.sock")
        raise CommandError(f"cannot connect to {sock}: its listen queue stayed full (overloaded)") from None
    except OSError as err:
        raise CommandError(f"talking to the proxy failed: {err}") from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(soft_wrap=True).print(table)


def _props(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects KEY=VALUE, not '{pair}'")
        out[key.strip()] = value
    return out


def cmd_ds_list(args: argparse.Namespace) -> int:
    from .client import path_for

    answer = _call(args, "GET", path_for("admin", "datastore"))
    if args.json:
        _print_json(answer)
    else:
        _table(
            ("name", "comment", "maintenance"), [(d["name"], d["comment"], d["maintenance"]) for d in answer["data"]]
        )
    return 0


def cmd_ds_show(args: argparse.Namespace) -> int:
    from .client import path_for

    answer = _call(args, "GET", path_for("config", "datastore", args.name))
    if args.json:
        _print_json(answer)
    else:
        data = answer["data"]
        _table(("property", "value"), [(k, _show(data[k])) for k in sorted(data)] + [("digest", answer.get("digest"))])
    return 0


def cmd_ds_create(args: argparse.Namespace) -> int:
    from .client import path_for

    body: dict[str, Any] = {"name": args.name, **_props(args.set)}
    if args.path:
        body["path"] = args.path
    if args.comment is not None:
        body["comment"] = args.comment
    answer = _call(args, "POST", path_for("config", "datastore"), body)
    print(f"created datastore '{args.name}' (generation {answer['data']['generation']})")
    return 0


def cmd_ds_update(args: argparse.Namespace) -> int:
    from .client import path_for

    body: dict[str, Any] = _props(args.set)
    delete = list(args.delete)
    if args.comment is not None:
        body["comment"] = args.comment
    if args.maintenance is not None:
        if args.maintenance == "none":
            delete.append("maintenance-mode")
        else:
            kind, sep, message = args.maintenance.partition(":")
            if kind not in config.schema.MAINTENANCE_TYPES:
                raise CommandError(
                    f"--maintenance: '{kind}' is not one of {', '.join(config.schema.MAINTENANCE_TYPES)} or none"
                )
            body["maintenance-mode"] = f"type={kind}" + (f",message={_quote_message(message)}" if sep else "")
    if delete:
        body["delete"] = delete
    if args.digest:
        body["digest"] = args.digest
    if not body:
        raise CommandError("nothing to change: give --set, --delete, --comment or --maintenance")
    answer = _call(args, "PUT", path_for("config", "datastore", args.name), body)
    data = answer["data"]
    print(f"updated datastore '{args.name}' (generation {data['generation']})")
    if "active-operations" in data:
        ops = data["active-operations"]
        print(f"active operations still running: read {ops['read']}, write {ops['write']}")
        if data.get("lagging-processes"):
            print(f"processes that had not caught up: {', '.join(map(str, data['lagging-processes']))}")
    return 0


def _quote_message(message: str) -> str:
    from urllib.parse import quote

    return quote(message, safe=" -_.!~*'()/:;@")


def cmd_ds_remove(args: argparse.Namespace) -> int:
    from .client import path_for

    query = {"digest": args.digest} if args.digest else None
    answer = _call(args, "DELETE", path_for("config", "datastore", args.name, query=query))
    print(f"removed datastore '{args.name}' (generation {answer['data']['generation']}); its data stays on disk")
    return 0


def _fd_line(fds: dict[str, int]) -> str:
    """The answering worker's fd budget (dsproxy.fdbudget), one line."""
    limit = f" (RLIMIT_NOFILE {fds['limit']} - {fds['reserve']} reserve)" if fds.get("limit", -1) >= 0 else ""
    return (
        f"store fds: {fds['open']} open of a budget of {fds['budget']}{limit}, "
        f"{fds['reopens']} reopens, {fds['closes']} closes, {fds['refused']} refused (this worker)"
    )


def _fleet_line(fleet: dict[str, Any]) -> str:
    """Fleet mode: the revision served and the link to etcd, one line."""
    served = f"fleet: serving etcd revision {fleet['revision']} (mirror {fleet['mirror-revision']})"
    edits = f", {fleet['hand-edits-refused']} hand edits refused" if fleet["hand-edits-refused"] else ""
    if fleet["state"] == "connected":
        return f"{served}, connected{edits}"
    if fleet["state"] == "duplicate":
        return f"{served}, connected; DUPLICATE: another manager runs with this --host-id, config writes refused{edits}"
    since = fleet["disconnected-since"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "start"
    fenced = "; FENCED: every datastore offline here until etcd is back" if fleet["state"] == "fenced" else ""
    return f"{served}; disconnected since {when}, config writes refused{fenced}{edits}"


def cmd_status(args: argparse.Namespace) -> int:
    from .client import path_for

    if args.store:
        answer = _call(
            args, "GET", path_for("admin", "datastore", args.store, "status", query={"verbose": int(args.verbose)})
        )
        if args.json:
            _print_json(answer)
            return 0
        data = answer["data"]
        _table(
            ("property", "value"),
            [(k, _size(v) if k in ("total", "used", "avail") else _show(v)) for k, v in data.items()],
        )
        return 0
    node = _call(args, "GET", path_for("nodes", "localhost", "status"))
    usage = _call(args, "GET", path_for("status", "datastore-usage"))
    if args.json:
        _print_json({"node": node["data"], "datastore-usage": usage["data"]})
        return 0
    n = node["data"]
    print(
        f"generation {n['generation']}, cache={n['cache']}, ttl {n['ttl']:g} s, "
        f"nofile {n['rlimit-nofile']['soft']}/{n['rlimit-nofile']['hard']}"
        + (f", DEGRADED: {n['degraded']}" if n["degraded"] else "")
    )
    fds = n["rlimit-nofile"]
    if not fds.get("enough", True):
        print(
            f"FD LIMIT: {fds['needed']} fds needed for {fds['stores']} datastores, the limit is {fds['soft']}: "
            f"at most {fds['budget']} can be open at once per worker, the idle ones are closed and reopened "
            f"on use (raise LimitNOFILE; see the README)"
        )
    if "fds" in n:
        print(_fd_line(n["fds"]))
    if n["config-error"]:
        print(f"CONFIG ERROR (serving the last good config): {n['config-error']}")
    if "fleet" in n:
        print(_fleet_line(n["fleet"]))
    _table(
        ("worker", "generation", "lookups", "cache hits", "reloads", "errors"),
        [(w["pid"], w["generation"], w["requests"], w["cache-hits"], w["reloads"], w["errors"]) for w in n["workers"]],
    )
    print()
    rows = [
        (e["store"], _size(e.get("total")), _size(e.get("used")), _size(e.get("avail")), e.get("error", ""))
        for e in usage["data"]
    ]
    _table(("datastore", "total", "used", "avail", "error"), rows)
    return 0


def _token_path(tokenid: str) -> str:
    from .client import path_for

    user, bang, name = tokenid.partition("!")
    if not bang or not user or not name:
        raise CommandError(f"'{tokenid}' is not a token id (USER@REALM!NAME)")
    return path_for("access", "users", user, "token", name)


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options the user gave (not None), as a request body."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_token_create(args: argparse.Namespace) -> int:
    body = _given(args, "comment", "expire")
    answer = _call(args, "POST", _token_path(args.tokenid), body)
    if args.json:
        _print_json(answer["data"])
        return 0
    data = answer["data"]
    print(f"token:  {data['tokenid']}\nsecret: {data['value']}")
    print("the secret is shown only now; it has no permissions until 'dsproxy acl update' grants some")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from .client import path_for

    if args.user:
        tokens = _call(args, "GET", path_for("access", "users", args.user, "token"))["data"]
    else:
        users = _call(args, "GET", path_for("access", "users", query={"include_tokens": 1}))["data"]
        tokens = [t for u in users for t in u["tokens"]]
    if args.json:
        _print_json(tokens)
    else:
        _table(
            ("token", "enabled", "expire", "comment"),
            [(t["tokenid"], t["enable"], t["expire"] or "never", t.get("comment")) for t in tokens],
        )
    return 0


def cmd_token_update(args: argparse.Namespace) -> int:
    body = _given(args, "enable", "comment", "expire")
    if not body:
        raise CommandError("nothing to change: give --enable, --disable, --comment or --expire")
    data = _call(args, "PUT", _token_path(args.tokenid), body)["data"]
    print(f"updated token '{data['tokenid']}' (enabled: {data['enable']}, expire: {data['expire'] or 'never'})")
    return 0


def cmd_token_remove(args: argparse.Namespace) -> int:
    _call(args, "DELETE", _token_path(args.tokenid))
    print(f"removed token '{args.tokenid}'")
    return 0


def cmd_acl_list(args: argparse.Namespace) -> int:
    from .client import path_for

    entries = _call(args, "GET", path_for("access", "acl"))["data"]
    if args.json:
        _print_json(entries)
    else:
        _table(
            ("path", "user/token", "role", "propagate"),
            [(e["path"], e["ugid"], e["roleid"], int(e["propagate"])) for e in entries],
        )
    return 0


def cmd_acl_update(args: argparse.Namespace) -> int:
    from .client import path_for

    body = {"path": args.path, "role": args.role, "auth-id": args.auth_id, "propagate": bool(args.propagate)}
    if args.delete:
        body["delete"] = True
    _call(args, "PUT", path_for("access", "acl"), body)
    verb = "revoked" if args.delete else "granted"
    print(f"{verb} {args.role} on {args.path} for {args.auth_id}")
    return 0


def _show(value: Any) -> str:
    """A value for a table cell: nested data as compact JSON, nothing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "), sort_keys=True)
    return str(value)


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _as_served(path: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], str, bool]:
    """``path`` parsed, its digest and whether a fleet overlay added changes: this instance's
    ``datastore.cfg`` with the overlay beside it, as its workers serve it (not a copy or another
    file: those as they are).  A missing file raises ``FileNotFoundError`` here, where the
    workers serve no stores; ``ParseError`` as :func:`dsproxy.config.parse`."""
    from .config import overlay

    os.stat(path)
    try:
        ours = os.path.samefile(path, _paths(args).config_file)
    except OSError:
        ours = False
    if ours:
        return overlay.served_with_digest(path)
    with open(path, "rb") as f:
        data = f.read()
    return config.parse(data, filename=path), config.digest(data), False


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import overlay

    path = args.file or str(_paths(args).config_file)
    try:
        cfg, digest, overlaid = _as_served(path, args)
    except FileNotFoundError:
        print(f"dsproxy: {path}: no such file", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"dsproxy: {path}: {err.strerror}", file=sys.stderr)
        return 1
    except config.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    s = "s" if len(cfg) != 1 else ""
    beside = f" (with the changes in {overlay.NAME} not yet in the file)" if overlaid else ""
    print(f"{path}: OK, {len(cfg)} datastore{s}{beside}, digest {digest}")
    return 0


# -- fleet ------------------------------------------------------------------------------------------


def _fleet(args: argparse.Namespace, work: Any) -> Any:
    """``await work(etcd)`` with a client of ``--etcd`` (gRPC is imported here, never by other commands)."""
    import asyncio
    import logging

    from .fleet import tls
    from .fleet.etcd import Etcd, EtcdError

    logging.getLogger("dsproxy.fleet").addHandler(logging.NullHandler())  # errors are printed once, below

    endpoints = [e for e in args.etcd.split(",") if e.strip()]
    files = (args.etcd_cacert, args.etcd_cert, args.etcd_key)
    try:
        secure = tls.load(*files) if tls.wanted(endpoints, any(f is not None for f in files)) else None
    except tls.TLSFileError as err:
        raise CommandError(str(err)) from None
    except ValueError as err:
        raise CommandError(f"--etcd: {err}") from None
    try:
        etcd = Etcd(endpoints, timeout=args.etcd_timeout, tls=secure)
    except ValueError as err:
        raise CommandError(f"--etcd: {err}") from None

    async def main() -> Any:
        async with etcd:
            return await work(etcd)

    try:
        return asyncio.run(main())
    except EtcdError as err:
        raise CommandError(f"fleet: {err}") from None


def cmd_fleet_import(args: argparse.Namespace) -> int:
    from .fleet import datastores_prefix
    from .fleet.admin import import_config

    path = args.config or str(_paths(args).config_file)
    try:
        sections = _as_served(path, args)[0]  # a fleet host's recent changes may be in the overlay
    except OSError as err:
        raise CommandError(f"{path}: {err.strerror}") from None
    except config.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    base = datastores_prefix(args.etcd_prefix).decode()
    try:
        result = _fleet(args, lambda etcd: import_config(etcd, args.etcd_prefix, sections, path))
    except config.PropertyError as err:
        raise CommandError(str(err)) from None
    if result.conflicts:
        written = f"{result.imported} were imported before that" if result.imported else "nothing was written"
        print(
            f"dsproxy: refusing to import {path}: {len(result.conflicts)} of its {len(sections)} datastores "
            f"exist already under {base} ({written}):",
            file=sys.stderr,
        )
        for kv in result.conflicts:
            name = kv.key.decode(errors="replace")[len(base) :]
            same = ", the same text" if result.texts.get(name, "").encode() == kv.value else ""
            print(f"  {name} (mod_revision {kv.mod_revision}{same})", file=sys.stderr)
        return 1
    s = "" if result.imported == 1 else "s"
    print(f"imported {result.imported} datastore{s} from {path} into {base} at revision {result.revision}")
    return 0


def _ago(updated: Any, key_revision: int) -> str:
    """A host key's last update: ``3.2 s ago`` from its ``updated`` time, else the key's revision."""
    import time

    if not isinstance(updated, int | float) or isinstance(updated, bool):
        return f"at revision {key_revision}"
    return f"{max(time.time() - updated, 0.0):.1f} s ago"


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from .fleet import hosts_prefix
    from .fleet.admin import fleet_status

    status = _fleet(args, lambda etcd: fleet_status(etcd, args.etcd_prefix))
    if args.json:
        _print_json(status.as_json())
        return 0
    base = hosts_prefix(args.etcd_prefix).decode()
    s = "" if len(status.hosts) == 1 else "s"
    print(
        f"etcd revision {status.revision} ({status.endpoint}), {len(status.hosts)} host{s} under {base}; "
        f"{len(status.changes)} datastores, the newest change at revision {status.newest_change}"
    )
    columns = ["host", "revision", "lag", "behind", "workers", "last update"]
    rows: list[list[str]] = []
    for host in status.hosts:
        h = host.as_json(status.changes)
        served = (_show(h.get(k)) for k in ("revision", "lag", "behind", "workers"))
        rows.append([host.id, *served, _ago(h.get("updated"), host.mod_revision)])
    if any(host.error for host in status.hosts):
        columns.append("error")
        for row, host in zip(rows, status.hosts, strict=True):
            row.append(host.error)
    _table(columns, rows)
    return 0


def cmd_cert_info(args: argparse.Namespace) -> int:
    from .daemon import tls

    path = Path(args.file) if args.file else tls.default_files(_paths(args).config_dir).cert
    if not args.file and not path.exists():
        raise CommandError(f"{path}: no certificate yet (the proxy makes one on its first start with --listen)")
    try:
        info = tls.certificate_info(path)
    except tls.TLSError as err:
        raise CommandError(str(err)) from None
    if args.json:
        _print_json(info)
        return 0
    rows = [
        ("file", info["file"]),
        ("subject", info["subject"]),
        ("issuer", "(self-signed)" if info["self-signed"] else info["issuer"]),
        ("valid", f"{info['not-before']} .. {info['not-after']}"),
        ("names", ", ".join(info["san"]) or "(no subjectAltName)"),
        ("key", info["public-key"]),
        ("fingerprint", info["fingerprint"]),
        ("pinned key", f"{info['pinned-pubkey']}  (curl --pinnedpubkey)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except CommandError as err:
        print(f"dsproxy: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
