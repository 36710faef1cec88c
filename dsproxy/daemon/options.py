"""The daemons' options, each declared once (gunicorn's ``Setting`` as the model).

A :class:`Setting` names one option: its field name, command-line flag, parser, default, help and
the daemon that reads it.  Everything else is derived from :data:`SETTINGS`:

* the argparse arguments of ``dsproxy manager``, ``dsproxy proxy`` and ``dsproxy run``
  (:func:`add_arguments`);
* the defaults of :class:`ManagerOptions` and :class:`ProxyOptions` (and the checks that
  ``WorkerSpec``'s agree, in the tests), and their construction from parsed arguments
  (:func:`manager_options`, :func:`proxy_options`);
* ``dsproxy run``'s pass-through of its options to the two child daemons (:func:`argv`);
* the README's table of daemon options (:func:`readme_table`; ``python -m dsproxy.daemon.options``
  prints it, and a test checks the README holds it).

``dsproxy run`` takes every proxy option and the manager's ``--demo-stores``.  The directory options
(``--base-dir`` and friends) belong to every command, clients too, and stay in :mod:`dsproxy.cli`.

This module is imported by every ``dsproxy`` command, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar

if TYPE_CHECKING:
    from ..paths import Paths
    from .worker import WorkerSpec

T = TypeVar("T")
Daemon = Literal["manager", "proxy"]
Command = Literal["manager", "proxy", "run"]


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def check(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value <= 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return check


positive_int = _positive(int)
positive_float = _positive(float)


class Endpoint(NamedTuple):
    """A TCP address to listen on: ``host`` is an IP literal or a host name, ``port`` 0..65535."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def endpoint(text: str) -> Endpoint:
    """``HOST:PORT`` -> :class:`Endpoint`: ``127.0.0.1:8007``, ``[::1]:8007``, ``[::]:8007``,
    ``localhost:8007`` (port 0: any free one, logged at start).  Anything else is a usage error."""
    import ipaddress  # here: every dsproxy command imports this module

    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"'{text}' is not HOST:PORT (e.g. 127.0.0.1:8007, or [::1]:8007 for IPv6)")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"'{text}': the port must be a number from 0 to 65535, not '{port}'")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': '{host[1:-1]}' is not an IPv6 address") from None
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"'{text}': an IPv6 address goes in brackets, e.g. [::1]:{port}")
    elif not _HOSTNAME.fullmatch(host):
        raise argparse.ArgumentTypeError(f"'{text}': '{host}' is neither an IP address nor a host name")
    return Endpoint(host, int(port))


