"""`lmlink share`, `lmlink token`, `lmlink usage`: the owner's access commands.

They work on the server's state (`--state-dir`, same default as `lmlink serve`), directly on
the server machine, or on a running server over the tailnet with `--server HOST:PORT` (the
server then checks that the caller is its owner). Every bad input is one line on stderr with
exit code 2, and nothing is changed; other failures are one line with exit code 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from lmlink import defaults

from .common import EXIT_OK, EXIT_USAGE, CliError, host_port, number, usage_error


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help="the server's state dir (default: same as `lmlink serve`: "
                   "$LMLINK_STATE_DIR or the platform's per-user state dir)")
    p.add_argument("--server", default=None, metavar="HOST:PORT", type=host_port,
                   help="manage a running server over the tailnet instead (you must be its owner)")
    p.add_argument("--timeout", type=number(0.0, low_open=True), default=10.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")


def add_parser(sub: Any) -> None:
    share = sub.add_parser(
        "share", help="share models with teammates: add, list, revoke local grants",
        description="Local shares add to the tailnet policy's grants: a caller may do what any "
        "of its grants allows, and each limit is the most generous among the grants that "
        "allow the request. Owner only.")
    share_sub = share.add_subparsers(dest="share_command", metavar="ACTION")
    add = share_sub.add_parser(
        "add", help="grant a login, tag:NAME or group:NAME access to models",
        description="Grant PRINCIPAL (alice@example.com, tag:ci or group:eng) the use of models.")
    add.add_argument("principal", help="alice@example.com, tag:NAME or group:NAME")
    add.add_argument("--model", action="append", default=[], dest="models",
                     help="model id or pattern (repeatable; '*' = every model)")
    add.add_argument("--action", action="append", default=[], dest="actions",
                     help="generate, list, info, cancel (repeatable; default: all four)")
    add.add_argument("--tokens-per-minute", default=None, metavar="N",
                     help="completion tokens per minute, per model")
    add.add_argument("--tokens-per-day", default=None, metavar="N",
                     help="completion tokens per day (24 h sliding), per model")
    add.add_argument("--max-streams", default=None, metavar="K", help="concurrent streams")
    add.add_argument("--expires", default=None, metavar="WHEN",
                     help="a duration (30m, 12h, 7d, 2w) or a date/time (2026-08-01T18:00)")
    lst = share_sub.add_parser("list", help="show shares")
    lst.add_argument("--all", action="store_true", help="also revoked and expired shares")
    rev = share_sub.add_parser(
        "revoke", help="revoke share #ID, or every active share of a principal",
        description="Revoke at once: running streams of callers who lose access end with "
        "PERMISSION_DENIED.")
    rev.add_argument("selector", help="share id (3 or #3), or a principal")
    rev.add_argument("--model", action="append", default=[], dest="models",
                     help="with a principal: only its shares naming this model")

    token = sub.add_parser(
        "token", help="bearer tokens for devices and scripts: create, list, revoke",
        description="A token names its holder on the HTTP bridge (Authorization: Bearer) and "
        "over gRPC (authorization metadata). Only its hash is stored. Owner only.")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token (printed once)")
    create.add_argument("--name", required=True, help="what the token is for, e.g. iphone")
    create.add_argument("--as", dest="as_login", default=None, metavar="LOGIN",
                        help="bind it to this login (its local shares apply); default: the owner")
    tlist = token_sub.add_parser("list", help="show tokens (never the tokens themselves)")
    tlist.add_argument("--all", action="store_true", help="also revoked tokens")
    trev = token_sub.add_parser("revoke", help="revoke a token by name or id")
    trev.add_argument("selector", help="token name or tk_ id")

    usage = sub.add_parser(
        "usage", help="summarise the audit trail: requests and tokens per user or model",
        description="Requests, prompt and completion tokens, and outcomes from the audit "
        "trail (state.db; audit.jsonl holds the same records as JSON lines). Owner only.")
    usage.add_argument("--by", default="user", help="user (default) or model")
    usage.add_argument("--since", default=None, metavar="WHEN",
                       help="a duration back from now (24h, 7d) or a date (2026-08-01)")

    for p in (add, lst, rev, create, tlist, trev, usage):
        _target_flags(p)
    share.set_defaults(_usage=share, run=cmd_share)
    token.set_defaults(_usage=token, run=cmd_token)
    usage.set_defaults(run=cmd_usage)


# ----- running a command, locally or on a server ------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    from lmlink.front_door import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _check_owner(state: Path) -> None:
    """Locally, the node owner is whoever owns the state dir (the user running the server)."""
    try:
        st = state.stat()
    except FileNotFoundError:
        return
    if os.geteuid() != 0 and st.st_uid != os.geteuid():
        raise CliError(
            f"{state} belongs to another user; only the node owner (who runs lmlink serve) "
            "may manage its shares, tokens and usage"
        )


def _run(args: argparse.Namespace, command: str, payload: dict[str, Any], *, writes: bool) -> dict[str, Any]:
    if args.server:
        if args.state_dir:
            raise usage_error("give --state-dir or --server, not both")
        return _remote(args, command, payload)
    import time

    from lmlink.access.admin import LocalBooks, run, validate
    from lmlink.access.shares import NotFound, ShareError
    from lmlink.access.store import DB_NAME, Store, StoreError

    try:  # bad input fails here, before the state dir is touched
        validate(command, payload, now=time.time())
    except ShareError as exc:
        raise usage_error(str(exc)) from None
    state = _state_dir(args)
    if args.state_dir and not writes and not state.is_dir():  # a typo is not "no shares"
        raise CliError(f"no state dir at {state} (check --state-dir)")
    _check_owner(state)
    if not writes and not (state / DB_NAME).exists():  # nothing recorded yet: create nothing
        empty: dict[str, dict[str, Any]] = {"share.list": {"shares": []}, "token.list": {"tokens": []},
                 "usage": {"by": payload.get("by") or "user", "since": None, "rows": []}}
        return empty[command]
    try:
        store = Store(state)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot use state dir {state}: {exc.strerror or exc}") from None
    try:
        result = run(LocalBooks(store), command, payload, actor=_local_actor())
        if writes:  # the change is in the audit table; mirror it into audit.jsonl
            from lmlink.access.audit import AUDIT_FILE, export_audit

            export_audit(store, state / AUDIT_FILE)
    except NotFound as exc:
        raise CliError(str(exc)) from None
    except ShareError as exc:
        raise usage_error(str(exc)) from None
    finally:
        store.close()
    return result


def _local_actor() -> str:
    import getpass

    try:
        return f"{getpass.getuser()} (local)"
    except Exception:
        return "owner (local)"


def _remote(args: argparse.Namespace, command: str, payload: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from lmlink.client.errors import LmlinkError, from_rpc_error
    from lmlink.client.security import channel_security
    from lmlink.v1 import admin_pb2, admin_pb2_grpc

    target = args.server
    try:
        security = channel_security(target)
    except LmlinkError as exc:
        raise CliError(str(exc)) from None
    channel = (grpc.secure_channel(target, security.credentials, options=security.options)
               if security.credentials is not None else grpc.insecure_channel(target))
    try:
        stub = admin_pb2_grpc.AdminStub(channel)
        token = os.environ.get(defaults.ENV_TOKEN)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        reply = stub.Run(admin_pb2.AdminRequest(command=command, arguments_json=json.dumps(payload)),
                         timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as exc:
        err = from_rpc_error(exc, target)
        if err.code == grpc.StatusCode.INVALID_ARGUMENT:  # bad input, nothing changed
            raise usage_error(str(err)) from None
        if err.code == grpc.StatusCode.UNIMPLEMENTED:
            raise CliError(f"{target} does not offer remote administration") from None
        raise CliError(str(err)) from None
    finally:
        channel.close()
    return json.loads(reply.result_json)


# ----- the commands ------------------------------------------------------------------------


def cmd_share(args: argparse.Namespace) -> int:
    action = args.share_command
    if action is None:
        args._usage.print_help(sys.stderr)
        return EXIT_USAGE
    if action == "add":
        payload = {"principal": args.principal, "models": args.models, "actions": args.actions,
                   "max_streams": args.max_streams, "tokens_per_minute": args.tokens_per_minute,
                   "tokens_per_day": args.tokens_per_day, "expires": args.expires}
        out = _run(args, "share.add", payload, writes=True)
        if args.json:
            print(json.dumps(out["share"], indent=2))
        else:
            s = out["share"]
            print(f"shared {', '.join(s['models'])} with {s['principal']} as share #{s['id']}"
                  f" ({_limits_text(s)}{_expiry_text(s)})")
        return EXIT_OK
    if action == "list":
        out = _run(args, "share.list", {"all": args.all}, writes=False)
        if args.json:
            print(json.dumps(out["shares"], indent=2))
        elif not out["shares"]:
            print("no shares" + ("" if args.all else " (active); --all shows revoked and expired"))
        else:
            for s in out["shares"]:
                status = "" if s["status"] == "active" else f"  [{s['status']}]"
                print(f"#{s['id']:<4} {s['principal']:<28} {','.join(s['models']):<20} "
                      f"{_limits_text(s)}{_expiry_text(s)}{status}")
        return EXIT_OK
    if action == "revoke":
        out = _run(args, "share.revoke", {"selector": args.selector, "models": args.models},
                   writes=True)
        if args.json:
            print(json.dumps(out["revoked"], indent=2))
        else:
            wanted = set(args.models)
            for s in out["revoked"]:
                models = [m for m in s["models"] if not wanted or m in wanted]
                print(f"revoked share #{s['id']} ({s['principal']}: {', '.join(models)})")
            for s in out.get("kept", []):
                print(f"kept {', '.join(s['models'])} for {s['principal']} as share #{s['id']}")
        return EXIT_OK
    raise usage_error(f"unknown share action {action!r}")


def cmd_token(args: argparse.Namespace) -> int:
    action = args.token_command
    if action is None:
        args._usage.print_help(sys.stderr)
        return EXIT_USAGE
    if action == "create":
        out = _run(args, "token.create", {"name": args.name, "as": args.as_login}, writes=True)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(out["token"])
            print(f"token {out['id']} ({out['name']}, acts as {out['as']}): shown only now; "
                  "send it as 'Authorization: Bearer <token>'", file=sys.stderr)
        return EXIT_OK
    if action == "list":
        out = _run(args, "token.list", {"all": args.all}, writes=False)
        if args.json:
            print(json.dumps(out["tokens"], indent=2))
        elif not out["tokens"]:
            print("no tokens")
        else:
            for t in out["tokens"]:
                used = f"last used {t['last_used_at']}" if t["last_used_at"] else "never used"
                status = "" if t["status"] == "active" else f"  [{t['status']}]"
                print(f"{t['id']:<12} {t['name']:<20} as {t['as']:<28} created {t['created_at']}, "
                      f"{used}{status}")
        return EXIT_OK
    if action == "revoke":
        out = _run(args, "token.revoke", {"selector": args.selector}, writes=True)
        if args.json:
            print(json.dumps(out["revoked"], indent=2))
        else:
            for t in out["revoked"]:
                print(f"revoked token {t['id']} ({t['name']})")
        return EXIT_OK
    raise usage_error(f"unknown token action {action!r}")


def cmd_usage(args: argparse.Namespace) -> int:
    out = _run(args, "usage", {"by": args.by, "since": args.since}, writes=False)
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    by = out["by"]
    if not out["rows"]:
        print("no requests recorded" + (f" since {out['since']}" if out["since"] else ""))
        return EXIT_OK
    print(f"{by:<30} {'requests':>8} {'prompt':>9} {'completion':>10} {'completed':>9} "
          f"{'refused':>7} {'failed':>6}")
    for r in out["rows"]:
        print(f"{r[by]:<30} {r['requests']:>8} {r['prompt_tokens']:>9} {r['completion_tokens']:>10} "
              f"{r['completed']:>9} {r['refused']:>7} {r['failed']:>6}")
    return EXIT_OK


def _limits_text(s: dict[str, Any]) -> str:
    parts = []
    if s.get("max_streams"):
        parts.append(f"{s['max_streams']} streams")
    if s.get("tokens_per_minute"):
        parts.append(f"{s['tokens_per_minute']} tokens/min")
    if s.get("tokens_per_day"):
        parts.append(f"{s['tokens_per_day']} tokens/day")
    return ", ".join(parts) or "no limits"


def _expiry_text(s: dict[str, Any]) -> str:
    if not s.get("expires_at"):
        return ""
    when = dt.datetime.fromisoformat(s["expires_at"]).astimezone()
    return f", expires {when:%Y-%m-%d %H:%M}"
