"""Shards of a running job's sensitivity table for any worker: ``sensitivity_shards``.

A job's worker splits its planned layers into shards when its job reaches the analyze stage;
any worker claims one (one statement, leases renewed like a job's), writes the table of its
layers into the job's staging folder and marks it done; the job's worker merges the tables
(app/sensitivity_shards.py). Rows belong to one attempt of a job (``job_lease_version``) and go
with the job (``ON DELETE CASCADE``). Downgrading drops the table; stop the workers first, as
for any schema change (a worker in an analyze stage would find its shards gone).

Revision ID: 0006
Revises: 0005
Create Date: 2027-01-10 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sensitivity_shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("job_lease_version", sa.Integer(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_sensitivity_shards_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sensitivity_shards")),
        sa.UniqueConstraint("job_id", "shard", name=op.f("uq_sensitivity_shards_job_id_shard")),
    )


def downgrade() -> None:
    op.drop_table("sensitivity_shards")
