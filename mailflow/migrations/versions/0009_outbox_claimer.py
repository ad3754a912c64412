"""Who claimed an outbox row: a relay that died on this host gives its mail way at once.

A claim moves the row's due time 10 minutes on (`CLAIM_FOR`); recording the claimer lets
another relay on the same host see that the claimer's process is gone and send the mail
at once instead of after those 10 minutes. A plain ADD COLUMN: no table rebuild.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_by", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("claimed_by")
