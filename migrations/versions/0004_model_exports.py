"""Model exports share the job queue: ``jobs.kind`` (``search`` | ``export``) and, for an export,
the job, plan and runtime target it applies (``GET /v1/jobs/{id}/plans/{plan_id}/model``).

Exports are rows of ``jobs`` so that the queue's claim, lease, heartbeat, fencing, reaper,
staging folders and sweep serve them unchanged. ``(parent_id, plan_id, target)`` is unique, so
two requests for the same export share one row; every existing row is a ``search`` job.
Downgrading deletes the export rows first (their artifact folders are then swept as results
of jobs that no longer exist).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EXPORT_FIELDS = (
    "(kind = 'search' AND parent_id IS NULL AND plan_id IS NULL AND target IS NULL) OR "
    "(kind = 'export' AND parent_id IS NOT NULL AND plan_id IS NOT NULL "
    "AND target IS NOT NULL)"
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="search")
        )
        batch.add_column(sa.Column("parent_id", sa.String(length=36), nullable=True))
        batch.add_column(sa.Column("plan_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("target", sa.String(length=32), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_unique_constraint(
            "uq_jobs_parent_id_plan_id_target", ["parent_id", "plan_id", "target"]
        )
        batch.create_check_constraint(op.f("ck_jobs_kind"), "kind IN ('search', 'export')")
        batch.create_check_constraint(op.f("ck_jobs_export_fields"), _EXPORT_FIELDS)


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'export'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_export_fields"), type_="check")
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.drop_constraint("uq_jobs_parent_id_plan_id_target", type_="unique")
        batch.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch.drop_column("target")
        batch.drop_column("plan_id")
        batch.drop_column("parent_id")
        batch.drop_column("kind")
