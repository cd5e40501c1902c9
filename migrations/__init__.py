"""Alembic migrations of the bitplan service, installed as package data (``bitplan.migrations``).

``bitplan db upgrade`` applies them; by hand: ``alembic -c migrations/alembic.ini upgrade head``.
"""
