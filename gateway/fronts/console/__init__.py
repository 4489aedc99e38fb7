"""The web console at `/console`: audit search, one call's story, approvals, tools, policy and
budgets, for admins. Served by Bastion itself; nothing is loaded from elsewhere (docs/console.md)."""
