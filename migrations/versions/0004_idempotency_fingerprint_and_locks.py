"""tasks.request_fingerprint and idempotency_locks: a different request under a used Idempotency-Key
is refused (422), a retry of one still in flight is a 409

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 01:25:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_fingerprint', sa.String(length=64), nullable=True))
    op.create_table(
        'idempotency_locks',
        sa.Column('tenant_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'key'),
    )


def downgrade() -> None:
    op.drop_table('idempotency_locks')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('request_fingerprint')