def etcd_endpoints(text: str) -> tuple[str, ...]:
    """``HOST:PORT[,HOST:PORT...]`` (each may start with ``http://`` or ``https://``) -> the endpoints,
    in order (``https://`` kept: it asks for TLS, see :mod:`dsproxy.fleet.tls`)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        secure = item.startswith("https://")
        bare = item.removeprefix("https://").removeprefix("http://")
        if not bare:
            raise argparse.ArgumentTypeError(f"'{text}': an empty etcd endpoint (give HOST:PORT[,HOST:PORT...])")
        endpoint(bare)  # the same rules as --listen: a usage error naming the item
        out.append("https://" + bare if secure else bare)
    plain = any(item.strip().startswith("http://") for item in text.split(","))
    if plain and any(e.startswith("https://") for e in out):
        raise argparse.ArgumentTypeError(f"'{text}': http:// and https:// mixed: give all of them one way")
    return tuple(out)


_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def etcd_prefix(text: str) -> str:
    """A key prefix: ``/`` and path components of letters, digits, ``.``, ``_``, ``-``."""
    parts = text.strip("/").split("/")
    if not text.startswith("/") or not all(_KEY_PART.fullmatch(p) for p in parts):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a key prefix like /dsproxy (components of A-Z a-z 0-9 . _ -)"
        )
    return "/" + "/".join(parts)


def host_id(text: str) -> str:
    """A host's id in the fleet (the last component of its key): letters, digits, ``.``, ``_``, ``-``."""
    if not _KEY_PART.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a host id (1-63 of A-Z a-z 0-9 . _ -, a letter or digit first)"
        )
    return text


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One option of a daemon.

    ``name`` is the field of the options object and the argparse ``dest``; the flag is ``--name``
    with dashes unless ``flag`` says otherwise.  A boolean whose default is true is switched off by
    its flag (``--no-prewarm``).  ``doc`` is the README's longer meaning (default: ``help``);
    ``default_text`` shows a default that is computed (``CPU count``).
    """

    name: str
    default: T
    help: str
    daemon: Daemon
    parse: Callable[[str], Any] | None = None  # of one value (one item of a ``repeat`` setting)
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    run: bool = False  # also an option of ``dsproxy run`` (passed through to its daemon)
    flag: str = ""
    default_text: str | None = None
    doc: str | None = None
    repeat: bool = False  # may be given several times; the value is a tuple (default ``()``)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def switch(self) -> bool:
        return isinstance(self.default, bool)

    def commands(self) -> tuple[Command, ...]:
        return (self.daemon, "run") if self.run else (self.daemon,)

    def shown_default(self) -> str:
        """The default as help and README show it; empty for none and for switches."""
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.switch or self.repeat:
            return ""
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = self.shown_default()
        help = f"{self.help} (default {shown})" if shown else self.help
        if self.switch:
            action = "store_false" if self.default else "store_true"
            parser.add_argument(self.option, dest=self.name, action=action, help=help)
            return
        if self.repeat:
            parser.add_argument(
                self.option, dest=self.name, type=self.parse or str, action="append", metavar=self.metavar, help=help
            )
            return
        parser.add_argument(
            self.option,
            dest=self.name,
            type=self.parse or str,
            default=self.default,
            choices=self.choices,
            metavar=self.metavar,
            help=help,
        )

    def to_argv(self, value: Any) -> list[str]:
        """The arguments that give ``value`` to a child daemon; none for the default."""
        if value == self.default or value is None:
            return []
        if self.switch:
            return [self.option]
        if self.repeat:
            return [arg for item in value for arg in (self.option, str(item))]
        return [self.option, str(value)]


# -- the declarations ---------------------------------------------------------------------------------

DEMO_STORES = Setting(
    "demo_stores", 0, "make sure N demo datastores (demo0001...) exist", "manager", int, "N", run=True,
    doc="make sure `demo0001`… exist",
)  # fmt: skip
WATCH_INTERVAL = Setting(
    "watch_interval", 0.5, "how often to look for manual edits of datastore.cfg", "manager", positive_float, "S",
    doc="manual-edit poll",
)  # fmt: skip
MAINTENANCE_TIMEOUT = Setting(
    "maintenance_timeout", 10.0, "how long an offline/unmount/delete transition waits for workers", "manager",
    positive_float, "S",
)  # fmt: skip
ADMIN_GROUP = Setting[str | None](
    "admin_group", None, "members may change the configuration", "manager", metavar="GROUP",
    doc="members may change the config (root and the manager's user always may)",
)  # fmt: skip
PROXY_USER = Setting[str | None](
    "proxy_user", None, "user the proxy runs as (its forwarded client ids are trusted)", "manager", metavar="USER",
    doc="systemd setup: the user the proxy runs as; its forwarded client ids are trusted",
)  # fmt: skip
STORE_OWNER = Setting[str | None](
    "store_owner", None, "owner of created datastore directories", "manager", metavar="USER",
    doc="systemd setup: owner of new datastore directories",
)  # fmt: skip
ETCD = Setting[tuple[str, ...] | None](
    "etcd", None, "fleet mode: the datastore configuration lives in etcd at these endpoints", "manager",
    etcd_endpoints, "ENDPOINT[,ENDPOINT...]",
    doc="fleet mode: the datastore configuration is etcd's, mirrored into datastore.cfg (see Fleet mode)",
)  # fmt: skip
ETCD_PREFIX = Setting(
    "etcd_prefix", "/dsproxy", "the fleet's key prefix in etcd", "manager", etcd_prefix, "PREFIX",
    doc="the fleet's keys: `PREFIX/datastores/NAME`, `PREFIX/hosts/ID`",
)  # fmt: skip
HOST_ID = Setting[str | None](
    "host_id", None, "this host's id in the fleet", "manager", host_id, "ID", default_text="the host name",
)  # fmt: skip
FLEET_LEASE_TTL = Setting(
    "fleet_lease_ttl", 10, "TTL of this host's key in etcd: a host silent that long is not waited for", "manager",
    positive_int, "S",
)  # fmt: skip
FLEET_FENCING = Setting(
    "fleet_fencing", "serve", "what a host cut off from etcd past its lease does with new operations", "manager",
    choices=("serve", "offline"),
    doc="cut off from etcd past its lease: `serve` the last mirror, or take every store `offline` locally",
)  # fmt: skip
ETCD_TIMEOUT = Setting(
    "etcd_timeout", 2.0, "deadline of each etcd call (per endpoint)", "manager", positive_float, "S"
)  # fmt: skip
ETCD_CACERT = Setting[str | None](
    "etcd_cacert", None, "TLS to etcd: CA certificates (PEM) that verify the members", "manager", metavar="FILE",
    doc="TLS to etcd: the CA certificates (PEM) that verify the members (default with `https://` endpoints: "
    "the system's)",
)  # fmt: skip
ETCD_CERT = Setting[str | None](
    "etcd_cert", None, "TLS to etcd: this client's certificate (PEM), for --client-cert-auth", "manager",
    metavar="FILE",
)  # fmt: skip
ETCD_KEY = Setting[str | None](
    "etcd_key", None, "TLS to etcd: the private key of --etcd-cert (PEM, unencrypted)", "manager", metavar="FILE",
)  # fmt: skip

WORKERS = Setting(
    "workers", os.cpu_count() or 1, "worker processes", "proxy", positive_int, "N", run=True, default_text="CPU count"
)
CACHE = Setting(
    "cache", "on", "lookup cache mode", "proxy", choices=("on", "config", "off"), run=True,
    doc="`on` = dsproxy; `config`, `off` = the two baselines (§5.2)",
)  # fmt: skip
TTL = Setting(
    "ttl", 60.0, "config cache TTL: re-check datastore.cfg after S seconds even without a bump", "proxy",
    positive_float, "S", run=True, doc="re-check the file after S seconds even without a bump",
)  # fmt: skip
GRACEFUL_TIMEOUT = Setting(
    "graceful_timeout", 10.0, "drain time on SIGTERM / reload", "proxy", positive_float, "S", run=True
)
FORWARD_TIMEOUT = Setting(
    "forward_timeout", 30.0, "how long a forwarded config write waits for the manager before a 504", "proxy",
    positive_float, "S", run=True,
)  # fmt: skip
CRASH_LIMIT = Setting(
    "crash_limit", 10, "worker crashes per minute before the master gives up with exit 1", "proxy", positive_int, "N",
    run=True,
)  # fmt: skip
WORKER_TIMEOUT = Setting(
    "worker_timeout", 30.0, "kill a worker whose heartbeat is older; 0 = never", "proxy", float, "S", run=True
)
LISTEN = Setting[tuple[Endpoint, ...]](
    "listen", (), "also serve HTTPS on this TCP address (repeatable; IPv4 or [IPv6])", "proxy", endpoint,
    "HOST:PORT", run=True, repeat=True,
    doc="also serve the API over HTTPS on this address (repeatable: `127.0.0.1:8007`, `[::]:8007`); "
    "TLS always, see Remote clients",
)  # fmt: skip
TLS_CERT = Setting[str | None](
    "tls_cert", None, "PEM certificate (chain) for --listen (default CONFIG/proxy.pem, generated)", "proxy",
    metavar="FILE", run=True,
    doc="certificate (chain) of the HTTPS listeners; default `CONFIG/proxy.pem`, self-signed, made on first start",
)  # fmt: skip
TLS_KEY = Setting[str | None](
    "tls_key", None, "PEM private key of --tls-cert (default CONFIG/proxy.key)", "proxy", metavar="FILE", run=True,
    doc="its private key; default `CONFIG/proxy.key` (0640)",
)  # fmt: skip
PREWARM = Setting(
    "prewarm", True, "open each store's instance on its first request instead of ahead, in idle time", "proxy",
    run=True, flag="--no-prewarm",
)  # fmt: skip

#: every daemon option, in the order ``--help`` lists them
SETTINGS: tuple[Setting[Any], ...] = (
    DEMO_STORES, WATCH_INTERVAL, MAINTENANCE_TIMEOUT, ADMIN_GROUP, PROXY_USER, STORE_OWNER,
    ETCD, ETCD_PREFIX, HOST_ID, FLEET_LEASE_TTL, FLEET_FENCING, ETCD_TIMEOUT, ETCD_CACERT, ETCD_CERT, ETCD_KEY,
    WORKERS, CACHE, TTL, GRACEFUL_TIMEOUT, FORWARD_TIMEOUT, CRASH_LIMIT, WORKER_TIMEOUT, PREWARM,
    LISTEN, TLS_CERT, TLS_KEY,
)  # fmt: skip


# -- the option objects the daemons take ---------------------------------------------------------------


@dataclass
class ManagerOptions:
    paths: Paths
    watch_interval: float = WATCH_INTERVAL.default
    maintenance_timeout: float = MAINTENANCE_TIMEOUT.default
    admin_group: str | None = ADMIN_GROUP.default
    proxy_user: str | None = PROXY_USER.default
    store_owner: str | None = STORE_OWNER.default
    demo_stores: int = DEMO_STORES.default
    etcd: tuple[str, ...] | None = ETCD.default
    etcd_prefix: str = ETCD_PREFIX.default
    host_id: str | None = HOST_ID.default
    fleet_lease_ttl: int = FLEET_LEASE_TTL.default
    fleet_fencing: str = FLEET_FENCING.default
    etcd_timeout: float = ETCD_TIMEOUT.default
    etcd_cacert: str | None = ETCD_CACERT.default
    etcd_cert: str | None = ETCD_CERT.default
    etcd_key: str | None = ETCD_KEY.default
    socket_mode: int = 0o660


@dataclass
class ProxyOptions:
    """The master's options; the workers' (cache, ttl, ...) travel in ``spec``."""

    spec: WorkerSpec
    workers: int = WORKERS.default
    crash_limit: int = CRASH_LIMIT.default
    crash_window: float = 60.0
    worker_timeout: float = WORKER_TIMEOUT.default
    boot_timeout: float = 60.0
    socket_mode: int = 0o660
    listen: tuple[Endpoint, ...] = LISTEN.default
    tls_cert: str | None = TLS_CERT.default
    tls_key: str | None = TLS_KEY.default


# -- derived ------------------------------------------------------------------------------------------


def settings_for(command: Command) -> Iterator[Setting[Any]]:
    return (s for s in SETTINGS if command in s.commands())


def add_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    """Add the options of ``dsproxy COMMAND`` to its parser."""
    for setting in settings_for(command):
        setting.add_to(parser)


def values(args: argparse.Namespace, daemon: Daemon) -> dict[str, Any]:
    """The parsed values of ``daemon``'s settings, by field name."""
    return {s.name: _value(s, getattr(args, s.name)) for s in SETTINGS if s.daemon == daemon}


