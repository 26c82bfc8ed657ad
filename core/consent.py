"""Consent: an append-only ledger, and per-category preferences.

The ledger is the only source of truth for opt-outs. Nothing in it is ever updated or deleted
except the encrypted evidence, which erasure drops: an erased person who said STOP stays
opted out, because the blind index and the fact of the opt-out remain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select

from txsms.core.crypto import Vault
from txsms.core.storage import consent_ledger, preferences

SCOPES = ("all", "marketing")
ACTIONS = ("opt_out", "opt_in")


@dataclass(frozen=True)
class ConsentState:
    transactional: str  # "allowed" | "opted_out"
    marketing: str  # "opted_in" | "not_opted_in" | "opted_out"

    @property
    def opted_out(self) -> bool:
        return self.transactional == "opted_out"


def record(
    conn: Connection,
    vault: Vault,
    phone_index: str,
    *,
    scope: str,
    action: str,
    source: str,
    evidence: dict[str, Any] | None = None,
    at: float | None = None,
) -> None:
    if scope not in SCOPES or action not in ACTIONS:
        raise ValueError(f"bad consent entry: scope={scope!r} action={action!r}")
    conn.execute(
        consent_ledger.insert().values(
            phone_index=phone_index,
            scope=scope,
            action=action,
            source=source,
            evidence_enc=vault.encrypt_json(evidence or {}),
            created_at=at if at is not None else time.time(),
        )
    )


def fold(entries) -> ConsentState:
    """Fold (scope, action) ledger entries, oldest first.

    STOP (scope all) ends everything; START restores transactional messages only, because
    marketing needs a fresh, explicit opt-in after an opt-out.
    """
    transactional, marketing = "allowed", "not_opted_in"
    for scope, action in entries:
        if scope == "all" and action == "opt_out":
            transactional, marketing = "opted_out", "opted_out"
        elif scope == "all":
            transactional = "allowed"
            marketing = "not_opted_in" if marketing == "opted_out" else marketing
        else:
            marketing = "opted_in" if action == "opt_in" else "opted_out"
    return ConsentState(transactional, marketing)


def state(conn: Connection, phone_index: str) -> ConsentState:
    return states(conn, [phone_index])[phone_index]


# Built once (an expanding IN parameter): the hot path reuses the compiled statement.
_LEDGER_OF = (
    select(consent_ledger.c.phone_index, consent_ledger.c.scope, consent_ledger.c.action)
    .where(consent_ledger.c.phone_index.in_(bindparam("indexes", expanding=True)))
    .order_by(consent_ledger.c.created_at, consent_ledger.c.id)
)
_OFF_OF = select(preferences.c.phone_index, preferences.c.category).where(
    preferences.c.phone_index.in_(bindparam("indexes", expanding=True)),
    preferences.c.enabled.is_(False),
)


def states(conn: Connection, indexes: list[str]) -> dict[str, ConsentState]:
    """The consent state of many numbers in one query (ingest looks up a whole batch)."""
    entries: dict[str, list[tuple[str, str]]] = {i: [] for i in indexes}
    rows = conn.execute(_LEDGER_OF, {"indexes": list(set(indexes))})
    for index, scope, action in rows:
        entries[index].append((scope, action))
    return {index: fold(e) for index, e in entries.items()}


def ledger(conn: Connection, vault: Vault, phone_index: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(consent_ledger)
        .where(consent_ledger.c.phone_index == phone_index)
        .order_by(consent_ledger.c.created_at, consent_ledger.c.id)
    )
    return [
        {
            "scope": r.scope,
            "action": r.action,
            "source": r.source,
            "evidence": vault.decrypt_json(r.evidence_enc),
            "at": r.created_at,
        }
        for r in rows
    ]


def set_preference(conn: Connection, phone_index: str, category: str, enabled: bool) -> None:
    table = preferences
    now = time.time()
    updated = conn.execute(
        table.update()
        .where(table.c.phone_index == phone_index, table.c.category == category)
        .values(enabled=enabled, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(
            table.insert().values(
                phone_index=phone_index, category=category, enabled=enabled, updated_at=now
            )
        )


def disabled_categories(conn: Connection, phone_index: str) -> set[str]:
    return disabled_categories_many(conn, [phone_index])[phone_index]


def disabled_categories_many(conn: Connection, indexes: list[str]) -> dict[str, set[str]]:
    off: dict[str, set[str]] = {i: set() for i in indexes}
    rows = conn.execute(_OFF_OF, {"indexes": list(set(indexes))})
    for index, category in rows:
        off[index].add(category)
    return off
