"""Places for other workers in a running job's measured search: ``search_peers``.

A job's worker opens a few places when its job reaches the search stage; idle workers claim
them (one statement, leases renewed like a job's) and run trials of the job's Optuna study
(app/search_peers.py). Rows belong to one attempt of a job (``job_lease_version``) and go with
the job (``ON DELETE CASCADE``). Downgrading drops the table: running searches simply lose
their extra workers, the job's own worker finishes the trials.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "search_peers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("job_lease_version", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_search_peers_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_search_peers")),
        sa.UniqueConstraint("job_id", "slot", name=op.f("uq_search_peers_job_id_slot")),
    )


def downgrade() -> None:
    op.drop_table("search_peers")