def _value(setting: Setting[Any], value: Any) -> Any:
    return tuple(value or ()) if setting.repeat else value


def manager_options(args: argparse.Namespace, paths: Paths) -> ManagerOptions:
    return ManagerOptions(paths=paths, **values(args, "manager"))


def proxy_options(args: argparse.Namespace, paths: Paths) -> ProxyOptions:
    """The master's options; the workers' go into a ``WorkerSpec`` naming this process as master."""
    from .http import Limits
    from .worker import WorkerSpec

    given = values(args, "proxy")
    in_spec = {f.name for f in dataclasses.fields(WorkerSpec)}
    spec = WorkerSpec(
        paths=paths, limits=Limits(), master_pid=os.getpid(), **{k: v for k, v in given.items() if k in in_spec}
    )
    return ProxyOptions(spec=spec, **{k: v for k, v in given.items() if k not in in_spec})


def argv(args: argparse.Namespace, daemon: Daemon) -> list[str]:
    """``dsproxy run``'s options for ``daemon``, as its command line (what differs from the default)."""
    out: list[str] = []
    for setting in settings_for("run"):
        if setting.daemon == daemon:
            out += setting.to_argv(getattr(args, setting.name))
    return out


def readme_table(settings: Sequence[Setting[Any]] = SETTINGS) -> str:
    """The README's table of daemon options, proxy first."""

    def option(s: Setting[Any]) -> str:
        value = "|".join(s.choices) if s.choices else s.metavar
        text = f"{s.daemon} {s.option}" + (f" {value}" if value else "")
        return "`" + text.replace("|", "\\|") + "`"

    def default(s: Setting[Any]) -> str:
        shown = s.shown_default()
        return f" `{shown}` " if isinstance(s.default, str) and shown else f" {shown} " if shown else " "

    rows = ["| option | default | meaning |", "|---|---|---|"]
    for daemon in ("proxy", "manager"):
        rows += [f"| {option(s)} |{default(s)}| {s.doc or s.help} |" for s in settings if s.daemon == daemon]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
