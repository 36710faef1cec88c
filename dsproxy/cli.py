"""The ``dsproxy`` command line (DESIGN §6.1).

Built on :mod:`argparse`; ``--base-dir DIR`` (env ``DSPROXY_BASE_DIR``) is accepted before or after
the subcommand.  Exit codes: 0 success, 1 the checked input is bad, 2 usage error.

So far: ``dsproxy config check [FILE]``.  The daemon and client commands arrive with the daemons.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import config
from .paths import Paths


def _add_common(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--base-dir",
        default=default,
        metavar="DIR",
        help="instance base directory (etc/, run/, datastores/); env DSPROXY_BASE_DIR",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsproxy", description="datastore lookup daemon and tools")
    _add_common(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cfg = sub.add_parser("config", help="inspect datastore.cfg")
    _add_common(cfg, argparse.SUPPRESS)
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_sub.add_parser("check", help="check that a datastore.cfg parses; print every bad line")
    _add_common(check, argparse.SUPPRESS)
    check.add_argument("file", nargs="?", help="file to check (default: the instance's datastore.cfg)")
    check.set_defaults(func=cmd_config_check)
    return parser


def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or str(Paths.resolve(args.base_dir).config_file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        print(f"dsproxy: {path}: no such file", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"dsproxy: {path}: {err.strerror}", file=sys.stderr)
        return 1
    try:
        cfg = config.parse(data, filename=path)
    except config.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{path}: OK, {len(cfg)} datastore{'s' if len(cfg) != 1 else ''}, digest {config.digest(data)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
