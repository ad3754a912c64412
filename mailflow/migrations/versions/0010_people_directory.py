"""people directory: department, phone, location, language, VIP, where the details came
from (csv | ldap | mail) and when they were last loaded

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

import mailflow.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = (
    ("department", sa.String(length=200)),
    ("phone", sa.String(length=100)),
    ("location", sa.String(length=200)),
    ("language", sa.String(length=35)),
)


def upgrade() -> None:
    for name, kind in COLUMNS:
        op.add_column("people", sa.Column(name, kind, nullable=True))
    op.add_column("people", sa.Column("vip", sa.Boolean(), server_default="0", nullable=False))
    op.add_column(
        "people", sa.Column("source", sa.String(length=10), server_default="mail", nullable=False)
    )
    op.add_column(
        "people", sa.Column("synced_at", mailflow.models.UTCDateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    for name in ("synced_at", "source", "vip", *(name for name, _ in reversed(COLUMNS))):
        op.drop_column("people", name)
