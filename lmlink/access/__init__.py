"""Who may do what: `identity.Identity` (who is calling), `policy.Policy` (deny by default,
owner or `lmlink.dev/cap/inference` grant), `gate.PolicyGate` (the API layer's Gate for tailnet
listeners)."""
