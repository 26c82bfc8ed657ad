"""PostgreSQL: NOTIFY txsms_outbox from a trigger when a message becomes due

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 04:30:00

Ingest used to send `SELECT pg_notify(...)` itself: one more round trip in every commit that
queued a message. The trigger does it inside the same statement, for every path that makes a
message pending or deferred (ingest, keyword replies, retries, a resend). NOTIFY is delivered
at commit, once per transaction. SQLite has no NOTIFY: nothing to do there.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHANNEL = "txsms_outbox"  # txsms.core.notify.CHANNEL, fixed here as it was at this revision


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION txsms_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER messages_outbox_notify
        AFTER INSERT OR UPDATE OF status ON messages
        FOR EACH ROW WHEN (NEW.status IN ('pending', 'deferred'))
        EXECUTE FUNCTION txsms_outbox_notify()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS messages_outbox_notify ON messages")
    op.execute("DROP FUNCTION IF EXISTS txsms_outbox_notify()")
