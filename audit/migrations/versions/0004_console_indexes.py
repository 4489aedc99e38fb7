"""Search the trail by target and by agent on indexes: the console pages newest first by
(ts, id) within a tool server / model namespace / A2A agent, or within one agent's calls.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_records_upstream_ts", "audit_records", ["upstream", "ts", "id"])
    op.create_index("ix_audit_records_agent_ts", "audit_records", ["agent", "ts", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_agent_ts", "audit_records")
    op.drop_index("ix_audit_records_upstream_ts", "audit_records")
