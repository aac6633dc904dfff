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

from . import access, chat, cluster, link, models, serve, status
from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, Parser

__all__ = ["CliError", "build_parser", "main"]

GROUPS = (serve, chat, models, link, status, access, cluster)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # grpc core prints its own multi-line errors to stderr; we report failures in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from lmlink.client.errors import LmlinkError

    expected: tuple[type[BaseException], ...] = (LmlinkError,)
    if args.command in ("serve", "cluster"):
        from lmlink.engine.types import EngineError
        from lmlink.server import ServeError

        expected += (EngineError, ServeError)
    try:
        return args.run(args)
    except CliError as exc:
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return exc.exit_code
    except expected as exc:
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
