"""Hardening: bounce suppression, the auto-reply log, alerts, bounces on outbox rows.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import mailflow.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _at(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, mailflow.models.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(320), primary_key=True),
        _at("until"),
        sa.Column("reason", sa.Text(), nullable=False),
        _at("created_at"),
    )
    op.create_table(
        "auto_replies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("inbound_id", sa.Integer(), nullable=True),
        _at("at"),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_auto_replies_address_at", "auto_replies", ["address", "at"])
    op.create_index("ix_auto_replies_ticket_at", "auto_replies", ["ticket_id", "at"])
    op.create_table(
        "alerts",
        sa.Column("key", sa.String(400), primary_key=True),
        _at("first_at"),
        _at("last_at"),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("bounce", sa.Text(), nullable=True))
        batch.add_column(_at("bounced_at", nullable=True))
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("omitted", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("omitted")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("bounced_at")
        batch.drop_column("bounce")
    op.drop_table("alerts")
    op.drop_index("ix_auto_replies_ticket_at", table_name="auto_replies")
    op.drop_index("ix_auto_replies_address_at", table_name="auto_replies")
    op.drop_table("auto_replies")
    op.drop_table("suppressions")
