"""Incidents: the response breach is recorded once; an index for know-how reuse.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import mailflow.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(
            sa.Column(
                "response_breached_at", mailflow.models.UTCDateTime(timezone=True), nullable=True
            )
        )
    op.create_index("ix_tickets_similar", "tickets", ["kind", "category", "resolved_at"])


def downgrade() -> None:
    op.drop_index("ix_tickets_similar", table_name="tickets")
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("response_breached_at")
