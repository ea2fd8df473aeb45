"""task_candidates: method=auto's candidates, each trained by a job of its own on any free worker

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'task_candidates',
        sa.Column('task_id', sa.String(length=32), sa.ForeignKey('tasks.id', ondelete='CASCADE'), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('lease', sa.String(length=32), nullable=True),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('epochs', sa.Integer(), nullable=False),
        sa.Column('epoch', sa.Integer(), nullable=False),
        sa.Column('fraction', sa.Float(), nullable=False),
        sa.Column('row', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('task_id', 'position'),
    )


def downgrade() -> None:
    op.drop_table('task_candidates')
