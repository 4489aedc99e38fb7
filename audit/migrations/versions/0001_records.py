"""The audit_records table as the first release created it (schema version 1).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("audit_records"):
        return  # created before migrations existed: already in this shape
    op.create_table(
        "audit_records",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("instance", sa.String(255), nullable=False),
        sa.Column("user", sa.String(255)),
        sa.Column("tenant", sa.String(255)),
        sa.Column("agent", sa.String(255)),
        sa.Column("upstream", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("effect", sa.String(32)),
        sa.Column("status", sa.String(32)),
        sa.Column("prev_hash", sa.String(128)),
        sa.Column("hash", sa.String(128)),
        sa.Column("record", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_records_ts_id", "audit_records", ["ts", "id"])
    op.create_index("ix_audit_records_user_ts", "audit_records", ["user", "ts", "id"])
    op.create_index("ix_audit_records_tool_ts", "audit_records", ["tool", "ts", "id"])
    op.create_index("ix_audit_records_effect_ts", "audit_records", ["effect", "ts", "id"])
    op.create_index("ix_audit_records_status_ts", "audit_records", ["status", "ts", "id"])


def downgrade() -> None:
    op.drop_table("audit_records")
