"""tasks.weights_sha256: the backbone weights a task was checked against, so that a worker serving
other weights refuses it (and `pretrained` is shown without the server's path)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 01:45:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('weights_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('weights_sha256')
