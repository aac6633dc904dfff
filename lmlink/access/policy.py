"""Who may do what: deny by default, allow by owner or by an `lmlink.dev/cap/inference` grant.

A caller may act on a model only if (a) it is the node's owner (or the loopback user in local
mode), or (b) one of its grants covers the action and the model. Grants come from the tailnet
policy file as an app capability (LocalAPI WhoIs `CapMap`), or from local shares the server
keeps itself (e.g. for tsnet, whose embedded node cannot see CapMap yet).

Grant JSON shape (one object per grant; a caller may hold several, they add up):

    {
      "models":  ["*"] | ["model-id", "qwen-*", ...],  # required; fnmatch patterns, "*" = all
      "actions": ["generate", "list", "info", "cancel", "metrics", "admin"],  # optional, default: all but metrics, admin
      "max_streams": 4,           # optional positive int: concurrent Generate streams
      "tokens_per_minute": 20000, # optional positive int: completion tokens per minute
      "tokens_per_day": 500000,   # optional positive int: completion tokens per day
      "max_prompt_tokens": 8192   # optional positive int: tokens in one prompt (prefill)
    }

Unknown keys and unknown action names are ignored (forward-compatible, they grant nothing).
A grant whose shape is wrong (models missing or not a list of strings, a bad limit) is ignored
whole, and the reason for a denial says so, so a typo in the policy file never grants more.
When several grants allow the same thing, the most generous limit wins (absent = unlimited).

Local shares (`lmlink share add`) name a login, a tag, or a tailnet group. Tailscale's WhoIs
does not report group membership, so the tailnet policy states it with a second app
capability, `lmlink.dev/cap/groups` = [{"groups": ["group:eng"]}], granted to that group;
a share for "group:eng" then applies to every caller carrying that marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping, Sequence

from lmlink.access.identity import Identity

CAPABILITY = "lmlink.dev/cap/inference"
GROUPS_CAPABILITY = "lmlink.dev/cap/groups"
# "metrics" (the Prometheus exposition names principals) is never a default.
ACTIONS: tuple[str, ...] = ("generate", "list", "info", "cancel", "metrics", "admin")
DEFAULT_ACTIONS: frozenset[str] = frozenset({"generate", "list", "info", "cancel"})
# Actions that concern one model; the others are checked without a model.
MODEL_ACTIONS: frozenset[str] = frozenset({"generate"})
LIMIT_KEYS: tuple[str, ...] = ("max_streams", "tokens_per_minute", "tokens_per_day",
                               "max_prompt_tokens")
_KNOWN_KEYS = {"models", "actions", *LIMIT_KEYS}
POLICY_HINT = "see deploy/tailscale-policy.md"


@dataclass(frozen=True)
class Limits:
    """Per-caller limits from grants; None means unlimited."""

    max_streams: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    # Processing a long prompt is the expensive part of it: a grant may bound one prompt.
    max_prompt_tokens: int | None = None

    def merge(self, other: Limits) -> Limits:
        """The more generous of two limit sets, per limit (None beats any number)."""

        def wider(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else max(a, b)

        return Limits(wider(self.max_streams, other.max_streams),
                      wider(self.tokens_per_minute, other.tokens_per_minute),
                      wider(self.tokens_per_day, other.tokens_per_day),
                      wider(self.max_prompt_tokens, other.max_prompt_tokens))

    @property
    def unlimited(self) -> bool:
        return self == UNLIMITED


UNLIMITED = Limits()


@dataclass(frozen=True)
class Grant:
    """One parsed, valid grant."""

    models: tuple[str, ...]
    actions: frozenset[str] = DEFAULT_ACTIONS
    limits: Limits = UNLIMITED

    def covers_model(self, model: str) -> bool:
        return any(p == "*" or fnmatchcase(model, p) for p in self.models)

    def allows(self, action: str, model: str | None) -> bool:
        if action not in self.actions:
            return False
        return model is None or self.covers_model(model)


@dataclass(frozen=True)
class Decision:
    """The answer to one check; `reason` is safe to send to the caller (PERMISSION_DENIED)."""

    allowed: bool
    reason: str
    limits: Limits = UNLIMITED


@dataclass(frozen=True)
class ParsedGrants:
    grants: tuple[Grant, ...]
    problems: tuple[str, ...]  # why some grants or parts were ignored


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_grant(raw: Any) -> tuple[Grant | None, list[str]]:
    """One grant JSON value -> (Grant or None if malformed, notes about what was ignored)."""
    notes: list[str] = []
    if not isinstance(raw, dict):
        return None, [f"grant is not a JSON object ({type(raw).__name__})"]
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(
        isinstance(m, str) and m for m in models
    ):
        return None, ["grant has no valid \"models\" list (want [\"*\"] or model ids)"]
    actions: frozenset[str] = DEFAULT_ACTIONS
    if "actions" in raw:
        acts = raw["actions"]
        if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
            return None, ["grant \"actions\" is not a list of strings"]
        unknown = sorted(set(acts) - set(ACTIONS))
        if unknown:
            notes.append(f"unknown actions ignored: {', '.join(unknown)}")
        actions = frozenset(a for a in acts if a in ACTIONS)
    limits: dict[str, int | None] = {}
    for key in LIMIT_KEYS:
        value = raw.get(key)
        if value is None:
            limits[key] = None
        elif _positive_int(value):
            limits[key] = value
        else:
            return None, [f"grant \"{key}\" must be a positive integer, got {value!r}"]
    extra = sorted(set(raw) - _KNOWN_KEYS)
    if extra:
        notes.append(f"unknown keys ignored: {', '.join(extra)}")
    return Grant(tuple(models), actions, Limits(**limits)), notes


def parse_grants(values: Iterable[Any]) -> ParsedGrants:
    """Parse every grant value; malformed ones are dropped and described."""
    grants: list[Grant] = []
    problems: list[str] = []
    for raw in values:
        grant, notes = parse_grant(raw)
        if grant is None:
            problems.extend(f"ignored malformed grant: {n}" for n in notes)
        else:
            grants.append(grant)
            problems.extend(notes)
    return ParsedGrants(tuple(grants), tuple(problems))


@dataclass
class Policy:
    """Owner + tailnet grants + optional local shares; stateless apart from the share table.

    `local_grants` maps a principal to grant values in the same JSON shape: a login name
    ("alice@example.com"), a tag ("tag:laptops") or a node name ("phone.tail1234.ts.net").
    """

    local_grants: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    capability: str = CAPABILITY

    def grants_for(self, identity: Identity) -> ParsedGrants:
        """All grant values that apply to this caller, parsed."""
        values: list[Any] = list(identity.capabilities.get(self.capability) or [])
        principals = [identity.login_name, identity.node_name, *identity.tags,
                      *identity_groups(identity)]
        for p in principals:
            if p:
                values.extend(self.local_grants.get(p, ()))
        return parse_grants(values)

    def check(self, identity: Identity, action: str, model: str | None = None) -> Decision:
        """May `identity` do `action` (on `model`)? Deny by default, with a clear reason."""
        model = model or None
        who = identity.label
        if action not in ACTIONS:
            return Decision(False, f"unknown action {action!r}")
        if identity.is_owner:
            return Decision(True, f"{who} owns this server")
        parsed = self.grants_for(identity)
        matching = [g for g in parsed.grants if g.allows(action, model)]
        if matching:
            limits = matching[0].limits
            for g in matching[1:]:
                limits = limits.merge(g.limits)
            what = f"{action} on {model}" if model else action
            return Decision(True, f"{who} holds a grant for {what}", limits)
        return Decision(False, self._denial(who, action, model, parsed))

    def _denial(self, who: str, action: str, model: str | None, parsed: ParsedGrants) -> str:
        problems = f" ({'; '.join(parsed.problems)})" if parsed.problems else ""
        if not parsed.grants:
            return (f"{who} has no valid {self.capability} grant{problems} and no local share; "
                    f"ask the tailnet admin for one ({POLICY_HINT}) or the server owner for a "
                    f"share (lmlink share add)")
        if not any(action in g.actions for g in parsed.grants):
            return f"{who} is not granted the {action!r} action{problems}"
        granted = sorted({m for g in parsed.grants if action in g.actions for m in g.models})
        return (f"{who} is not granted {action!r} on model {model!r} "
                f"(granted: {', '.join(granted)}){problems}")

    def visible_models(self, identity: Identity, model_ids: Iterable[str]) -> list[str]:
        """The models this caller may generate with, in input order (what ListModels shows)."""
        return [m for m in model_ids if self.check(identity, "generate", m).allowed]


def identity_groups(identity: Identity) -> tuple[str, ...]:
    """Tailnet groups the caller belongs to, as the tailnet policy states them.

    WhoIs has no group membership; the policy grants `lmlink.dev/cap/groups` =
    [{"groups": ["group:eng", ...]}] to the group's members. Malformed values are ignored.
    """
    out: list[str] = []
    for value in identity.capabilities.get(GROUPS_CAPABILITY) or ():
        groups = value.get("groups") if isinstance(value, dict) else None
        if isinstance(groups, list):
            out.extend(g for g in groups if isinstance(g, str) and g.startswith("group:"))
    return tuple(dict.fromkeys(out))


_DEFAULT = Policy()


def check(identity: Identity, action: str, model: str | None = None) -> Decision:
    """`Policy().check` with no local shares: owner or tailnet grant, else deny."""
    return _DEFAULT.check(identity, action, model)


def visible_models(identity: Identity, model_ids: Iterable[str]) -> list[str]:
    """`Policy().visible_models` with no local shares."""
    return _DEFAULT.visible_models(identity, model_ids)
