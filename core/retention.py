"""Retention: what a message needed only for a while goes once `security.retention_days` have
passed. The decisions stay (which message, to whom by blind index, its status and reason);
what goes is personal or only useful for a time:

- message bodies, counted from when the message reached its final status;
- event payloads (the recipient and the order data, kept for a data request's export);
- the platforms' delivery ids, which answer a redelivery at once (a redelivery after that is
  still recognised by its event's key);
- receipts that never found their message (a part of a long Vonage message, a message erased).

The worker's housekeeping runs this every few seconds. Each statement reads a partial index of
just the rows still kept (migration 0004), and does at most `limit` rows: a history that has
never been purged is worked off over a few rounds, none holding SQLite's write lock for long.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, Table, select, tuple_

from txsms.core.storage import deliveries, events, messages, provider_callbacks

DAY = 86400.0
LIMIT = 1_000  # rows per statement and round


def purge(conn: Connection, retention_days: int, *, limit: int = LIMIT) -> dict[str, int]:
    """Drop what is older than `retention_days`: how many rows of each kind."""
    cutoff = time.time() - retention_days * DAY
    bodies = select(messages.c.id).where(
        messages.c.body_enc.is_not(None), messages.c.finished_at < cutoff
    )
    payloads = select(events.c.id).where(
        events.c.payload_enc.is_not(None), events.c.received_at < cutoff
    )
    delivered = select(deliveries.c.source, deliveries.c.delivery_id).where(
        deliveries.c.received_at < cutoff
    )
    receipts = select(provider_callbacks.c.id).where(
        provider_callbacks.c.applied_at.is_(None),
        provider_callbacks.c.kind == "status",
        provider_callbacks.c.received_at < cutoff,
    )
    return {
        "bodies": _update(conn, messages, bodies.limit(limit), body_enc=None),
        "payloads": _update(conn, events, payloads.limit(limit), payload_enc=None),
        "deliveries": conn.execute(
            deliveries.delete().where(
                tuple_(deliveries.c.source, deliveries.c.delivery_id).in_(delivered.limit(limit))
            )
        ).rowcount,
        "receipts": conn.execute(
            provider_callbacks.delete().where(provider_callbacks.c.id.in_(receipts.limit(limit)))
        ).rowcount,
    }


def _update(conn: Connection, table: Table, ids, **values) -> int:
    return conn.execute(table.update().where(table.c.id.in_(ids)).values(**values)).rowcount
