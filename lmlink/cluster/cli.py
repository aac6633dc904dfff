"""`lmlink cluster up FILE` and `lmlink cluster check FILE`."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Serving flags `cluster up` passes to rank 0 (every rank parses them: batching must match).
_SERVE_FLAGS = ("model", "listen", "grpc_port", "http_port", "state_dir", "localapi_socket",
                "max_batch", "max_queue", "default_max_tokens", "name", "log_level",
                "speculate")


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    cluster.add_argument("--listen", choices=("local", "tailscaled", "tsnet"), default="local")
    cluster.add_argument("--grpc-port", type=int, default=47470)
    cluster.add_argument("--http-port", type=int, default=47471)
    cluster.add_argument("--state-dir", default=None)
    cluster.add_argument("--localapi-socket", default=os.environ.get("LMLINK_LOCALAPI_SOCKET"))
    cluster.add_argument("--max-batch", type=int, default=32)
    cluster.add_argument("--max-queue", type=int, default=1024)
    cluster.add_argument("--default-max-tokens", type=int, default=512)
    cluster.add_argument("--speculate", choices=("off", "prompt-lookup"), default=None,
                         help="speculative decoding, as for `lmlink serve` (ranks stay in lockstep)")
    cluster.add_argument("--name", default=None)
    cluster.add_argument("--no-mdns", action="store_true")
    cluster.add_argument("--json", action="store_true",
                         help="print JSON lines (ready, progress, cluster-failed) for scripts")
    cluster.add_argument("--log-level", default="warning",
                         choices=("debug", "info", "warning", "error"))
    cluster.add_argument("--linger", type=float, default=10.0, metavar="S",
                         help="after a rank fails, rank 0 answers NOT_SERVING for S seconds, "
                         "then every rank is stopped (default 10)")


def serve_args(args: argparse.Namespace, model: str) -> list[str]:
    out: list[str] = []
    for key in _SERVE_FLAGS:
        value = model if key == "model" else getattr(args, key)
        if value is not None:
            out += ["--" + key.replace("_", "-"), str(value)]
    if args.no_mdns:
        out.append("--no-mdns")
    if args.json:
        out.append("--json")
    return out


class CliError(Exception):
    pass


def cmd_cluster(args: argparse.Namespace) -> int:
    try:
        return _cmd_cluster(args)
    except CliError as exc:  # one line, exit 1 (lmlink.cli's contract)
        print(f"lmlink cluster {args.action}: {exc}", file=sys.stderr)
        return 1


def _cmd_cluster(args: argparse.Namespace) -> int:
    from .launch import cluster_check, cluster_up
    from .spec import ClusterFileError, load_cluster

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
        return 0
    if not args.json:
        print(f"lmlink cluster {spec.name}: starting {spec.size} ranks ({spec.backend}, "
              f"{spec.sharding} parallel, {model})", file=sys.stderr)
    result = cluster_up(spec, serve_args(args, model), linger=args.linger)
    if result.code:
        raise CliError(result.failure)
    return 0
