"""Who may see the status and the metrics: `info` for the status, owner or `metrics` for
/metrics (it names principals). Real uvicorn, httpx, bearer tokens naming the callers."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lmlink.access.state import AccessState
from lmlink.access.gate import PolicyGate
from lmlink.api.limits import Guard
from support.inprocess import http_bridge


async def test_status_needs_info_and_metrics_needs_the_metrics_action(engine, tmp_path):
    state = AccessState.open(tmp_path, owner_login="owner@example.com")
    owner, _ = state.tokens.create("laptop")
    bob, _ = state.tokens.create("script", "bob@example.com")  # default actions: no metrics
    carol, _ = state.tokens.create("prom", "carol@example.com")
    eve, _ = state.tokens.create("eve", "eve@example.com")
    state.shares.add("bob@example.com", ["*"])
    state.shares.add("carol@example.com", ["*"], actions=["metrics"])
    state.shares.add("eve@example.com", ["*"], actions=["generate"])
    auth = lambda t: {"authorization": f"Bearer {t}"}  # noqa: E731
    gate = PolicyGate(lambda peer: None, state.policy)  # nobody identified: tokens name callers
    async with http_bridge(engine, gate, guard=Guard(gate, state)) as (url, _), \
            httpx.AsyncClient(base_url=url) as h:
        r = await h.post("/v1/chat/completions", headers=auth(bob), json={
            "model": engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200
        status = await h.get("/v1/status", headers=auth(bob))
        assert status.status_code == 200
        body = status.json()
        assert body["models"][0]["name"] == engine.model_id and body["outcomes"]["completed"] == 1
        assert (await h.get("/", headers=auth(bob))).headers["content-type"].startswith("text/html")
        assert (await h.get("/v1/status", headers=auth(eve))).status_code == 403  # no info action
        assert (await h.get("/metrics", headers=auth(bob))).status_code == 403
        assert (await h.get("/metrics")).status_code == 401
        for token in (owner, carol):
            m = await h.get("/metrics", headers=auth(token))
            assert m.status_code == 200, m.text
            families = {f.name: f for f in text_string_to_metric_families(m.text)}
            done = [s for s in families["lmlink_requests"].samples
                    if s.name == "lmlink_requests_total" and s.labels["outcome"] == "completed"]
            assert done and done[0].value == 1
            assert [s.labels["principal"] for s in families["lmlink_principal_tokens"].samples
                    if s.name.endswith("_total")] == ["bob@example.com"]
        # the page is self-contained: no external script, style or font
        page = (await h.get("/", headers=auth(owner))).text
        assert "http://" not in page and "https://" not in page
