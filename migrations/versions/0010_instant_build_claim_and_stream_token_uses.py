"""tasks.instant_build and instant_claimed_at: one build of the instant stage per task across replicas;
stream_token_uses: a stream token opens one stream

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 04:30:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instant_build', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('instant_claimed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'stream_token_uses',
        sa.Column('signature', sa.String(length=64), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('signature'),
    )
    op.create_index('ix_stream_token_uses_expires_at', 'stream_token_uses', ['expires_at'])


def downgrade() -> None:
    op.drop_index('ix_stream_token_uses_expires_at', table_name='stream_token_uses')
    op.drop_table('stream_token_uses')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('instant_claimed_at')
        batch_op.drop_column('instant_build')
