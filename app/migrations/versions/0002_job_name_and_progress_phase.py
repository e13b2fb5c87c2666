"""jobs.name (a label chosen at submit) and jobs.progress_phase (which pass the progress counts: a first pass,
the merge, evaluation, training).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 05:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_phase", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("name", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progress_phase")
        batch.drop_column("name")
