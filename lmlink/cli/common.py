"""What every command group shares: the one error type, argument types, server selection.

Exit codes: 0 ok, 1 failure, 2 usage error (bad input, nothing done), 130 interrupted.
Every expected failure is one line on stderr, `lmlink COMMAND: reason`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NoReturn

from lmlink import defaults

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """An expected failure: printed as one line; `exit_code` 1 (failure) or 2 (bad input)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(message: str) -> CliError:
    return CliError(message, EXIT_USAGE)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`lmlink chat: ...`) and exit code 2."""

    top_level = False  # set on `lmlink` itself; subcommand parsers report their own extras

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if extras and not self.top_level:  # name the subcommand: `lmlink share add: ...`
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


# ----- argument types (argparse turns their ArgumentTypeError into a usage error) ----------


def port(text: str) -> int:
    """A TCP port to listen on; 0 = any free port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (0-65535)")
    return value


def host_port(text: str) -> str:
    """HOST:PORT to dial, checked before anything is dialled."""
    try:
        defaults.parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def at_least(low: int):  # noqa: ANN201 - an argparse type
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    check.__name__ = f"at_least_{low}"
    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False):  # noqa: ANN201
    """A finite float in [low, high] (or (low, high] with low_open)."""

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) and not (value == math.inf == high):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if value < low or value > high or (low_open and value == low):
            lo = f"more than {low:g}" if low_open else f"at least {low:g}"
            hi = "" if high == math.inf else f" and at most {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {lo}{hi}")
        return value

    check.__name__ = "number"
    return check


non_negative = number(0.0)


def add_server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=host_port,
        help=f"server address (default: ${defaults.ENV_SERVER}, else discovery: mDNS, tailnet peers)",
    )
    p.add_argument(
        "--timeout", type=number(0.0, low_open=True), default=None, metavar="S",
        help="deadline for the call in seconds",
    )
    p.add_argument(
        "--direct-only",
        action="store_true",
        help="refuse a tailnet path relayed through DERP (also direct_only in config.toml)",
    )


def env_server() -> str | None:
    """$LMLINK_SERVER, checked like --server (a bad value is a usage error)."""
    value = os.environ.get(defaults.ENV_SERVER)
    if not value:
        return None
    try:
        defaults.parse_host_port(value)
    except ValueError as exc:
        raise usage_error(f"${defaults.ENV_SERVER}: {exc}") from None
    return value.strip()


def resolve_server(args: argparse.Namespace) -> tuple[str, str | None]:
    """--server, else $LMLINK_SERVER, else discovery; --direct-only checks the path either way."""
    from lmlink.client.discovery import check_path, find_server, load_settings

    settings = load_settings()
    direct_only = args.direct_only or settings.direct_only
    explicit = args.server or env_server()
    if explicit:
        if direct_only:
            check_path(explicit, direct_only=True)
        return explicit, None
    ep = find_server(direct_only=direct_only, settings=settings, model=getattr(args, "model", ""))
    print(
        f"lmlink: using {ep.name or ep.target} at {ep.target} (found via {'+'.join(ep.origins)},"
        f" path {ep.path_detail or ep.path})",
        file=sys.stderr,
    )
    return ep.target, ep.advertised_fingerprint or None


def client(args: argparse.Namespace) -> Any:
    from lmlink.client import Client

    target, fingerprint = resolve_server(args)
    return Client(target, timeout=args.timeout, expected_fingerprint=fingerprint)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
