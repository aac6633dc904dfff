"""The `lmlink` command line: a thin layer over lmlink.server and lmlink.client.

Exit codes: 0 ok, 1 failure (one-line reason on stderr), 2 usage error, 130 interrupted.
Client commands never import MLX, so they start fast on a laptop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from lmlink import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


def _add_server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="server address (default: $LMLINK_SERVER, else discovery: mDNS, tailnet peers)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="deadline for the call in seconds"
    )
    p.add_argument(
        "--direct-only",
        action="store_true",
        help="refuse a tailnet path relayed through DERP (also direct_only in config.toml)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 60:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 60 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlink",
        description="Serve an MLX model privately and stream tokens from it over gRPC.",
        epilog="Run 'lmlink COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lmlink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve a model (default: the built-in tiny model, loopback only)",
        description="Load a model and serve it over gRPC until interrupted (Ctrl-C).",
    )
    serve.add_argument(
        "--model",
        default="builtin",
        help="'builtin', a local MLX model directory, or a Hugging Face id (default: builtin)",
    )
    serve.add_argument(
        "--listen",
        choices=("local", "tailscaled", "tsnet"),
        default="local",
        help="where to listen: local = loopback only, plaintext, for development; tailscaled = "
        "this node's tailnet addresses via the Tailscale daemon; tsnet = an embedded tailnet "
        "node (needs the tsnet extra). Tailnet modes use TLS and check every caller with WhoIs. "
        "(default: local)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address to bind in local mode (default: 127.0.0.1)",
    )
    serve.add_argument(
        "--grpc-port", type=_positive_int, default=47470, help="gRPC port, 0 = any (default: 47470)"
    )
    serve.add_argument(
        "--http-port",
        type=_positive_int,
        default=47471,
        help=(
            "port of the HTTP bridge (OpenAI-compatible /v1 API, /v1/shortcuts/ask for iOS "
            "Shortcuts, /health) on the same host as gRPC, 0 = any (default: 47471)"
        ),
    )
    serve.add_argument(
        "--state-dir",
        default=None,
        help="keys, certificates and server state (default: $LMLINK_STATE_DIR or the "
        "platform's per-user state dir); secrets are stored 0600",
    )
    serve.add_argument(
        "--localapi-socket",
        default=os.environ.get("LMLINK_LOCALAPI_SOCKET"),
        help="Tailscale LocalAPI socket for --listen tailscaled (env LMLINK_LOCALAPI_SOCKET; "
        "default: the platform's own)",
    )
    serve.add_argument(
        "--require-client-cert",
        action="store_true",
        help="tailnet modes: also require a client certificate from `lmlink enroll` (mutual TLS)",
    )
    serve.add_argument("--tsnet-hostname", default="lmlink", help="tsnet: this node's tailnet name")
    serve.add_argument(
        "--tsnet-auth-key-file",
        default=None,
        help="tsnet: file holding the auth key (else env TS_AUTHKEY)",
    )
    serve.add_argument(
        "--tsnet-control-url", default=None, help="tsnet: control server URL (e.g. Headscale)"
    )
    serve.add_argument(
        "--max-batch", type=_positive_int, default=32, help="concurrent streams decoded together"
    )
    serve.add_argument(
        "--speculate",
        choices=("off", "prompt-lookup", "draft-model"),
        default="prompt-lookup",
        help="speculative decoding: 'prompt-lookup' drafts tokens from the request's own text "
        "and verifies them in the batch step (same output, faster on edits, code and quoting "
        "answers); 'draft-model' drafts with --draft-model; a request can override it "
        "(default: prompt-lookup)",
    )
    serve.add_argument(
        "--draft-model",
        default=None,
        help="with --speculate draft-model: a small model (directory or HF id) with the same "
        "vocabulary as --model",
    )
    serve.add_argument(
        "--stream-pace-ms",
        type=float,
        default=10.0,
        help="after sending text, hold a stream's next text this long so tokens arriving "
        "meanwhile share one message (0 = a message per engine step; default: 10)",
    )
    serve.add_argument(
        "--max-queue", type=_positive_int, default=1024, help="requests allowed to wait for a slot"
    )
    serve.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=512,
        help="completion length when a request does not set max_tokens (default: 512)",
    )
    serve.add_argument(
        "--audit-prompts",
        action="store_true",
        help="also record prompt text in the audit trail (off: who, model, tokens, outcome only)",
    )
    serve.add_argument("--name", default=None, help="server name shown to clients (default: hostname)")
    serve.add_argument(
        "--idle-ttl", type=float, default=0.0, metavar="S",
        help="unload a model after S seconds without requests (0 = never; LoadModel may set "
        "its own)",
    )
    serve.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not advertise on the LAN with mDNS (_lmlink._tcp; loopback only in local mode)",
    )
    serve.add_argument(
        "--json", action="store_true", help="print one JSON line when ready (for scripts)"
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    chat = sub.add_parser(
        "chat",
        help="chat with a model, streaming the answer as it is generated",
        description=(
            "Send PROMPT and stream the answer. With no PROMPT: interactive when stdin is a "
            "terminal, otherwise stdin is read as the prompt."
        ),
    )
    chat.add_argument("prompt", nargs="?", help="the message to send")
    _add_server_flag(chat)
    chat.add_argument("--model", default="", help="model id or alias (default: server's default)")
    chat.add_argument("--system", default=None, help="system message to start the conversation")
    chat.add_argument("--raw", action="store_true", help="send PROMPT as raw text, no chat template")
    chat.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    chat.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    chat.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)"
    )
    chat.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past end-of-sequence until --max-tokens (load tests)",
    )
    chat.add_argument(
        "--json", action="store_true", help="print one JSON object per event instead of text"
    )
    chat.add_argument(
        "--stats", action="store_true", help="print token counts and speed to stderr at the end"
    )

    models = sub.add_parser(
        "models", help="list the models on a server; load or unload them (owner only)",
        description="list: loaded, loading and available models with memory. load MODEL: load "
        "an available model id, a model directory on the server or a Hugging Face id, showing "
        "progress (refused if it would not fit in memory). unload MODEL: stop serving it; its "
        "running streams are waited for (--drain-timeout) then cancelled, or cancelled at once "
        "with --cancel-streams.",
    )
    models.add_argument("action", nargs="?", choices=("list", "load", "unload"), default="list")
    models.add_argument("name", nargs="?", help="the model to load or unload")
    _add_server_flag(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    models.add_argument("--default", action="store_true", help="load: make it the default model")
    models.add_argument("--idle-ttl", type=float, default=0.0, metavar="S",
                        help="load: unload after S idle seconds (0 = the server's --idle-ttl)")
    models.add_argument("--cancel-streams", action="store_true",
                        help="unload: cancel running streams at once instead of waiting")
    models.add_argument("--drain-timeout", type=float, default=0.0, metavar="S",
                        help="unload: wait up to S seconds for running streams (default 30)")

    link = sub.add_parser(
        "link",
        help="serve remote models on a loopback OpenAI-compatible endpoint (laptop side)",
        description="Serve /v1/models, /v1/chat/completions and /v1/completions on loopback, "
        "forwarding each request over gRPC to the best reachable lmlink server that has the "
        "model (your preference, else path, latency and load), with one retry before the "
        "first token. 'lmlink link prefer MODEL SERVER' stores a preferred server for a model "
        "('--clear' forgets it); 'lmlink link prefs' lists them.",
    )
    link.add_argument("action", nargs="?", choices=("prefer", "prefs"), default=None)
    link.add_argument("words", nargs="*", help="prefer: MODEL SERVER")
    link.add_argument("--port", type=_positive_int, default=None,
                      help="loopback port (default 47472 or port in link.toml; 1234 for tools "
                      "preconfigured for LM Studio)")
    link.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    link.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                      help="a server to use (repeatable), besides link.toml, config.toml, "
                      "$LMLINK_SERVER and discovery")
    link.add_argument("--no-discovery", action="store_true",
                      help="only use the servers given, configured or in $LMLINK_SERVER")
    link.add_argument("--refresh", type=float, default=2.0, metavar="S",
                      help="probe servers every S seconds (default 2)")
    link.add_argument("--clear", action="store_true", help="prefer: forget the preference")
    link.add_argument("--json", action="store_true",
                      help="print one JSON line when ready, no status line (scripts, services)")

    status = sub.add_parser("status", help="show a server's health, load and who you are to it")
    _add_server_flag(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    discover = sub.add_parser(
        "discover",
        help="find lmlink servers on the LAN (mDNS) and among tailnet peers",
        description=(
            "Listen for _lmlink._tcp mDNS answers (loopback and LAN) and list tailnet peers "
            "tagged tag:lmlink or named lmlink*, confirm each with an authenticated "
            "GetServerInfo, and show where it was found and whether its tailnet path is direct "
            "or relayed. Exit 1 when no usable server is found."
        ),
    )
    discover.add_argument(
        "--timeout", type=_seconds, default=None, metavar="S",
        help="seconds to listen for mDNS answers, up to 60 (default: 2, or discovery_timeout "
        "in config.toml); confirming what was found may take up to 3 s more",
    )
    discover.add_argument("--json", action="store_true", help="print JSON")
    discover.add_argument(
        "--direct-only", action="store_true", help="mark servers reached through a DERP relay as refused"
    )
    discover.add_argument(
        "--localapi-socket",
        default=os.environ.get("LMLINK_LOCALAPI_SOCKET"),
        help="this device's Tailscale LocalAPI socket (env LMLINK_LOCALAPI_SOCKET)",
    )
    enroll = sub.add_parser(
        "enroll",
        help="issue a client certificate for a device (mutual TLS, run on the server)",
        description=(
            "Issue a client certificate signed by this server's project CA, for servers run "
            "with --require-client-cert. Copy the two files to the device as "
            "~/.config/lmlink/client-certs/HOST_PORT.pem and HOST_PORT.key (mode 0600); the "
            "lmlink client sends them automatically to that server."
        ),
    )
    enroll.add_argument("device", help="device name, e.g. alice-laptop")
    enroll.add_argument("--state-dir", default=None, help="the server's state dir")
    enroll.add_argument("--out", default=".", help="directory for DEVICE.pem and DEVICE.key")
    enroll.add_argument("--days", type=_positive_int, default=365, help="validity in days")
    from lmlink.cli_access import add_parsers as add_access_parsers

    add_access_parsers(sub)  # share, token, usage
    from lmlink.cluster.cli import add_parsers as add_cluster_parsers

    add_cluster_parsers(sub)  # cluster up / check
    return parser


def cmd_enroll(args: argparse.Namespace) -> int:
    import re

    from lmlink.front_door import default_state_dir
    from lmlink.net.files import private_dir, write_private
    from lmlink.net.tls import issue_client_cert

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", args.device):
        raise CliError("device name must be letters, digits, '.', '_' or '-' (max 63)")
    if args.days < 1:
        raise CliError("--days must be at least 1")
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    cert = issue_client_cert(state, args.device, days=args.days)
    out = Path(args.out)
    if not out.exists():
        private_dir(out)
    write_private(out / f"{args.device}.key", cert.key_pem)
    write_private(out / f"{args.device}.pem", cert.cert_pem)
    print(f"issued {out / (args.device + '.pem')} and .key (0600), {cert.fingerprint}")
    return EXIT_OK


# ----- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from lmlink.engine.engine import EngineConfig
    from lmlink.front_door import TailnetSettings, default_state_dir
    from lmlink.server import RunningServer, ServeOptions, serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.max_batch < 1:
        raise CliError("--max-batch must be at least 1")
    if (args.speculate == "draft-model") != bool(args.draft_model):
        raise CliError("--speculate draft-model and --draft-model PATH go together")
    if not 0 <= args.stream_pace_ms <= 1000:
        raise CliError("--stream-pace-ms must be between 0 and 1000")
    console = Console(stderr=True)
    options = ServeOptions(
        model=args.model,
        listen=args.listen,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        engine=EngineConfig(
            max_batch_size=args.max_batch,
            max_queue=args.max_queue,
            default_max_tokens=max(1, args.default_max_tokens),
            speculate=args.speculate,
            draft_model=args.draft_model,
        ),
        stream_pace_ms=args.stream_pace_ms,
        tailnet=TailnetSettings(
            state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
            localapi_socket=args.localapi_socket,
            require_client_cert=args.require_client_cert,
            tsnet_hostname=args.tsnet_hostname,
            tsnet_auth_key_file=args.tsnet_auth_key_file,
            tsnet_control_url=args.tsnet_control_url,
        ),
    )
    options.audit_prompts = args.audit_prompts
    if args.name:
        options.name = args.name
    options.mdns = not args.no_mdns
    options.cluster = getattr(args, "cluster_runtime", None)  # rank 0 of `lmlink cluster up`
    if args.idle_ttl < 0:
        raise CliError("--idle-ttl must not be negative")
    options.idle_ttl = args.idle_ttl
    status = console.status(f"loading model {args.model} ...", spinner="dots")

    def on_progress(message: str) -> None:
        status.update(message + " ...")

    def on_ready(running: RunningServer) -> None:
        status.stop()
        engine = running.registry.resolve("")
        if args.json:
            print(
                json.dumps(
                    {
                        "event": "ready",
                        "grpc": running.grpc_address,
                        "http": running.http_address,
                        "model": engine.model_id,
                        "listen": args.listen,
                        "tls_fingerprint": running.tls_fingerprint or None,
                    }
                )
                + "\n",  # one write: cluster rank 0 emits progress lines from other threads
                end="",
                flush=True,
            )
        else:
            scheme = "https" if running.tls_fingerprint else "http"
            console.print(
                f"[bold green]lmlink[/] serving [bold]{engine.model_id}[/] on "
                f"{running.grpc_address} (HTTP: {scheme}://{running.http_address}/v1) "
                f"({args.listen} mode). Ctrl-C to stop."
            )
            if running.tls_fingerprint:
                console.print(f"TLS certificate {running.tls_fingerprint}")

    status.start()
    try:
        asyncio.run(serve(options, on_ready=on_ready, on_progress=on_progress))
    finally:
        status.stop()
    # Everything was shut down gracefully above. Skip interpreter finalization: native
    # threads (MLX, grpc) racing static destructors there can abort an otherwise clean exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


# ----- client commands ---------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from lmlink.client import Client

    target, fingerprint = _resolve_server(args)
    return Client(target, timeout=args.timeout, expected_fingerprint=fingerprint)


def _resolve_server(args: argparse.Namespace) -> tuple[str, str | None]:
    """--server, else $LMLINK_SERVER, else discovery; --direct-only checks the path either way."""
    from lmlink.client.discovery import check_path, find_server, load_settings

    settings = load_settings()
    direct_only = args.direct_only or settings.direct_only
    explicit = args.server or os.environ.get("LMLINK_SERVER")
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


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
    }


def _stream_answer(client: Any, args: argparse.Namespace, history: list[dict[str, str]] | None, prompt: str) -> str:
    """Stream one answer to stdout; returns its text. Ctrl-C cancels it server-side."""
    from lmlink.client import Completed, TokenDelta
    from lmlink.client._wire import event_to_dict

    if history is None:
        stream = client.stream(prompt=prompt, **_sampling(args))
    else:
        stream = client.stream(messages=history, **_sampling(args))
    text: list[str] = []
    try:
        for event in stream:
            if args.json:
                print(json.dumps(event_to_dict(event)), flush=True)
            elif isinstance(event, TokenDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            if isinstance(event, TokenDelta):
                text.append(event.text)
            if isinstance(event, Completed) and args.stats:
                u, t = event.usage, event.timings
                print(
                    f"\n[{event.finish_reason}: {u.prompt_tokens} prompt ({u.cached_tokens} cached)"
                    f" + {u.completion_tokens} tokens, first token {t.time_to_first_token_ms:.0f} ms,"
                    f" {t.tokens_per_second:.1f} tok/s]",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        stream.cancel()
        raise
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(text)


def cmd_chat(args: argparse.Namespace) -> int:
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise CliError("no prompt given (argument or stdin)")
    with _client(args) as client:
        history: list[dict[str, str]] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        if not interactive:
            if args.raw:
                _stream_answer(client, args, None, prompt)
            else:
                history.append({"role": "user", "content": prompt})
                _stream_answer(client, args, history, prompt)
            return EXIT_OK
        print("lmlink chat: type a message, Ctrl-D to quit, Ctrl-C to stop an answer.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return EXIT_OK
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            try:
                answer = _stream_answer(client, args, history, line)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": answer})


def cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    if args.action in ("load", "unload"):
        return _manage_model(args)
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "aliases", "state", "context", "memory", "default")
    for m in models:
        table.add_row(
            m.id,
            ", ".join(m.aliases),
            m.state,
            str(m.context_length),
            _human_bytes(m.memory_bytes),
            "yes" if m.is_default else "",
        )
    Console().print(table)
    return EXIT_OK


def _manage_model(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lmlink.client import ModelInfo

    if not args.name:
        raise CliError(f"name the model to {args.action}")
    with _client(args) as client:
        if args.action == "unload":
            result = client.unload_model(args.name, cancel_streams=args.cancel_streams,
                                         drain_timeout=args.drain_timeout)
            if args.json:
                print(json.dumps(asdict(result)))
            else:
                print(f"unloaded {result.model}: freed {_human_bytes(result.freed_bytes)}, "
                      f"{result.drained_streams} stream(s) finished, "
                      f"{result.cancelled_streams} cancelled")
            return EXIT_OK
        for event in client.load_model(args.name, make_default=args.default,
                                       idle_ttl=args.idle_ttl):
            if args.json:
                kind = "loaded" if isinstance(event, ModelInfo) else "progress"
                print(json.dumps({"event": kind, **asdict(event)}), flush=True)
            elif isinstance(event, ModelInfo):
                print(f"loaded {event.id} ({_human_bytes(event.memory_bytes)}, context "
                      f"{event.context_length})")
            else:
                print(f"[{event.fraction * 100:3.0f}%] {event.message}", file=sys.stderr,
                      flush=True)
    return EXIT_OK


def cmd_link(args: argparse.Namespace) -> int:
    import asyncio

    from lmlink.client.discovery import load_settings
    from lmlink.link import LinkError, LinkOptions, RunningLink, load_link_config, run_link
    from lmlink.link.config import DEFAULT_PORT, set_preference

    if args.action == "prefer":
        if len(args.words) != (1 if args.clear else 2):
            raise CliError("usage: lmlink link prefer MODEL SERVER (or MODEL --clear)")
        cfg = set_preference(args.words[0], None if args.clear else args.words[1])
        print(f"{args.words[0]} -> {cfg.prefer.get(args.words[0], '(automatic)')} "
              f"(saved in {cfg.path})")
        return EXIT_OK
    cfg = load_link_config()
    if args.action == "prefs":
        print(json.dumps(cfg.prefer, indent=2) if args.json else
              "\n".join(f"{m} -> {s}" for m, s in sorted(cfg.prefer.items())) or "(none)")
        return EXIT_OK
    if args.words:
        raise CliError(f"unexpected arguments: {' '.join(args.words)}")
    settings = load_settings()
    env = os.environ.get("LMLINK_SERVER")
    servers = tuple(dict.fromkeys([*args.server, *((env,) if env else ()), *cfg.servers,
                                   *settings.servers]))
    options = LinkOptions(
        host=args.host, port=args.port if args.port is not None else (cfg.port or DEFAULT_PORT),
        servers=servers, discovery=cfg.discovery and not args.no_discovery, prefer=cfg.prefer,
        refresh_interval=max(0.2, args.refresh), status_line=not args.json,
    )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_ready(running: RunningLink) -> None:
        up = [s.label for s in running.router.servers.values() if s.up]
        if args.json:
            print(json.dumps({"event": "ready", "url": running.url, "servers_up": up}), flush=True)
        else:
            print(f"lmlink link: OpenAI-compatible endpoint at {running.url} "
                  f"({len(up)} server(s) up). Ctrl-C to stop.", file=sys.stderr)

    try:
        asyncio.run(run_link(options, on_ready=on_ready))
    except LinkError as exc:
        raise CliError(str(exc)) from None
    print(file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lmlink.client.discovery import check_path

    with _client(args) as client:
        health = client.health()
        info = client.server_info()
    path = check_path(client.target, direct_only=False)
    if args.json:
        route = {"kind": path.kind, "detail": path.describe(), "peer": path.peer,
                 "cur_addr": path.cur_addr, "relay": path.relay}
        print(json.dumps({"target": client.target, "health": health, **asdict(info),
                          "path": route}, indent=2))
        return EXIT_OK
    c = info.caller
    lines = [
        f"server     {info.name} at {client.target} ({info.listen_mode} mode)",
        f"path       {path.describe()}",
        f"health     {health}",
        f"version    lmlink {info.version}, protocol v{info.protocol_version}, {info.platform}",
        f"models     {', '.join(info.models) or '(none you may use)'}",
        f"load       {info.active_streams} active / {info.queued_requests} queued streams,"
        f" batch up to {info.max_batch_size}, {info.recent_tokens_per_second:.1f} tok/s now",
        f"served     {info.generated_tokens} tokens in {info.uptime_seconds:.0f} s uptime",
        f"you are    {c.login_name} via {c.source}" + (" (owner)" if c.is_owner else ""),
    ]
    if info.ranks:
        lines.append(f"cluster    {len(info.ranks)} ranks, {info.cluster_backend} backend, "
                     f"{info.cluster_sharding}-parallel")
        for r in info.ranks:
            seen = f", heard {r.seconds_since_heartbeat:.1f} s ago" if r.rank else ""
            lines.append(f"  rank {r.rank}   {r.host} ({r.address or 'local'}): {r.state}, "
                         f"{_human_bytes(r.memory_bytes)} used, {r.tokens_per_second:.1f} tok/s"
                         f"{seen}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_discover(args: argparse.Namespace) -> int:
    from lmlink.client.discovery import discover, load_settings

    settings = load_settings()
    direct_only = args.direct_only or settings.direct_only
    found = discover(
        args.timeout, settings=settings, direct_only=direct_only,
        localapi_socket=args.localapi_socket,
    )
    if args.json:
        print(json.dumps({
            "elapsed_seconds": found.elapsed,
            "mdns_interfaces": found.interfaces,
            "notes": found.notes,
            "endpoints": [e.to_dict() for e in found.endpoints],
        }, indent=2))
    else:
        rows = [("NAME", "ADDRESS", "FOUND VIA", "PATH", "MODELS", "STATUS")]
        for e in found.endpoints:
            models = ", ".join(e.models) if e.models else (f"{e.model_count} ({e.models_hash})"
                                                           if e.models_hash else "")
            status = e.status if e.usable else f"{e.status}: {e.error}"
            rows.append((e.name or e.peer or "?", e.target, "+".join(e.origins),
                         e.path_detail or e.path, models, status))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(5)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
        for note in found.notes:
            print(f"note: {note}", file=sys.stderr)
    if not found.usable:
        if found.endpoints:
            raise CliError(f"no usable lmlink server among {len(found.endpoints)} found")
        raise CliError(
            f"no lmlink server found in {found.elapsed:.1f} s (mDNS on "
            f"{', '.join(found.interfaces) or 'no interface'}, tailnet peers tagged "
            f"{settings.tailnet_tag} or named lmlink*)"
        )
    return EXIT_OK


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "chat": cmd_chat,
    "models": cmd_models,
    "status": cmd_status,
    "discover": cmd_discover,
    "link": cmd_link,
    "enroll": cmd_enroll,
    "share": lambda args: _access(args),
    "token": lambda args: _access(args),
    "usage": lambda args: _access(args),
    "cluster": lambda args: _cluster(args),
}


def _cluster(args: argparse.Namespace) -> int:
    from lmlink.cluster.cli import cmd_cluster

    return cmd_cluster(args)


def _access(args: argparse.Namespace) -> int:
    from lmlink.cli_access import dispatch

    return dispatch(args)


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

    expected: tuple[type[BaseException], ...] = (CliError, LmlinkError)
    if args.command == "serve":
        from lmlink.engine.types import EngineError
        from lmlink.server import ServeError

        expected += (EngineError, ServeError)
    try:
        return COMMANDS[args.command](args)
    except expected as exc:
        print(f"lmlink {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
