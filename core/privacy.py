"""Erasure and export of a person's (or a whole source's) data.

Erasure keeps exactly one thing: the consent ledger's blind index and actions, so that a
person who said STOP and then asked to be forgotten is still never texted again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, false, or_, select

from txsms.core import consent
from txsms.core.crypto import Vault
from txsms.core.storage import (
    consent_ledger,
    events,
    messages,
    order_context,
    provider_callbacks,
    recipients,
)


def erase(
    conn: Connection,
    index: str | None,
    *,
    source: str | None = None,
    whole_source: bool = False,
    order_refs: list[str] | None = None,
) -> dict[str, int]:
    """Erase a person (`index`, optionally only what `source` holds) or everything of `source`.

    `order_refs` (with `source`) also erases those orders, whoever they were addressed to:
    Shopify's customers/redact names the orders to redact.
    """
    if whole_source:
        if source is None:
            raise ValueError("whole_source needs a source")
        return _erase_where(conn, source=source, index=None)
    counts: dict[str, int] = {}
    if order_refs and source is not None:
        counts = _erase_where(conn, source=source, index=None, order_refs=order_refs)
    if index is None:
        return counts
    for what, n in _erase_where(conn, source=source, index=index).items():
        counts[what] = counts.get(what, 0) + n
    remaining = conn.execute(select(messages.c.id).where(messages.c.phone_index == index)).first()
    if source is None or remaining is None:
        counts["recipients"] = conn.execute(
            recipients.delete().where(recipients.c.phone_index == index)
        ).rowcount
    return counts


def _erase_where(
    conn: Connection, *, source: str | None, index: str | None, order_refs: list[str] | None = None
) -> dict[str, int]:
    def where(table):
        clauses = []
        if index is not None:
            clauses.append(table.c.phone_index == index)
        if source is not None:
            clauses.append(table.c.source == source)
        if order_refs is not None and "order_ref" in table.c:
            clauses.append(table.c.order_ref.in_(order_refs))
        return clauses

    provider_ids = [
        r[0]
        for r in conn.execute(select(messages.c.provider_message_id).where(*where(messages)))
        if r[0]
    ]
    counts = {"messages": conn.execute(messages.delete().where(*where(messages))).rowcount}
    if provider_ids:
        conn.execute(
            provider_callbacks.delete().where(
                provider_callbacks.c.provider_message_id.in_(provider_ids)
            )
        )
    counts["order_context"] = conn.execute(
        order_context.delete().where(*where(order_context))
    ).rowcount
    # Event rows stay (without their payload) so a redelivery is still recognised as a
    # duplicate and does not text the person again; a whole source goes entirely.
    if index is None and order_refs is None:
        counts["events"] = conn.execute(events.delete().where(*where(events))).rowcount
    else:
        counts["events"] = conn.execute(
            events.update().where(*where(events)).values(payload_enc=None, phone_index=None)
        ).rowcount
    if order_refs is None:  # the ledger is per person, not per order
        conn.execute(
            consent_ledger.update().where(*where(consent_ledger)).values(evidence_enc=None)
        )
    return counts


def collect(
    conn: Connection,
    vault: Vault,
    index: str | None,
    *,
    source: str | None = None,
    order_refs: list[str] | None = None,
) -> dict:
    """Everything held about one person (their number, and/or the orders a platform names),
    decrypted: the answer to a data request."""

    def scoped(table):
        who = []
        if index is not None:
            who.append(table.c.phone_index == index)
        if order_refs and "order_ref" in table.c:
            who.append(table.c.order_ref.in_(order_refs))
        clauses = [or_(*who)] if who else [false()]
        if source is not None and "source" in table.c:
            clauses.append(table.c.source == source)
        return clauses

    phone = conn.execute(
        select(recipients.c.phone_enc).where(recipients.c.phone_index == index)
    ).scalar()
    data: dict[str, Any] = {"phone": vault.decrypt(phone), "source": source}
    data["events"] = [
        {
            "source": r.source,
            "key": r.key,
            "kind": r.kind,
            "occurred_at": r.occurred_at,
            "payload": vault.decrypt_json(r.payload_enc),
        }
        for r in conn.execute(select(events).where(*scoped(events)))
    ]
    data["messages"] = [
        {
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "reason": r.reason,
            "body": vault.decrypt(r.body_enc),
            "created_at": r.created_at,
            "sent_at": r.sent_at,
        }
        for r in conn.execute(select(messages).where(*scoped(messages)))
    ]
    data["consent"] = consent.ledger(conn, vault, index) if index is not None else []
    data["orders"] = [
        {
            "source": r.source,
            "order": r.order_ref,
            "last_status": r.last_status,
            "context": vault.decrypt_json(r.context_enc),
        }
        for r in conn.execute(select(order_context).where(*scoped(order_context)))
    ]
    return data


def export(
    conn: Connection,
    vault: Vault,
    index: str | None,
    data_dir: str | os.PathLike,
    *,
    source: str | None = None,
    order_refs: list[str] | None = None,
) -> Path:
    """Write `collect(...)` as JSON readable only by this user; returns the path."""
    folder = Path(data_dir) / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    name = (index or uuid.uuid4().hex)[:12]
    path = folder / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{name}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        data = collect(conn, vault, index, source=source, order_refs=order_refs)
        json.dump(data, fh, indent=2)
    return path
