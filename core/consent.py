"""Consent: an append-only ledger, and per-category preferences.

The ledger is the only source of truth for opt-outs. Nothing in it is ever updated or deleted
except the encrypted evidence, which erasure drops: an erased person who said STOP stays
opted out, because the blind index and the fact of the opt-out remain.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, Select, literal_column, null, select, union_all

from txsms.core.crypto import Vault
from txsms.core.storage import DIALECTS, any_of, consent_ledger, preferences, recipients

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
    return numbers(conn, [phone_index])[phone_index].consent


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
    return set(numbers(conn, [phone_index])[phone_index].off)


@dataclass(frozen=True)
class Number:
    """What is stored about one number, as ingest and the worker need it."""

    known: bool  # it has a recipients row
    invalid_reason: str | None
    footer_sent_at: float | None
    consent: ConsentState
    off: frozenset[str]  # categories switched off


def _part(name: str):
    return literal_column(f"'{name}'").label("part")


def number_parts(dialect: str, *, single: bool = False) -> list[Select]:
    """The recipient row, the ledger and the switched-off categories of the numbers in the
    list parameter `indexes` (`single`: see `storage.any_of`), as rows of (part, key, a, b,
    at, seq).

    `numbers` unions them; ingest unions them with look-ups of its own of the same shape, so
    that a webhook's reads are one round trip. `numbers_from` reads the rows back."""
    return [
        select(
            _part("recipient"),
            recipients.c.phone_index.label("key"),
            recipients.c.invalid_reason.label("a"),
            null().label("b"),
            recipients.c.footer_sent_at.label("at"),
            literal_column("0").label("seq"),
        ).where(any_of(recipients.c.phone_index, "indexes", dialect, single=single)),
        select(
            _part("ledger"),
            consent_ledger.c.phone_index,
            consent_ledger.c.scope,
            consent_ledger.c.action,
            consent_ledger.c.created_at,
            consent_ledger.c.id,
        ).where(any_of(consent_ledger.c.phone_index, "indexes", dialect, single=single)),
        select(
            _part("off"),
            preferences.c.phone_index,
            preferences.c.category,
            null(),
            null(),
            literal_column("0"),
        ).where(
            any_of(preferences.c.phone_index, "indexes", dialect, single=single),
            preferences.c.enabled.is_(False),
        ),
    ]


_NUMBERS_OF = {dialect: union_all(*number_parts(dialect)) for dialect in DIALECTS}


def numbers(conn: Connection, indexes: list[str]) -> dict[str, Number]:
    """`Number`s for `indexes`, in one query: ingest and the worker look up whole batches."""
    if not indexes:
        return {}
    rows = conn.execute(_NUMBERS_OF[conn.dialect.name], {"indexes": list(set(indexes))})
    return numbers_from(indexes, rows)


def numbers_from(indexes: list[str], rows: Iterable[Row]) -> dict[str, Number]:
    """`Number`s for `indexes` from `number_parts`' rows; rows of other parts are skipped."""
    unique = set(indexes)
    people: dict[str, tuple] = {}
    ledgers: dict[str, list[tuple]] = {i: [] for i in unique}
    off: dict[str, set[str]] = {i: set() for i in unique}
    for part, index, a, b, at, seq, *_ in rows:
        if part == "recipient":
            people[index] = (a, at)
        elif part == "ledger":
            ledgers[index].append((at, seq, a, b))
        elif part == "off":
            off[index].add(a)
    result = {}
    for index in unique:
        invalid, footer = people.get(index, (None, None))
        entries = [(scope, action) for _, _, scope, action in sorted(ledgers[index])]
        result[index] = Number(
            index in people, invalid, footer, fold(entries), frozenset(off[index])
        )
    return result
