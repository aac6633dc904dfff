"""Bearer tokens on the HTTP bridge for callers nobody else can identify (real uvicorn, httpx,
the openai package): missing or bad token -> 401 in OpenAI's shape; a token names its holder."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import httpx
import openai

from lmlink.access.gate import PolicyGate
from lmlink.access.state import AccessState
from lmlink.api.limits import Guard
from support.inprocess import http_bridge


@contextlib.asynccontextmanager
async def guarded_bridge(engine: Any, state: AccessState) -> AsyncIterator[str]:
    """Like a tailnet server's private loopback port dialed directly: nobody is identified."""
    gate: Any = PolicyGate(lambda peer: None, state.policy)
    async with http_bridge(engine, gate, guard=Guard(gate, state)) as (url, _):
        yield url


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_tokens_on_an_unidentified_connection(engine, tmp_path):
    state = AccessState.open(tmp_path, owner_login="owner@example.com")
    owner_token, _owner_record = state.tokens.create("laptop")
    bob_token, bob_record = state.tokens.create("script", "bob@example.com")
    async with guarded_bridge(engine, state) as url, httpx.AsyncClient(base_url=url) as h:
        missing = error_of(await h.get("/v1/models"), 401)
        assert missing["type"] == "authentication_error" and "Bearer" in missing["message"]
        for bad in ("Bearer lmk_forged", "Bearer unused", "Basic abc"):
            err = error_of(await h.get("/v1/models", headers={"authorization": bad}), 401)
            assert err["type"] == "authentication_error"
        ok = await h.get("/v1/models", headers={"authorization": f"Bearer {owner_token}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == engine.model_id

        # bob's token carries bob's local shares: none yet, then one
        as_bob = {"authorization": f"Bearer {bob_token}"}
        body = {"prompt": "Once", "max_tokens": 3}
        denied = error_of(await h.post("/v1/completions", json=body, headers=as_bob), 403)
        assert "bob@example.com (token)" in denied["message"]
        state.shares.add("bob@example.com", [engine.model_id])
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=bob_token, max_retries=0) as ac:
            reply = await ac.completions.create(model="", prompt="Once", max_tokens=3)
            assert reply.usage.completion_tokens == 3
            state.tokens.revoke("script")
            try:
                await ac.completions.create(model="", prompt="Once", max_tokens=3)
                raise AssertionError("a revoked token was accepted")
            except openai.AuthenticationError as exc:
                assert "unknown or revoked" in str(exc)
    rows = state.store.query("SELECT login, source, credential, outcome FROM requests ORDER BY seq")
    # both rows name bob's token by its id (never the secret), not the owner's
    assert bob_record.id.startswith("tk_") and bob_record.id != _owner_record.id
    assert [tuple(r) for r in rows] == [
        ("bob@example.com", "token", bob_record.id, "denied"),
        ("bob@example.com", "token", bob_record.id, "completed"),
    ]
    state.close()
