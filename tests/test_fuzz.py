"""Property-based fuzzing of outsider-reachable parsers (hypothesis, bounded), plus the corpus.

Every input must either parse or be refused with the parser's own error type (400 / one-line
reason); any other exception is a crash. Inputs that once crashed live in tests/fuzz_corpus/
and are replayed on every run. The long coverage-guided run is `make fuzz` (atheris).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import TARGETS, json_dumps, run

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("LMLINK_FUZZ_EXAMPLES", "100"))
FAST = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=30)
knobs = st.sampled_from(["model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "top_k", "min_p", "seed", "stop", "n", "stream", "stream_options",
                         "logprobs", "tools", "response_format", "repetition_penalty",
                         "ignore_eos", "prompt", "echo", "user", "conversation", "question"])
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x", 3]),
                              "text": json_values})
message = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls"]),
    st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]),
              st.text(max_size=30), st.lists(part, max_size=3), json_values),
    max_size=4)
body = st.dictionaries(knobs, json_values, max_size=8).flatmap(
    lambda d: st.one_of(st.just(d), st.lists(message, max_size=4).map(
        lambda ms: {**d, "messages": ms})))


@FAST
@given(body)
def test_openai_chat_bodies(b):
    run("openai_chat", json_dumps(b))


@FAST
@given(body)
def test_openai_completion_bodies(b):
    run("openai_completion", json_dumps(b))


@FAST
@given(st.binary(max_size=300))
def test_openai_raw_bytes(data):
    run("openai_chat", data)


@FAST
@given(st.one_of(body.map(json_dumps), st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_shortcuts_ask(data):
    run("shortcuts_ask", data)


@FAST
@given(st.binary(max_size=400))
def test_proto_generate_bytes(data):
    run("proto_generate", data)


@FAST
@given(st.fixed_dictionaries({}, optional={
    "request_id": st.text(max_size=200), "prompt": st.text(max_size=50),
    "temperature": st.floats(width=32), "top_p": st.floats(width=32), "top_k": st.integers(-2**31, 2**31 - 1),
    "min_p": st.floats(width=32), "max_tokens": st.integers(-2**31, 2**31 - 1), "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(max_size=10), max_size=5),
    "repetition_penalty": st.floats(width=32)}))
def test_proto_generate_fields(fields):
    from lmlink.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(request_id=fields.get("request_id", ""),
                             prompt=fields.get("prompt", "x"))
    for key in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed",
                "repetition_penalty"):
        if key in fields:
            setattr(req.sampling, key, fields[key])
    req.sampling.stop.extend(fields.get("stop", []))
    run("proto_generate", req.SerializeToString())


txt_keys = st.sampled_from([b"v", b"name", b"node", b"mode", b"state", b"fp", b"addr", b"http",
                            b"models", b"mh", b"mc", b"cs", b"proto", b"x"])


@FAST
@given(st.lists(st.tuples(st.one_of(txt_keys, st.binary(max_size=8)),
                          st.one_of(st.none(), st.binary(max_size=60))), max_size=12))
def test_mdns_txt(items):
    run("mdns_txt", b"\n".join(k + (b"" if v is None else b"=" + v) for k, v in items))


toml_scalars = st.one_of(st.integers(-5, 70000), st.text(max_size=20), st.booleans(),
                         st.floats(allow_nan=False), st.lists(st.text(max_size=8), max_size=4))
host = st.dictionaries(st.sampled_from(["name", "address", "ssh", "slots", "memory_gb", "rdma",
                                        "python", "x"]), toml_scalars, max_size=6)
cluster = st.dictionaries(st.sampled_from(["name", "backend", "sharding", "model", "weights",
                                           "control_port", "heartbeat_timeout", "env", "x"]),
                          toml_scalars, max_size=7)


@FAST
@given(cluster, st.lists(host, max_size=4))
def test_cluster_files(top, hosts):
    run("cluster_json", json_dumps({**top, "hosts": hosts}))


@FAST
@given(st.binary(max_size=200))
def test_cluster_toml_bytes(data):
    run("cluster_toml", data)


@FAST
@given(st.one_of(st.text(max_size=80), st.from_regex(r"lmk_[A-Za-z0-9_\-]{0,60}", fullmatch=True)))
def test_bearer_tokens(text):
    run("bearer_token", text.encode("utf-8", "surrogatepass"))


@FAST
@given(st.one_of(st.text(max_size=60),
                 st.from_regex(r"(tag|group):[a-z0-9\-]{0,20}|[a-z]{1,8}@[a-z.]{1,12}|[0-9]{1,12}[smhdw]{1,3}",
                               fullmatch=True)))
def test_share_principals_and_durations(text):
    run("share_principal", text.encode("utf-8", "surrogatepass"))


def _corpus() -> list[tuple[str, Path]]:
    if not CORPUS.is_dir():
        return []
    return sorted((d.name, f) for d in CORPUS.iterdir() if d.is_dir() for f in d.iterdir()
                  if f.is_file())


@pytest.mark.parametrize("target,path", _corpus(), ids=lambda v: getattr(v, "name", v))
def test_corpus_regressions(target, path):
    run(target, path.read_bytes())
