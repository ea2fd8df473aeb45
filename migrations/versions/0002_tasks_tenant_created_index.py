"""index for GET /tasks: (tenant_id, created_at, id)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 05:00:00.000000
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One tenant's tasks, newest first, paged by (created_at, id): an index range scan in that order
    # instead of reading every task of the tenant (or of all tenants) and sorting.
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_tenant_created_id', ['tenant_id', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_tenant_created_id')
