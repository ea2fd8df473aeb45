"""tasks.version: bumped on every visible change of a task (ETags, cheap polls, event streams)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 01:10:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows start at 1; the application adds one in SQL on each UPDATE (service.models.Task).
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('version', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('version')
