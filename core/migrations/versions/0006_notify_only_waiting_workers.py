"""PostgreSQL: the outbox trigger NOTIFYs only while a worker waits for work

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 03:40:00

PostgreSQL serializes the commits of all transactions that NOTIFY (one lock, held through the
commit's flush), and under load every ingest sent one to workers that were busy anyway: the
receivers' commits queued behind each other. Now a worker process with a thread waiting for
work keeps a row in `outbox_waiters` (it expires unless renewed, so a killed worker's row goes
stale on its own), and the trigger notifies only while there is one. The table is unlogged on
PostgreSQL: it says who is waiting now, nothing to recover after a crash. SQLite wakes workers
in-process and never reads it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CHANNEL = "txsms_outbox"  # txsms.core.notify.CHANNEL, fixed here as it was at this revision


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "outbox_waiters",
        sa.Column("worker", sa.String(200), primary_key=True),
        sa.Column("until", sa.Float, nullable=False),
        prefixes=["UNLOGGED"] if postgresql else [],
    )
    if postgresql:
        _notify_when(
            "EXISTS (SELECT 1 FROM outbox_waiters WHERE until > extract(epoch FROM now()))"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _notify_when("true")
    op.drop_table("outbox_waiters")


def _notify_when(condition: str) -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION txsms_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN
                PERFORM pg_notify('{CHANNEL}', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
