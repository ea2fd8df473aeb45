"""Alembic migrations of the service's database (see alembic.ini and service.migrate)."""
