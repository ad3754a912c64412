"""Attachments of the mails on a ticket, their bytes stored once by SHA-256.

Two new tables: `blobs` (hash, size, data) and `attachments` (which mail on which ticket
carried which blob, under which name and type). Plain CREATE TABLE: nothing is rebuilt.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

import mailflow.models

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("hash", sa.String(length=64), primary_key=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ticket_id", sa.Integer(), sa.ForeignKey("tickets.id"), nullable=False),
        sa.Column("inbound_id", sa.Integer(), sa.ForeignKey("inbound.id"), nullable=True),
        sa.Column("blob_hash", sa.String(length=64), sa.ForeignKey("blobs.hash"),
                  nullable=False),
        sa.Column("filename", sa.String(length=300), nullable=False),
        sa.Column("content_type", sa.String(length=200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("inline", sa.Boolean(), nullable=False),
        sa.Column("created_at", mailflow.models.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_attachments_ticket_id", "attachments", ["ticket_id"])
    op.create_index("ix_attachments_inbound_id", "attachments", ["inbound_id"])


def downgrade() -> None:
    op.drop_index("ix_attachments_inbound_id", table_name="attachments")
    op.drop_index("ix_attachments_ticket_id", table_name="attachments")
    op.drop_table("attachments")
    op.drop_table("blobs")
