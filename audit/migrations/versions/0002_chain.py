"""Tamper evidence (schema version 2): chain position per instance and signed checkpoints.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_records", sa.Column("seq", sa.BigInteger))
    op.create_index("ux_audit_records_instance_seq", "audit_records", ["instance", "seq"], unique=True)
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("instance", sa.String(255), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(128), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(256), nullable=False),
    )
    op.create_index("ix_audit_checkpoints_instance_seq", "audit_checkpoints", ["instance", "seq"])


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_index("ux_audit_records_instance_seq", "audit_records")
    op.drop_column("audit_records", "seq")
