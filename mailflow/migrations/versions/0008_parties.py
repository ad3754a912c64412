"""parties: watchers and vendors on a ticket

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

import mailflow.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parties",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("added_at", mailflow.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(length=320), nullable=False),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ticket_id", "address", "role"),
    )
    op.create_index(op.f("ix_parties_ticket_id"), "parties", ["ticket_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_parties_ticket_id"), table_name="parties")
    op.drop_table("parties")
