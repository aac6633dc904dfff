"""Who may do what: `identity.Identity` (who is calling), `policy.Policy` (deny by default,
owner or `lmlink.dev/cap/inference` grant or local share), `gate.PolicyGate` (the API layer's
Gate), and the server's durable sharing state opened by `state.AccessState`: local shares
(`shares`), bearer tokens (`tokens`), quota windows (`quotas`) and the audit trail (`audit`)
in one SQLite database (`store`); `admin` runs the owner's share/token/usage commands."""
