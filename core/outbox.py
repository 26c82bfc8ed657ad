"""The outbox: message rows are the queue; claims are leases.

A row moves pending/deferred → sending (claimed, leased) → in flight (committed just before
the provider request) → sent | failed | skipped | unknown, or back to pending with a later
`send_at` for a retry. A worker that dies releases its claims when the lease ends; a claim that
was in flight becomes `unknown` instead, because the provider may have the message already.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import Connection, Row, Select, TextClause, Update, bindparam, select, text

from txsms.core.storage import DIALECTS, DUE, any_of, messages


def _claimable(dialect: str) -> dict[str, Select | TextClause]:
    """The two queries of a claim, built once; `now` and `limit` are parameters."""
    take_over = (
        select(messages.c.id)
        .where(
            messages.c.status == "sending",
            messages.c.lease_until < bindparam("now"),
            messages.c.in_flight.is_(False),
        )
        .order_by(messages.c.send_at)
        .limit(bindparam("limit"))
    )
    if dialect == "sqlite":  # without statistics it would pick (status, send_at), then sort
        due = text(
            "SELECT id FROM messages INDEXED BY ix_messages_due "
            f"WHERE {DUE.text} AND send_at <= :now ORDER BY send_at LIMIT :limit"
        )
        return {"take_over": take_over, "due": due}
    due = (
        select(messages.c.id)
        .where(DUE, messages.c.send_at <= bindparam("now"))
        .order_by(messages.c.send_at)
        .limit(bindparam("limit"))
    )
    # Rows another worker is claiming are passed over, not waited for.
    return {
        "take_over": take_over.with_for_update(skip_locked=True),
        "due": due.with_for_update(skip_locked=True),
    }


_CLAIMABLE = {dialect: _claimable(dialect) for dialect in DIALECTS}


def claim(conn: Connection, worker_id: str, *, lease: float, limit: int) -> Sequence[Row]:
    now = time.time()
    # Claims whose worker died before the request left: safe to take over, and first, as
    # they have waited longest. Then the queue, oldest first, read off `ix_messages_due`
    # (one OR of both sorted every due message: 80 ms a claim with 100,000 waiting).
    queries = _CLAIMABLE[conn.dialect.name]
    ids = list(conn.execute(queries["take_over"], {"now": now, "limit": limit}).scalars())
    if len(ids) < limit:
        params = {"now": now, "limit": limit - len(ids)}
        ids += conn.execute(queries["due"], params).scalars()
    if not ids:
        return []
    params = {"_ids": ids, "_lease_until": now + lease, "_claimed_by": worker_id, "_now": now}
    rows = conn.execute(_CLAIM, params).all()
    return sorted(rows, key=lambda row: row.send_at)


# Built once, like the queries above: building the statement, its cache key and its IN list
# per claim took about 40 % of a claim's CPU.
_CLAIM = (
    messages.update()
    .where(messages.c.id.in_(bindparam("_ids", expanding=True)))
    .values(
        status="sending",
        reason=None,
        lease_until=bindparam("_lease_until"),
        claimed_by=bindparam("_claimed_by"),
        in_flight=False,
        attempts=messages.c.attempts + 1,
        updated_at=bindparam("_now"),
    )
    .returning(*messages.c)
)


# Built once: the columns to set travel as parameters, so SQLAlchemy compiles each shape once
# and the worker's hot path does not rebuild statements for every message.
_UPDATE = messages.update().where(messages.c.id == bindparam("_id"))


def _claim_statements(dialect: str) -> dict[str, Update]:
    # The rows of a claim that are still ours (a lease that ran out may have been taken over).
    still_claimed = messages.update().where(
        any_of(messages.c.id, "_ids", dialect),
        messages.c.claimed_by == bindparam("_claim"),
        messages.c.status == "sending",
    )
    return {
        # The lease starts again: a claim may wait behind earlier windows and batches for a
        # while before its requests leave, and the lease must cover the requests themselves.
        "mark": still_claimed.values(
            in_flight=True,
            provider=bindparam("_provider"),
            lease_until=bindparam("_lease_until"),
            updated_at=bindparam("_now"),
        ).returning(messages.c.id),
        "unmark": still_claimed.values(in_flight=False, updated_at=bindparam("_now")),
        # Not in flight, so claimable again at once (the "lease ran out" branch of `claim`),
        # and the attempt the claim counted never happened.
        "release": still_claimed.where(messages.c.in_flight.is_(False)).values(
            lease_until=0.0, attempts=messages.c.attempts - 1, updated_at=bindparam("_now")
        ),
    }


_CLAIMED = {dialect: _claim_statements(dialect) for dialect in DIALECTS}


def update(conn: Connection, message_id: str, **values) -> None:
    values.setdefault("updated_at", time.time())
    conn.execute(_UPDATE, {"_id": message_id, **values})


def update_many(conn: Connection, changes: Sequence[dict]) -> None:
    """Several `update`s in one executemany; every dict has `_id` and the same other keys."""
    if changes:
        conn.execute(_UPDATE, list(changes))


def mark_in_flight(
    conn: Connection, ids: Sequence[str], claim: str, provider: str, *, lease: float
) -> set[str]:
    """Commit "these requests are about to leave" — for the ids whose claim is still ours,
    which are returned — and lease them for another `lease` seconds from now."""
    now = time.time()
    params = {
        "_ids": list(ids),
        "_claim": claim,
        "_provider": provider,
        "_lease_until": now + lease,
        "_now": now,
    }
    return {row[0] for row in conn.execute(_CLAIMED[conn.dialect.name]["mark"], params)}


def unmark_in_flight(conn: Connection, ids: Sequence[str], claim: str) -> None:
    """Marked, but the worker stopped before sending them: they never left, so they go back to
    the queue when the claim's lease ends instead of becoming `unknown`."""
    if ids:
        params = {"_ids": list(ids), "_claim": claim, "_now": time.time()}
        conn.execute(_CLAIMED[conn.dialect.name]["unmark"], params)


def release(conn: Connection, ids: Sequence[str], claim: str) -> None:
    """Claimed but never marked in flight (the worker is stopping): any worker may take them
    now instead of when the lease ends."""
    if ids:
        params = {"_ids": list(ids), "_claim": claim, "_now": time.time()}
        conn.execute(_CLAIMED[conn.dialect.name]["release"], params)


def sweep_interrupted(conn: Connection) -> int:
    """Claims whose lease ran out while the request was in flight: the outcome is unknown."""
    now = time.time()
    return conn.execute(
        messages.update()
        .where(
            messages.c.status == "sending",
            messages.c.in_flight.is_(True),
            messages.c.lease_until < now,
        )
        .values(status="unknown", reason="interrupted", in_flight=False, updated_at=now)
    ).rowcount
