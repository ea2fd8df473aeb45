"""tasks.instant_method: the training-free method a task's instant stage was built with

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 04:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instant_method', sa.String(length=32), nullable=True))
    # Every stage built or started before this revision was Tip-Adapter's (the only instant method then).
    op.execute("UPDATE tasks SET instant_method = 'tip-adapter' WHERE instant_status IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('instant_method')
