"""Governance that needs memory across proposals (kind: Limits): rates, budgets, retry-storm quarantine."""
