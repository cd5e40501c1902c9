"""Alembic revisions (a package only so that they install with bitplan; Alembic skips this file)."""
