"""PostgreSQL: messages pages keep 30 % free, so a row's next version fits beside it

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 22:35:00

A message is written once and updated three times (claimed, marked in flight, its result). On
full pages every new version of the row went to another page, and into every index of the
table. With room left on the page, a new version stays on it, and marking in flight (which
changes no indexed column) is a heap-only update that no index sees. Pages written before this
keep their old fill until their rows are gone. SQLite has no such setting: nothing to do there.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FILLFACTOR = 70  # as `storage.MESSAGES_FILLFACTOR` was when this was written


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE messages SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE messages RESET (fillfactor)")
