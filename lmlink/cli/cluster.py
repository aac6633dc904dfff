"""`lmlink cluster up FILE` and `lmlink cluster check FILE`: one model over several machines."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import usage_error, EXIT_OK, CliError, number
from .serve import add_serving_flags, check_state_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser(
        "cluster",
        help="serve one model sharded over several Macs (mlx.distributed)",
        description="up FILE: launch every rank of the cluster file (mpirun or mlx.launch); rank 0 "
        "serves gRPC/HTTP/discovery like `lmlink serve`. check FILE: hosts reachable, same "
        "versions, the shard fits in memory. See cluster/README.md for the file format.",
    )
    cluster.add_argument("action", choices=("up", "check"))
    cluster.add_argument("file", help="cluster file (TOML), e.g. cluster/local-2-mpi.toml")
    cluster.add_argument("--model", default=None,
                         help="override the cluster file's model ('builtin', a directory, an HF id)")
    add_serving_flags(cluster)
    cluster.add_argument("--json", action="store_true",
                         help="print JSON lines (ready, progress, cluster-failed) for scripts")
    cluster.add_argument("--log-level", default="warning",
                         choices=("debug", "info", "warning", "error"))
    cluster.add_argument("--linger", type=number(0.0, 3600.0), default=10.0, metavar="S",
                         help="after a rank fails, rank 0 answers NOT_SERVING for S seconds, "
                         "then every rank is stopped (default 10)")
    cluster.set_defaults(run=run)


def check_model(model: str) -> None:
    """A local model (builtin or a directory) must exist before any rank is started; a
    Hugging Face id is left to the ranks (it may need a download)."""
    from pathlib import Path

    from lmlink.engine.loader import _HF_ID, ModelLoadError, resolve_model_path

    if _HF_ID.match(model) and not Path(model).expanduser().exists():
        return
    try:
        resolve_model_path(model)
    except ModelLoadError as exc:
        raise CliError(str(exc)) from None


def check_ports(options: Any) -> None:
    """Rank 0 binds these: say so now rather than after every rank has loaded its shard."""
    from lmlink.server import ServeError, check_bindable

    if options.listen != "local":
        return
    for port in (options.grpc_port, options.http_port):
        try:
            check_bindable(options.host, port)
        except ServeError as exc:
            hint = " (is `lmlink serve` running? pass --grpc-port 0 for any free ports)"
            raise CliError(f"{exc}{hint}") from None


def render_event(line: str) -> None:
    """Rank 0 talks to the launcher in JSON lines; a person sees sentences. Progress and
    failures are already said on stderr by the ranks and the launcher."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        event = None
    if not isinstance(event, dict) or "event" not in event:
        print(line, flush=True)
    elif event["event"] == "ready":
        scheme = "https" if event.get("tls_fingerprint") else "http"
        print(f"lmlink cluster serving {event.get('model')} on {event.get('grpc')} (HTTP: "
              f"{scheme}://{event.get('http')}/v1). Ctrl-C to stop.", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from lmlink.cluster.launch import cluster_check, cluster_up
    from lmlink.cluster.spec import ClusterFileError, load_cluster

    if getattr(args, "speculate", None) == "draft-model":
        raise usage_error("a cluster speculates with prompt-lookup or off (no draft model)")
    try:
        spec = load_cluster(args.file)
    except ClusterFileError as exc:
        raise CliError(str(exc)) from None
    model = args.model or spec.model
    if args.action == "check":
        checks = cluster_check(spec, model)
        if args.json:
            print(json.dumps([c.__dict__ for c in checks], indent=2))
        else:
            print(f"cluster {spec.name}: {spec.size} ranks on {len(spec.hosts)} host(s), "
                  f"backend {spec.backend}, {spec.sharding} parallel, model {model}")
            for c in checks:
                print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.what}: {c.detail}")
        if not all(c.ok for c in checks):
            raise CliError("the cluster is not ready: " + "; ".join(
                f"{c.what}: {c.detail}" for c in checks if not c.ok))
        return EXIT_OK
    from lmlink.cluster.rank import encode_serve_options
    from lmlink.server import ServeOptions

    args.model = model
    options = ServeOptions.from_args(args)
    check_model(model)
    check_state_dir(options.tailnet.state_dir)
    check_ports(options)
    if not args.json:
        print(f"lmlink cluster {spec.name}: starting {spec.size} ranks ({spec.backend}, "
              f"{spec.sharding} parallel, {model})", file=sys.stderr)
    errors: list[str] = []

    def out(line: str) -> None:
        if '"event": "error"' in line:  # rank 0 could not serve: that is the failure to report
            try:
                errors.append(str(json.loads(line).get("message")))
            except (json.JSONDecodeError, AttributeError):
                pass
        if args.json:
            print(line, flush=True)
        else:
            render_event(line)

    result = cluster_up(spec, encode_serve_options(options, args.log_level), linger=args.linger,
                        out=out)
    if result.code or errors:
        raise CliError(f"rank 0: {errors[0]}" if errors else result.failure)
    return EXIT_OK
