"""partial indexes for the housekeeping: what is still kept, and receipts not yet applied

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 19:20:00

The worker's housekeeping runs every few seconds. Purging the bodies past the retention period
read every message ever sent (50 ms with 200,000 messages, holding SQLite's write lock), and
looking for early receipts read every receipt ever received. Each now reads a partial index of
just the rows it is after: the bodies still kept of finished messages, the event payloads
still kept, the receipts not yet applied. The index of the provider's message ids leaves out
the messages not yet sent, which have none: a queued message is written to as many B-trees
as before, an event to one more.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _where(condition: str) -> dict:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def upgrade() -> None:
    op.drop_index("ix_messages_provider_message_id", table_name="messages")
    op.create_index(
        "ix_messages_provider_message_id",
        "messages",
        ["provider_message_id"],
        **_where("provider_message_id IS NOT NULL"),
    )
    op.create_index(
        "ix_messages_body_kept",
        "messages",
        ["finished_at"],
        **_where("body_enc IS NOT NULL AND finished_at IS NOT NULL"),
    )
    op.create_index(
        "ix_events_payload_kept", "events", ["received_at"], **_where("payload_enc IS NOT NULL")
    )
    op.create_index(
        "ix_provider_callbacks_unapplied",
        "provider_callbacks",
        ["id"],
        **_where("applied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_provider_callbacks_unapplied", table_name="provider_callbacks")
    op.drop_index("ix_events_payload_kept", table_name="events")
    op.drop_index("ix_messages_body_kept", table_name="messages")
    op.drop_index("ix_messages_provider_message_id", table_name="messages")
    op.create_index("ix_messages_provider_message_id", "messages", ["provider_message_id"])
