"""State shared by replicas, in one SQL database: budgets, pins, approvals, call ids, API keys."""
