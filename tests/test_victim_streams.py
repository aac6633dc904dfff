"""Issue 11 finding 2: one caller's bad sampling value must not stop anyone else's stream.

A real `lmlink serve` on loopback (the builtin model, a 2048-token vocabulary). A victim
streams a long greedy answer while another caller sends `top_k=5000`, through the `lmlink`
gRPC client and through the HTTP bridge with the official `openai` package. The bad calls get
INVALID_ARGUMENT / 400 naming the parameter; the victim's tokens equal its solo run.
"""

from __future__ import annotations

import threading

import openai
import pytest

from lmlink.client import Client, InvalidArgument

VICTIM = [{"role": "user", "content": "Tell me a long story about the river and the sea."}]
BAD = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_victim(client: Client, out: dict) -> None:
    try:
        gen = client.chat(VICTIM, max_tokens=300, ignore_eos=True)
        out["ids"], out["reason"] = gen.token_ids, gen.finish_reason
    except Exception as exc:  # recorded for the assertion below
        out["error"] = exc


def _run_with_attacks(client: Client, attack) -> dict:
    out: dict = {}
    victim = threading.Thread(target=_stream_victim, args=(client, out))
    victim.start()
    # Wait until the victim is inside the batch, then attack while it decodes.
    for _ in range(500):
        if client.server_info().active_streams:
            break
        threading.Event().wait(0.01)
    for _ in range(3):
        attack()
    victim.join(120)
    return out


def test_grpc_top_k_beyond_vocabulary_is_refused_and_victim_survives(client):
    solo = client.chat(VICTIM, max_tokens=300, ignore_eos=True).token_ids

    def attack() -> None:
        with pytest.raises(InvalidArgument, match="top_k"):
            client.chat(BAD, max_tokens=50, temperature=1.0, top_k=5000)

    out = _run_with_attacks(client, attack)
    assert "error" not in out, out.get("error")
    assert out["ids"] == solo
    assert client.chat(BAD, max_tokens=4).token_ids  # and the server still serves


def test_http_top_k_beyond_vocabulary_is_400_and_victim_survives(client, oai):
    solo = client.chat(VICTIM, max_tokens=300, ignore_eos=True).token_ids

    def attack() -> None:
        with pytest.raises(openai.BadRequestError, match="top_k"):
            oai.chat.completions.create(
                model="builtin", messages=BAD, max_tokens=50, temperature=1.0,
                extra_body={"top_k": 5000},
            )

    out = _run_with_attacks(client, attack)
    assert "error" not in out, out.get("error")
    assert out["ids"] == solo
