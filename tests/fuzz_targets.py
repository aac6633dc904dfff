"""Fuzz targets: every parser an outsider reaches, and the only exceptions each may raise.

Each target takes bytes (so atheris, hypothesis and the saved corpus drive the same code) and
must either return or raise one of its `expected` exceptions: anything else is a crash.
Used by tests/test_fuzz.py (hypothesis, bounded, in the suite), `make fuzz` (atheris, long
run: scripts/fuzz.py) and the regression corpus in tests/fuzz_corpus/<target>/.
"""

from __future__ import annotations

import json
import tomllib
from typing import Callable

from lmlink.access.shares import ShareError, parse_duration, parse_when, principal_kind
from lmlink.access.tokens import hash_token, looks_like_token
from lmlink.api.convert import request_from_wire
from lmlink.api.errors import CallError
from lmlink.api.openai_schema import ApiError, parse_chat, parse_completion, parse_json
from lmlink.api.shortcuts import parse_ask
from lmlink.cluster.spec import ClusterFileError, parse_cluster
from lmlink.engine.types import EngineError
from lmlink.net.mdns import parse_txt
from lmlink.v1 import inference_pb2 as pb


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def openai_chat(data: bytes) -> None:
    parse_chat(parse_json(data), request_id="r", owner="o")


def openai_completion(data: bytes) -> None:
    parse_completion(parse_json(data), request_id="r", owner="o")


def shortcuts_ask(data: bytes) -> None:
    ctype = "application/json" if data[:1] in (b"{", b"[") else "text/plain"
    parse_ask(data, ctype, {})


def proto_generate(data: bytes) -> None:
    req = pb.GenerateRequest()
    req.ParseFromString(data)  # DecodeError is the gRPC runtime's business (it answers INTERNAL)
    request_from_wire(req, owner="o")


def mdns_txt(data: bytes) -> None:
    props: dict[bytes, bytes | None] = {}
    for item in data.split(b"\n")[:32]:
        k, sep, v = item.partition(b"=")
        props[k] = v if sep else None
    parse_txt("x._lmlink._tcp.local.", props, port=47470, addresses=("100.64.0.1",))


def cluster_toml(data: bytes) -> None:
    parse_cluster(tomllib.loads(_text(data)))


def cluster_json(data: bytes) -> None:
    """A parsed cluster file (the dict tomllib would give), from JSON."""
    value = json.loads(data)
    if isinstance(value, dict):  # tomllib only ever gives a dict
        parse_cluster(value)


def bearer_token(data: bytes) -> None:
    text = _text(data)
    if looks_like_token(text):
        hash_token(text)


def share_principal(data: bytes) -> None:
    text = _text(data)
    for fn in (principal_kind, parse_duration):
        try:
            fn(text)
        except ShareError:
            pass
    parse_when(text, now=1.8e9, future=True)


def _decode_error() -> type[Exception]:
    from google.protobuf.message import DecodeError

    return DecodeError


TARGETS: dict[str, tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]] = {
    "openai_chat": (openai_chat, (ApiError,)),
    "openai_completion": (openai_completion, (ApiError,)),
    "shortcuts_ask": (shortcuts_ask, (ApiError,)),
    "proto_generate": (proto_generate, (CallError, EngineError, _decode_error())),
    "mdns_txt": (mdns_txt, ()),
    "cluster_toml": (cluster_toml, (ClusterFileError, tomllib.TOMLDecodeError)),
    "cluster_json": (cluster_json, (ClusterFileError, ValueError)),  # ValueError: not JSON
    "bearer_token": (bearer_token, ()),
    "share_principal": (share_principal, (ShareError,)),
}


def run(name: str, data: bytes) -> None:
    """Run one target on one input; raise AssertionError naming a crash."""
    fn, expected = TARGETS[name]
    try:
        fn(data)
    except expected:
        pass
    except Exception as exc:  # noqa: BLE001 - that is the point
        raise AssertionError(f"{name} crashed on {data[:200]!r}: {type(exc).__name__}: {exc}") \
            from exc


def json_dumps(value: object) -> bytes:
    return json.dumps(value).encode()
