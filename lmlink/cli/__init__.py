"""The `lmlink` command line: a thin layer over lmlink.server and lmlink.client.

One module per command group, each with `add_parser(sub)` (which sets `run` on its parsers).
Exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted; every expected failure is one
line on stderr (`lmlink COMMAND: reason`), never a traceback. Client commands never import
MLX, so they start fast on a laptop.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lmlink import __version__

from . import access, chat, cluster, link, models, phone, serve, status, top
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, Parser

__all__ = ["CliError", "build_parser", "main"]

GROUPS = (serve, chat, models, link, status, top, access, cluster, phone)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmlink",
        description="Serve an MLX model privately and stream tokens from it over gRPC.",
        epilog="Run 'lmlink COMMAND --help' for a command's options.",
    )
    parser.top_level = True
    parser.add_argument("--version", action="version", version=f"lmlink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def _prog(args: argparse.Namespace) -> str:
    action = getattr(args, f"{args.command}_command", None)  # share add, token list, ...
    return f"lmlink {args.command}" + (f" {action}" if action else "")


# Failures with a readable message: client errors, engine errors (bad model) and server
# set-up errors (port in use). Looked up only if their module was imported: an exception
# cannot be of a type that was never loaded, and `serve` must not import the server early.
_EXPECTED = (("lmlink.client.errors", "LmlinkError"), ("lmlink.engine.types", "EngineError"),
             ("lmlink.server", "ServeError"))


def _expected(exc: BaseException) -> bool:
    for module, name in _EXPECTED:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # grpc core prints its own multi-line errors to stderr; we report failures in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        return args.run(args)
    except CliError as exc:
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `lmlink chat ... | head`
        return EXIT_OK
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - only expected failures are caught, see _expected
        if not _expected(exc):
            raise
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
