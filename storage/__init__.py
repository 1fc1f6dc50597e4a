"""Findings store: SQLAlchemy models, sessions, migrations and queries."""
