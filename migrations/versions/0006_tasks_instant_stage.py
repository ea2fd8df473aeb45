"""tasks.instant_status, instant_accuracy, instant_error: the training-free stage of every task

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 01:45:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Tasks created before this revision have no instant stage (null): /classify builds one on demand.
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instant_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('instant_accuracy', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('instant_error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('instant_error')
        batch_op.drop_column('instant_accuracy')
        batch_op.drop_column('instant_status')
