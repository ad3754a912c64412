"""Indexes that keep per-mail queries independent of how much mail there has been.

Found by the 50,000-mail backlog benchmark: the loop check (our last mail to the sender)
scanned every sent mail, and the similar-incident search every open incident, so
processing slowed as the database grew.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_index("ix_outbox_recipient")
        batch_op.create_index("ix_outbox_recipient_sent", ["recipient", "state", "sent_at"])
    op.create_index("ix_tickets_resolved", "tickets", ["kind", "resolved_at"])


def downgrade() -> None:
    op.drop_index("ix_tickets_resolved", table_name="tickets")
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_index("ix_outbox_recipient_sent")
        batch_op.create_index("ix_outbox_recipient", ["recipient"])
