"""Deny-by-default authorization: owner, app-capability grants, local shares, bad grants."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmlink.access.gate import PolicyGate
from lmlink.access.identity import Identity, loopback_owner
from lmlink.access.policy import CAPABILITY, Limits, Policy, check, parse_grants, visible_models

MODELS = ["tiny", "qwen-7b", "qwen-72b", "kimi-k2"]
REPO = Path(__file__).resolve().parent.parent


def caller(*grants, login="mate@example.com", tags=(), owner=False, node="mate.ts.net") -> Identity:
    caps = {CAPABILITY: list(grants)} if grants else {}
    return Identity(login_name=login, source="tailnet", node_name=node, tags=tuple(tags),
                    capabilities=caps, is_owner=owner)


def test_no_grant_is_denied_with_reason():
    d = check(caller(), "generate", "tiny")
    assert not d.allowed
    assert "mate@example.com" in d.reason and CAPABILITY in d.reason
    assert "deploy/tailscale-policy.md" in d.reason
    assert visible_models(caller(), MODELS) == []


def test_owner_and_loopback_get_everything():
    for who in (caller(owner=True), loopback_owner()):
        for action in ("generate", "list", "info", "cancel", "admin"):
            assert check(who, action, "kimi-k2").allowed
        assert visible_models(who, MODELS) == MODELS


def test_grant_limits_models_and_actions():
    mate = caller({"models": ["tiny", "qwen-*"], "actions": ["generate", "list"], "max_streams": 2})
    assert visible_models(mate, MODELS) == ["tiny", "qwen-7b", "qwen-72b"]
    d = check(mate, "generate", "qwen-7b")
    assert d.allowed and d.limits == Limits(max_streams=2)
    denied = check(mate, "generate", "kimi-k2")
    assert not denied.allowed and "kimi-k2" in denied.reason and "qwen-*" in denied.reason
    assert check(mate, "list").allowed
    assert not check(mate, "info").allowed  # not in the grant's actions
    assert "'info'" in check(mate, "info").reason
    assert not check(mate, "admin").allowed


def test_default_actions_exclude_admin():
    mate = caller({"models": ["*"]})
    assert check(mate, "generate", "kimi-k2").allowed
    assert check(mate, "cancel").allowed and check(mate, "info").allowed
    assert not check(mate, "admin").allowed


def test_multiple_grants_union_and_most_generous_limit():
    mate = caller({"models": ["tiny"], "tokens_per_minute": 100, "max_streams": 1},
                  {"models": ["*"], "tokens_per_minute": 5000})
    d = check(mate, "generate", "tiny")
    assert d.allowed and d.limits == Limits(max_streams=None, tokens_per_minute=5000)
    assert check(mate, "generate", "kimi-k2").limits == Limits(None, 5000)


@pytest.mark.parametrize("bad", [
    "models=*",  # not an object
    {"models": "*"},  # not a list
    {"models": []},
    {"actions": ["generate"]},  # no models
    {"models": ["*"], "actions": "generate"},
    {"models": ["*"], "max_streams": 0},
    {"models": ["*"], "max_streams": True},
    {"models": ["*"], "tokens_per_minute": "lots"},
    {"models": [1, 2]},
])
def test_malformed_grant_is_ignored_and_reported(bad):
    d = check(caller(bad), "generate", "tiny")
    assert not d.allowed
    assert "ignored malformed grant" in d.reason


def test_malformed_grant_does_not_spoil_good_one():
    mate = caller({"models": "oops"}, {"models": ["tiny"]})
    assert check(mate, "generate", "tiny").allowed
    d = check(mate, "generate", "kimi-k2")
    assert not d.allowed and "ignored malformed grant" in d.reason


def test_unknown_actions_and_keys_grant_nothing_extra():
    parsed = parse_grants([{"models": ["tiny"], "actions": ["generate", "sudo"], "colour": "red"}])
    assert len(parsed.grants) == 1 and parsed.grants[0].actions == frozenset({"generate"})
    assert any("sudo" in p for p in parsed.problems) and any("colour" in p for p in parsed.problems)


def test_other_capabilities_are_not_ours():
    ident = Identity(login_name="x@y", source="tailnet",
                     capabilities={"example.com/cap/other": [{"models": ["*"]}]})
    assert not check(ident, "generate", "tiny").allowed


def test_unknown_action_denied():
    assert not check(caller(owner=True), "format-disk").allowed


def test_local_shares_by_login_tag_and_node():
    policy = Policy(local_grants={
        "friend@example.com": [{"models": ["tiny"]}],
        "tag:phones": [{"models": ["qwen-7b"], "actions": ["generate"]}],
        "tablet.ts.net": [{"models": ["kimi-k2"]}],
    })
    assert policy.visible_models(caller(login="friend@example.com"), MODELS) == ["tiny"]
    phone = Identity(login_name="", source="tailnet", node_name="phone.ts.net", tags=("tag:phones",))
    assert policy.visible_models(phone, MODELS) == ["qwen-7b"]
    tablet = Identity(login_name="", source="tailnet", node_name="tablet.ts.net")
    assert policy.check(tablet, "generate", "kimi-k2").allowed
    assert not policy.check(tablet, "generate", "tiny").allowed


def test_policy_gate_fits_the_api_gate_protocol():
    ident = caller({"models": ["tiny"]})
    gate = PolicyGate({"ipv4:127.0.0.1:5555": ident}.get)
    assert gate.identify("ipv4:127.0.0.1:5555") is ident
    assert gate.identify("ipv4:127.0.0.1:6666") is None
    assert gate.check(ident, "generate", "tiny").allowed
    v = gate.check(ident, "generate", "kimi-k2")
    assert not v.allowed and v.reason
    assert gate.check(ident, "list", "").allowed  # "" = no model, as the servicer passes it


def test_deploy_policy_snippets_parse_as_grants():
    """Every grant in deploy/tailscale-policy.md must be valid for lmlink's parser."""
    text = (REPO / "deploy" / "tailscale-policy.md").read_text()
    blocks = re.findall(r"```(?:jsonc?|hujson)\n(.*?)```", text, re.S)
    assert blocks, "no policy snippet found"
    found = 0
    for block in blocks:
        body = re.sub(r"//[^\n]*", "", block)
        body = re.sub(r",(\s*[}\]])", r"\1", body)  # HuJSON trailing commas
        doc = json.loads(body)
        grants = doc.get("grants", []) if isinstance(doc, dict) else []
        for g in grants:
            values = g.get("app", {}).get(CAPABILITY)
            if values is None:
                continue
            parsed = parse_grants(values)
            assert not parsed.problems, parsed.problems
            assert len(parsed.grants) == len(values)
            found += 1
    assert found >= 2
