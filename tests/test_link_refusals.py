"""`lmlink link` passes a server's refusal on (401 / 403 with its reason) instead of calling the
server unreachable (503), and fails over past a server that refuses to one that serves.

The refusing servers are small gRPC stand-ins on loopback (a real lmlink server refuses a
tailnet stranger: tests/test_link_denied_netns.py; it answers UNAUTHENTICATED only to a bad
bearer token, which the link never sends), the link and the `openai` client are the real ones,
and the server that does answer is a real `lmlink serve`.
"""

from __future__ import annotations

from concurrent import futures
from typing import Iterator

import grpc
import openai
import pytest

from conftest import ServerProcess, start_server, stop_server
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc
from support.link import ASK, start_link

MODEL = "lmlink-tiny"


class Refuser(pb_grpc.InferenceServicer):
    """Refuses with `code`: every call (`only_generate=False`), or only generation."""

    def __init__(self, name: str, code: grpc.StatusCode, reason: str, only_generate: bool) -> None:
        self.name, self.code, self.reason, self.only_generate = name, code, reason, only_generate
        self.generate_calls = 0

    def GetServerInfo(self, request, context):  # noqa: N802 - gRPC names
        if not self.only_generate:
            context.abort(self.code, self.reason)
        return pb.ServerInfo(name=self.name, protocol_version=1, listen_mode="tailscaled",
                             models=[MODEL])

    def ListModels(self, request, context):  # noqa: N802
        if not self.only_generate:
            context.abort(self.code, self.reason)
        return pb.ListModelsResponse(models=[pb.Model(id=MODEL, state="loaded", context_length=2048)])

    def Generate(self, request, context):  # noqa: N802
        self.generate_calls += 1
        context.abort(self.code, self.reason)


class Running:
    def __init__(self, servicer: Refuser) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_InferenceServicer_to_server(servicer, self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def refusers() -> Iterator[list[Running]]:
    running: list[Running] = []
    yield running
    for r in running:
        r.server.stop(None)


def refuser(running: list[Running], name: str, code: grpc.StatusCode, reason: str,
            only_generate: bool = False) -> Running:
    running.append(Running(Refuser(name, code, reason, only_generate)))
    return running[-1]


def ask(*targets: str) -> tuple[int, dict, str]:
    """(HTTP status, OpenAI error body or {}, x-lmlink-server) of one chat through a new link."""
    link, url = start_link(*targets, refresh=2.0)
    try:
        oai = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        try:
            raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=4)
            assert raw.parse().choices[0].message.content
            return raw.http_response.status_code, {}, raw.headers.get("x-lmlink-server", "")
        except openai.APIStatusError as exc:
            return exc.status_code, exc.body if isinstance(exc.body, dict) else {}, ""
    finally:
        link.terminate()
        link.wait(10)


def test_a_refusing_only_server_gives_401_or_403_with_its_reason(refusers):
    stranger = refuser(refusers, "studio", grpc.StatusCode.PERMISSION_DENIED,
                       "eve@example.com has no valid lmlink grant")
    status, error, _ = ask(stranger.target)
    assert (status, error.get("code")) == (403, "permission_denied"), error
    assert "eve@example.com has no valid lmlink grant" in error["message"]
    assert stranger.target in error["message"] and "not reachable" not in error["message"]

    anonymous = refuser(refusers, "vault", grpc.StatusCode.UNAUTHENTICATED,
                        "caller is not an authenticated peer")
    status, error, _ = ask(anonymous.target)
    assert (status, error.get("code")) == (401, "unauthenticated"), error
    assert "caller is not an authenticated peer" in error["message"]
    # one refuses, one never answers: still the refusal, naming the other as unreachable
    status, error, _ = ask(stranger.target, "127.0.0.1:9")
    assert status == 403 and "eve@example.com" in error["message"] and "127.0.0.1:9" in error["message"]
    # nobody answers at all: 503, as before
    status, error, _ = ask("127.0.0.1:9")
    assert (status, error.get("code")) == (503, "no_server_reachable"), error


def test_a_refusal_at_generation_fails_over_to_a_server_that_serves(refusers, tmp_path, monkeypatch):
    """The refuser lists the model (so it is tried first, by preference) but refuses to
    generate; the link must go on to the real server rather than give up."""
    (tmp_path / "link.toml").write_text(f'[prefer]\n"{MODEL}" = "picky"\n')
    monkeypatch.setenv("LMLINK_CONFIG_DIR", str(tmp_path))
    picky = refuser(refusers, "picky", grpc.StatusCode.PERMISSION_DENIED,
                    "eve@example.com is not granted 'generate' on model 'lmlink-tiny'", only_generate=True)
    real: ServerProcess = start_server("--no-mdns", "--name", "real", "--state-dir", str(tmp_path / "state"))
    try:
        status, error, server = ask(picky.target, real.address)
        assert (status, server) == (200, "real"), error
        assert picky.servicer.generate_calls == 1  # it was asked first, and refused
    finally:
        stop_server(real.process)
    # both refuse: the refusal, with every server's reason
    other = refuser(refusers, "other", grpc.StatusCode.PERMISSION_DENIED, "bob only", only_generate=True)
    status, error, _ = ask(picky.target, other.target)
    assert (status, error.get("code")) == (403, "permission_denied"), error
    assert "not granted 'generate'" in error["message"] and "bob only" in error["message"]
