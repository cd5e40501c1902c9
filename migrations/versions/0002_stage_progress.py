"""Per-stage progress columns: ``progress``/``eta_s`` now cover the whole job.

Until this revision ``jobs.progress`` and ``jobs.eta_s`` held the current stage's fraction and
ETA. They now hold the whole job's (app/job_progress.py); the stage's own move to the new
``stage_progress`` and ``stage_eta_s`` columns, copied over for existing rows. An unfinished
job's overall fraction is unknown, so it restarts at 0; a succeeded one stays at 1.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("stage_progress", sa.Double(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("stage_eta_s", sa.Double(), nullable=True))
    op.execute("UPDATE jobs SET stage_progress = progress, stage_eta_s = eta_s")
    op.execute("UPDATE jobs SET progress = 0, eta_s = NULL WHERE state IN ('queued', 'running')")


def downgrade() -> None:
    op.execute("UPDATE jobs SET progress = stage_progress, eta_s = stage_eta_s")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stage_eta_s")
        batch.drop_column("stage_progress")
