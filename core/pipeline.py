"""Ingest: canonical Events in, decisions and queued messages out, in one transaction.

Every event ends in exactly one recorded decision per template: a queued message (pending or
deferred) or a skip with its reason. Nothing here talks to the network, so a webhook can wait
for `ingest` to commit before it answers, and answer fast.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Row,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.exc import DBAPIError

from txsms.core import consent, privacy
from txsms.core.errors import TemplateError
from txsms.core.events import MESSAGE_KINDS, Event, Recipient
from txsms.core.groupcommit import GroupCommitter
from txsms.core.metrics import DECISIONS, EVENTS, REHEARSALS, platform_of
from txsms.core.phones import Phone, PhoneError, normalize
from txsms.core.policy import quiet_until
from txsms.core.redact import redact_phone
from txsms.core.rehearsal import CannotRehearse, Rehearsal
from txsms.core.rehearsal import apply as apply_rehearsals
from txsms.core.rehearsal import log as note
from txsms.core.runtime import Runtime
from txsms.core.storage import (
    DIALECTS,
    any_of,
    consent_ledger,
    deliveries,
    events,
    insert_ignore,
    is_sqlite,
    messages,
    order_context,
    preferences,
    recipients,
    sources,
)
from txsms.core.templates import build_context

log = logging.getLogger(__name__)

#: Skip reasons that hold for every later event of the same order.
ORDER_WIDE_SKIPS = frozenset({"test_order"})

#: Statuses that count towards `policy.max_per_day` (what was or will be sent).
COUNTED = ("pending", "deferred", "sending", "sent", "delivered", "undelivered", "unknown")


@dataclass
class Decision:
    id: str
    status: str
    reason: str | None = None


@dataclass
class IngestResult:
    key: str
    status: str  # "accepted" | "duplicate" | "stale" (older than what was seen; ignored)
    id: str
    messages: list[Decision] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """What HTTP callers are told about this event."""
        return {
            "key": self.key,
            "status": self.status,
            "id": self.id,
            "messages": [
                {"id": d.id, "status": d.status, "reason": d.reason} for d in self.messages
            ],
        }


def new_id() -> str:
    """A row id: a UUIDv7 (RFC 9562) as 32 hex digits, the time in milliseconds first, then
    74 random bits. Rows made one after the other get ids that sort together, so the primary
    keys of events and messages grow at one end of their index instead of at a random page of
    it: with a million rows, a PostgreSQL ingest took 2.06 to 2.22 ms where random ids (UUIDv4)
    took 2.30 to 2.48 ms, alternated."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC's variant
    return f"{value:032x}"


def ingest(
    runtime: Runtime, batch: list[Event], *, delivery: tuple[str, str] | None = None
) -> list[IngestResult] | None:
    """Record `batch` durably; returns after the commit, one result per event.

    `delivery` is a platform's (source, delivery id): when that delivery was already
    processed, nothing is done and None is returned.
    """
    # Phone numbers are parsed here, on the request's own thread, before the hand-off to
    # the single writer thread: the writer should spend its time on the database.
    phones = {(e.recipient.phone, e.recipient.country): _parse_phone(runtime, e) for e in batch}
    request = _Request(batch, delivery, phones)
    committer = _committer(runtime)
    if not committer.grouping and is_sqlite(runtime.engine):
        # One request at a time (gunicorn's sync workers): work it out before SQLite's one
        # write lock, which all the processes share, and hold the lock only to apply it.
        request.rehearsed = _rehearse_outside(runtime, request)
    else:
        # Grouped commits (one writer thread) and PostgreSQL: worked out in the transaction,
        # the writes then sent straight to the driver (in one round trip on PostgreSQL).
        runtime.readers.release()  # this thread's, if it rehearsed before the grouping began
        request.rehearse = True
    results = committer.run(request)
    if results is None:
        return None
    queued = any(d.status in ("pending", "deferred") for r in results for d in r.messages)
    for event, result in zip(batch, results, strict=True):
        EVENTS.labels(platform_of(event.source), event.kind, result.status).inc()
        for d in result.messages:
            DECISIONS.labels(d.status, d.reason or "").inc()
    if queued:
        runtime.wakeup.notify()
    return results


@dataclass
class _Request:
    batch: list[Event]
    delivery: tuple[str, str] | None
    phones: dict[tuple, tuple[Phone | None, str | None]]
    rehearsed: _Rehearsed | None = None  # SQLite: worked out before the transaction
    rehearse: bool = False  # PostgreSQL: to be worked out in it, its writes sent together


@dataclass(frozen=True)
class _Rehearsed:
    rehearsal: Rehearsal
    results: list[list[IngestResult] | None]  # one per request rehearsed


def _rehearse(
    runtime: Runtime,
    conn: Connection,
    requests: list[_Request],
    *,
    inside: bool,
    assume: bool = False,
) -> _Rehearsed | None:
    """Work `requests` out against a rehearsal (core/rehearsal.py) reading through `conn`:
    outside the write transaction, or `inside` it. `assume`: assumptions may stand in for
    the look-ups (`_Familiar`). None: they are worked out for real."""
    if any(e.kind.startswith("privacy.") for r in requests for e in r.batch):
        return None  # an export writes a file: not something to do twice
    rehearsal = Rehearsal(conn, in_transaction=inside)
    try:
        results = _work_out(runtime, rehearsal, requests, assume=assume)
    except CannotRehearse as exc:
        log.debug("ingest not rehearsed: %s", exc)
        REHEARSALS.labels("refused").inc()
        return None
    return _Rehearsed(rehearsal, results)


def _rehearse_outside(runtime: Runtime, request: _Request) -> _Rehearsed | None:
    try:
        with runtime.readers.connection() as conn:
            return _rehearse(runtime, conn, [request], inside=False)
    except DBAPIError as exc:  # the work is done under the lock, and fails there if it must
        log.warning("ingest not rehearsed: %s", type(exc).__name__)
        REHEARSALS.labels("refused").inc()
        return None


_committer_lock = threading.Lock()


def _committer(runtime: Runtime) -> GroupCommitter:
    """One writer per runtime: concurrent ingests share its transaction and commit."""
    committer = runtime.__dict__.get("_ingest_committer")
    if committer is None:
        with _committer_lock:
            committer = runtime.__dict__.get("_ingest_committer")
            if committer is None:
                committer = GroupCommitter(runtime.engine, partial(_ingest_group, runtime))
                runtime.__dict__["_ingest_committer"] = committer
    return committer


def _ingest_group(
    runtime: Runtime, conn: Connection, requests: list[_Request]
) -> list[list[IngestResult] | None]:
    """Ingest the requests that queued up together: rehearsed and applied where that pays
    (one request at a time), else worked out here."""
    if all(r.rehearse for r in requests):
        # First on assumptions (PostgreSQL: `_Familiar`), then, where one fails, on what the
        # database reads now.
        for assume in (True, False):
            rehearsed = _rehearse(runtime, conn, requests, inside=True, assume=assume)
            # Nothing follows in this transaction but its commit (PostgreSQL: sent along).
            if rehearsed is not None and _applied(conn, [rehearsed], commit=True):
                return rehearsed.results
            if rehearsed is None or not rehearsed.rehearsal.assumed:
                break
    elif all(r.rehearsed for r in requests):
        rehearsals = [r.rehearsed for r in requests]
        if _applied(conn, rehearsals):
            return [result for r in rehearsals for result in r.results]
    return _work_out(runtime, conn, requests)


def _applied(conn: Connection, rehearsed: list[_Rehearsed], *, commit: bool = False) -> bool:
    """Apply the rehearsals; False when the database no longer reads as they saw it.
    `commit`: as `rehearsal.apply`'s."""
    if not apply_rehearsals(conn, [r.rehearsal for r in rehearsed], commit=commit):
        REHEARSALS.labels("redone").inc(len(rehearsed))
        return False
    for r in rehearsed:
        r.rehearsal.flush_notes(conn)
    REHEARSALS.labels("applied").inc(len(rehearsed))
    return True


def _work_out(
    runtime: Runtime,
    conn: Connection | Rehearsal,
    requests: list[_Request],
    *,
    assume: bool = False,
) -> list[list[IngestResult] | None]:
    """Ingest the requests on `conn`, with one set of look-ups for all (`assume`: see
    `_Lookups`)."""
    now = time.time()
    phones = {k: v for r in requests for k, v in r.phones.items()}
    batch = [e for r in requests for e in r.batch]
    lookups = _Lookups(runtime, conn, batch, phones, assume=assume)
    out: list[list[IngestResult] | None] = []
    for request in requests:
        if request.delivery is not None and not insert_ignore(
            conn,
            deliveries,
            {"source": request.delivery[0], "delivery_id": request.delivery[1], "received_at": now},
            ["source", "delivery_id"],
        ):
            out.append(None)
            continue
        out.append([_ingest_one(runtime, conn, event, now, lookups) for event in request.batch])
    return out


# Statements built once (building one costs about as much as running it), with every value a
# parameter: their text never changes, so they compile once, here and for the driver.
_EVENT_ID = select(events.c.id).where(
    events.c.source == bindparam("source"), events.c.key == bindparam("key")
)
_DECISION_OF = select(messages.c.id, messages.c.status, messages.c.reason).where(
    messages.c.idempotency_key == bindparam("key")
)
# SET takes the columns given at execute; the WHERE's names must differ from theirs.
_UPDATE_CONTEXT = order_context.update().where(
    order_context.c.source == bindparam("w_source"),
    order_context.c.order_ref == bindparam("w_ref"),
)
_ADVANCE_CONTEXT = _UPDATE_CONTEXT.where(
    or_(
        order_context.c.last_modified.is_(None),
        order_context.c.last_modified < bindparam("modified"),
    )
).values(last_modified=bindparam("modified"), updated_at=bindparam("now"))
_SENT_TODAY = {
    dialect: select(func.count())
    .select_from(messages)
    .where(
        messages.c.phone_index == bindparam("index"),
        messages.c.created_at > bindparam("since"),
        any_of(messages.c.status, "counted", dialect),
    )
    for dialect in DIALECTS
}
_CONTEXT_OF = select(order_context.c.context_enc, order_context.c.last_modified.label("at")).where(
    order_context.c.source == bindparam("source"),
    order_context.c.order_ref == bindparam("ref"),
)


def _lookups(dialect: str, single: bool):
    """Everything ingest reads about a batch before writing, in one round trip: the numbers
    (`consent.number_parts`), the orders' stored context, and the sources' state. `single`:
    for a batch with at most one of each, as a webhook's usually is (`storage.any_of`).

    Rows are (part, key, a, b, at, seq, context_enc). An order: key = source, a = reference,
    at = its last modification. A source: at = when it was disabled (None: it is not). The
    orders are asked by source and by reference separately (no row-value IN, which SQLite and
    arrays lack): rows of other pairs that match both are dropped by the caller."""
    no_context = null().cast(order_context.c.context_enc.type).label("context_enc")
    return union_all(
        *(part.add_columns(no_context) for part in consent.number_parts(dialect, single=single)),
        select(
            literal_column("'order'"),
            order_context.c.source,
            order_context.c.order_ref,
            null(),
            order_context.c.last_modified,
            literal_column("0"),
            order_context.c.context_enc,
        ).where(
            any_of(order_context.c.source, "order_sources", dialect, single=single),
            any_of(order_context.c.order_ref, "order_refs", dialect, single=single),
        ),
        select(
            literal_column("'source'"),
            sources.c.source,
            null(),
            null(),
            sources.c.disabled_at,
            literal_column("0"),
            null(),
        ).where(any_of(sources.c.source, "names", dialect, single=single)),
    )


_LOOKUPS = {(d, single): _lookups(d, single) for d in DIALECTS for single in (False, True)}


#: The kind whose order is assumed new: its context is then not read, and the insert of it
#: (one that fails where a row exists, core/rehearsal.py) checks that assumption.
NEW_ORDER = "order.created"

#: How many numbers a process keeps as familiar (`_Familiar`): about 100 bytes each.
FAMILIAR_NUMBERS = 10_000


def _as_assumed(single: bool):
    """A statement that fails unless what `_Lookups` assumes holds: every number in `indexes`
    has its recipients row, valid (`known`: how many), and has neither a consent entry nor a
    category switched off; no source in `names` is disabled. (That the orders have no row
    yet, the inserts of theirs check.) It fails by casting `REFUSED` to an integer, which
    puts what happened in the server's log."""
    pg = "postgresql"
    holds = and_(
        select(func.count())
        .select_from(recipients)
        .where(
            any_of(recipients.c.phone_index, "indexes", pg, single=single),
            recipients.c.invalid_reason.is_(None),
        )
        .scalar_subquery()
        == bindparam("known"),
        ~exists().where(any_of(consent_ledger.c.phone_index, "indexes", pg, single=single)),
        ~exists().where(
            any_of(preferences.c.phone_index, "indexes", pg, single=single),
            preferences.c.enabled.is_(False),
        ),
        ~exists().where(
            any_of(sources.c.source, "names", pg, single=single), sources.c.disabled_at.is_not(None)
        ),
    )
    # The CASE is not a constant, so the server casts only the branch taken, when it runs.
    refused = literal_column(f"'{REFUSED}'")
    return select(cast(case((holds, literal_column("'1'")), else_=refused), Integer))


#: The error `_AS_ASSUMED` fails with: `invalid input syntax for type integer: "…"`.
REFUSED = "txsms: assumed look-ups no longer hold"
_AS_ASSUMED = {single: _as_assumed(single) for single in (False, True)}


class _Familiar:
    """The numbers this process last read, or stored, as most numbers read: with their
    recipients row, valid, with no consent entry and no category switched off.

    On PostgreSQL, inside the write transaction, the look-ups are a round trip of their own
    (with BEGIN). A batch of new orders (`NEW_ORDER`) for familiar numbers is worked out
    without them: its numbers as familiar, its sources as enabled, its orders as unseen; the
    writes' round trip first checks what the inserts do not (`_AS_ASSUMED`). A delivery is
    then one round trip. Where the database no longer says so, the batch is read and worked
    out again, and what that reading finds is kept. A number this process has not met is
    read: assumed new instead, a returning customer's order on another receiver cost a failed
    round trip, and under gunicorn that lost more than new customers' orders gained. At most
    `limit` numbers, the oldest forgotten first."""

    def __init__(self, limit: int = FAMILIAR_NUMBERS):
        self.limit = limit
        self._numbers: dict[str, None] = {}
        self._lock = threading.Lock()

    def __contains__(self, index: str) -> bool:
        return index in self._numbers

    def learn(self, indexes: list[str], rows: list[Row]) -> set[str]:
        """Keep the numbers that the look-ups of `indexes` (`rows`) found familiar, forget the
        others. Returns those with no consent entry and no category off: a number without
        its row yet becomes familiar once a commit stores it (`met`)."""
        unusual = {row.key for row in rows if row.part in ("ledger", "off")}
        clean = {index for index in indexes if index not in unusual}
        valid = {row.key for row in rows if row.part == "recipient" and row.a is None}
        self.met([index for index in clean if index in valid])
        with self._lock:
            for index in set(indexes) - (clean & valid):
                self._numbers.pop(index, None)
        return clean

    def met(self, indexes: list[str]) -> None:
        """These numbers are familiar: read so, or stored so by a commit (new ones)."""
        with self._lock:
            for index in indexes:
                self._numbers[index] = None
                if len(self._numbers) > self.limit:
                    del self._numbers[next(iter(self._numbers))]


def _familiar(runtime: Runtime) -> _Familiar:
    familiar = runtime.__dict__.get("_ingest_familiar")
    if familiar is None:  # (setdefault would build one, lock and all, for every delivery)
        familiar = runtime.__dict__.setdefault("_ingest_familiar", _Familiar())
    return familiar


#: A familiar number as ingest takes it. (Ingest decides nothing on the footer.)
_FAMILIAR_NUMBER = consent.Number(True, None, None, consent.fold([]), frozenset())


class _Lookups:
    """What ingest reads about a batch's numbers and sources, fetched once per batch: a
    batch of 100 events costs a few queries instead of a few hundred."""

    def __init__(
        self,
        runtime: Runtime,
        conn: Connection | Rehearsal,
        batch: list[Event],
        phones: dict[tuple, tuple[Phone | None, str | None]] | None = None,
        *,
        assume: bool = False,
    ):
        """`assume`: on PostgreSQL, inside the write transaction, a batch of new orders for
        familiar numbers is not read but assumed (`_Familiar`), and the assumption checked
        with the writes."""
        self.runtime, self.conn = runtime, conn
        self._phones = dict(phones or {})
        self._clean: set[str] = set()  # numbers with no consent entry, no category off
        self._stored: list[str] = []  # of those, the ones this batch gives their row
        indexes = list({runtime.vault.index(p.e164) for e in batch if (p := self.phone(e)[0])})
        orders = list({(e.source, e.order.ref) for e in batch if e.order is not None})
        names = list({e.source for e in batch if e.kind in MESSAGE_KINDS})
        self.contexts: dict[tuple[str, str], Row | None] = dict.fromkeys(orders)
        self.sources: dict[str, bool] = dict.fromkeys(names, False)
        params = {
            "indexes": indexes,
            "order_sources": list({source for source, _ in orders}),
            "order_refs": list({ref for _, ref in orders}),
            "names": names,
        }
        asked = indexes or orders or names
        single = all(len(values) <= 1 for values in params.values())
        if single:
            params = {name: values[0] if values else None for name, values in params.items()}
        # Inside PostgreSQL's write transaction, where the look-ups are a round trip of their own.
        inside = isinstance(conn, Rehearsal) and conn.in_transaction
        familiar = _familiar(runtime) if inside and conn.dialect.name == "postgresql" else None
        if familiar is not None:
            # Once this commits, the numbers it stores are familiar (but see `forget`).
            conn.after_commit(partial(familiar.met, self._stored))
        if (
            assume
            and asked
            and familiar is not None
            and all(index in familiar for index in indexes)
            and all(e.kind == NEW_ORDER for e in batch if e.order is not None)
        ):
            self.numbers = dict.fromkeys(indexes, _FAMILIAR_NUMBER)
            check = {"indexes": params["indexes"], "names": params["names"], "known": len(indexes)}
            conn.assume(_AS_ASSUMED[single], check)
            return
        lookups = _LOOKUPS[conn.dialect.name, single]
        rows = conn.execute(lookups, params).all() if asked else []
        if familiar is not None:
            self._clean = familiar.learn(indexes, rows)
        self.numbers = consent.numbers_from(indexes, rows)
        for row in rows:
            if row.part == "source":
                self.sources[row.key] = row.at is not None
            elif row.part == "order" and (row.key, row.a) in self.contexts:  # not a cross pair
                self.contexts[(row.key, row.a)] = row

    def phone(self, event: Event) -> tuple[Phone | None, str | None]:
        key = (event.recipient.phone, event.recipient.country)
        if key not in self._phones:
            self._phones[key] = _parse_phone(self.runtime, event)
        return self._phones[key]

    def context(self, source: str, ref: str) -> Row | None:
        """The stored context of an order (None: never seen)."""
        if (source, ref) not in self.contexts:
            self.contexts[(source, ref)] = self.conn.execute(
                _CONTEXT_OF, {"source": source, "ref": ref}
            ).first()
        return self.contexts[(source, ref)]

    def number(self, index: str) -> consent.Number:
        if index not in self.numbers:
            self.numbers.update(consent.numbers(self.conn, [index]))
        return self.numbers[index]

    def remembered(self, index: str) -> None:
        """The number now has its recipients row."""
        self.numbers[index] = replace(self.number(index), known=True)
        if index in self._clean:
            self._stored.append(index)

    def source_disabled(self, source: str) -> bool:
        if source not in self.sources:
            self.sources[source] = source_disabled(self.conn, source)
        return self.sources[source]

    def forget(self, index: str | None) -> None:
        """The batch changed what is stored about this number: read it again when asked."""
        self.numbers.pop(index, None)
        if index in self._stored:
            self._stored.remove(index)


def _ingest_one(
    runtime: Runtime, conn: Connection, event: Event, now: float, lookups: _Lookups
) -> IngestResult:
    context = None
    if event.order is not None:
        context = _order_context(runtime, event, lookups.context(event.source, event.order.ref))
        if context is not None and context.stale:
            return IngestResult(event.key, "stale", "")
        event = context.event if context is not None else event
    event_id = new_id()
    phone, phone_error = lookups.phone(event)
    index = runtime.vault.index(phone.e164) if phone else None
    # A privacy request is about erasing or exporting data: it keeps none of its own. An
    # order's event keeps the document its stored context keeps: encrypted once, for both.
    payload_enc = None
    if not event.kind.startswith("privacy."):
        payload_enc = runtime.vault.encrypt_json(
            _context_document(event) if context is not None else _document(event)
        )
    inserted = insert_ignore(
        conn,
        events,
        {
            "id": event_id,
            "source": event.source,
            "key": event.key,
            "kind": event.kind,
            "phone_index": index,
            "order_ref": event.order.ref if event.order else None,
            "payload_enc": payload_enc,
            "occurred_at": event.occurred_at,
            "received_at": now,
        },
        ["source", "key"],
    )
    if not inserted:
        existing = conn.execute(_EVENT_ID, {"source": event.source, "key": event.key}).scalar_one()
        if context is not None and context.known and event.order.modified_at is not None:
            # A redelivery can still carry news of the order's age: later, older deliveries
            # must be recognised as stale.
            conn.execute(
                _ADVANCE_CONTEXT,
                {
                    "w_source": event.source,
                    "w_ref": event.order.ref,
                    "modified": event.order.modified_at,
                    "now": now,
                },
            )
            lookups.contexts.pop((event.source, event.order.ref), None)
        return IngestResult(event.key, "duplicate", existing)
    result = IngestResult(event.key, "accepted", event_id)
    if context is not None:
        _save_order_context(runtime, conn, event, index, context, now, payload_enc)
        lookups.contexts.pop((event.source, event.order.ref), None)  # read again if needed

    if phone is not None and not lookups.number(index).known:
        _remember_recipient(runtime, conn, phone, index, now)
        lookups.remembered(index)
    if event.consent is not None and index is not None:
        consent.record(
            conn,
            runtime.vault,
            index,
            scope=event.consent.scope,
            action=event.consent.action,
            source=event.source,
            evidence=event.consent.evidence,
            at=event.occurred_at,
        )
        lookups.forget(index)
    if event.kind == "privacy.redact":
        lookups.forget(index)
        lookups.contexts.clear()  # erasure may remove orders' context
        counts = privacy.erase(
            conn,
            index,
            source=event.source,
            whole_source=event.data.get("scope") == "source",
            order_refs=[str(ref) for ref in event.data.get("order_refs", [])],
        )
        note(conn, log, logging.INFO, "erased for %s: %s", event.source, counts)
    elif event.kind == "privacy.data_request":
        refs = [str(ref) for ref in event.data.get("order_refs", [])]
        if index is None and not refs:
            note(
                conn,
                log,
                logging.WARNING,
                "data request from %s names no number or order we can look up",
                event.source,
            )
        else:
            path = privacy.export(
                conn,
                runtime.vault,
                index,
                runtime.config.storage.data_dir,
                source=event.source,
                order_refs=refs,
            )
            note(
                conn,
                log,
                logging.INFO,
                "data request from %s: export written to %s",
                event.source,
                path,
            )
    elif event.kind == "messages.cancel" and event.order is not None:
        n = cancel_pending(
            conn,
            event.source,
            event.order.ref,
            event.data.get("kinds"),
            event.data.get("reason") or "cancelled",
        )
        note(
            conn,
            log,
            logging.INFO,
            "cancelled %d pending message(s) of %s %s",
            n,
            event.source,
            event.order.ref,
        )
    elif event.kind == "source.disabled":
        set_source_disabled(conn, event.source, event.data.get("reason") or "disabled")
        lookups.sources[event.source] = True
    elif event.kind in MESSAGE_KINDS:
        skip = "source_disabled" if lookups.source_disabled(event.source) else event.skip
        if skip is None and phone_error == "no_phone" and context is not None:
            skip = None if context.known else "unknown_order"  # nothing to address it from
        result.messages.append(
            _decide(runtime, conn, lookups, event, event_id, phone, phone_error, index, now, skip)
        )
    return result


@dataclass
class _Context:
    event: Event  # the event with what the stored context adds (recipient, order data)
    known: bool  # the order was seen before
    stale: bool  # the platform says this delivery is older than what was seen
    last_modified: float | None


def _order_context(runtime: Runtime, event: Event, row: Row | None) -> _Context:
    """Fill what a later delivery lacks from what earlier deliveries of the order said
    (`row`: the order's stored context)."""
    order = event.order
    if row is None:
        return _Context(event, False, False, order.modified_at)
    last = row.at
    if order.modified_at is not None and last is not None and order.modified_at < last:
        return _Context(event, True, True, last)
    stored = runtime.vault.decrypt_json(row.context_enc) or {}
    recipient = event.recipient
    if not recipient.phone and stored.get("recipient"):
        known = {
            k: v for k, v in stored["recipient"].items() if k in Recipient.__dataclass_fields__
        }
        recipient = replace(
            Recipient(**known),
            **{k: v for k, v in recipient.__dict__.items() if v is not None and k != "phone"},
        )
    data = _deep_merge(stored.get("data") or {}, event.data)
    modified = max(filter(None, (order.modified_at, row.at)), default=None)
    # A skip decided for the whole order (a test order) holds for its later events too.
    skip = event.skip or stored.get("skip")
    return _Context(
        replace(event, recipient=recipient, data=data, skip=skip), True, False, modified
    )


def _document(event: Event) -> dict[str, Any]:
    """What an event keeps of its own (`events.payload_enc`)."""
    return {"recipient": event.recipient.__dict__, "data": event.data}


def _context_document(event: Event) -> dict[str, Any]:
    """What later deliveries of the order need of it (`order_context.context_enc`)."""
    skip = event.skip if event.skip in ORDER_WIDE_SKIPS else None
    return {**_document(event), "skip": skip}


def _save_order_context(
    runtime, conn, event: Event, index, context: _Context, now, encrypted: bytes | None = None
) -> None:
    """`encrypted`: the event's `_context_document`, already encrypted for its own row."""
    values = {
        "phone_index": index,
        "context_enc": encrypted or runtime.vault.encrypt_json(_context_document(event)),
        "last_status": event.order.status,
        "last_modified": context.last_modified,
        "updated_at": now,
    }
    if context.known:
        if event.order.status is None:
            del values["last_status"]
        conn.execute(
            _UPDATE_CONTEXT, {"w_source": event.source, "w_ref": event.order.ref, **values}
        )
    else:
        insert_ignore(
            conn,
            order_context,
            {"source": event.source, "order_ref": event.order.ref, **values},
            ["source", "order_ref"],
        )


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif value not in (None, "") or key not in merged:
            merged[key] = value
    return merged


def cancel_pending(
    conn: Connection, source: str, order_ref: str, kinds: list[str] | None, reason: str
) -> int:
    """Cancel what is still waiting to be sent for one order or appointment."""
    query = messages.update().where(
        messages.c.source == source,
        messages.c.order_ref == order_ref,
        messages.c.status.in_(("pending", "deferred")),
    )
    if kinds:
        query = query.where(messages.c.kind.in_(kinds))
    now = time.time()
    return conn.execute(
        query.values(status="cancelled", reason=reason, finished_at=now, updated_at=now)
    ).rowcount


def source_disabled(conn: Connection, source: str) -> bool:
    return (
        conn.execute(select(sources.c.disabled_at).where(sources.c.source == source)).scalar()
        is not None
    )


def set_source_disabled(conn: Connection, source: str, reason: str | None) -> None:
    """Disable (reason given) or re-enable (None) a source, e.g. a shop that uninstalled."""
    now = time.time()
    values = {"disabled_at": now if reason else None, "reason": reason, "updated_at": now}
    if not conn.execute(
        sources.update()
        .where(sources.c.source == source)
        .values(**values)
        .returning(sources.c.source)
    ).first():
        conn.execute(sources.insert().values(source=source, **values))


def _parse_phone(runtime: Runtime, event: Event) -> tuple[Phone | None, str | None]:
    try:
        phone = normalize(
            event.recipient.phone, runtime.config.sender.default_region, event.recipient.country
        )
    except PhoneError as exc:
        return None, exc.reason
    return phone, None


def _remember_recipient(runtime, conn, phone: Phone, index: str, now: float) -> None:
    insert_ignore(
        conn,
        recipients,
        {
            "phone_index": index,
            "phone_enc": runtime.vault.encrypt(phone.e164),
            "region": phone.region,
            "zones": " ".join(phone.zones),
            "created_at": now,
            "updated_at": now,
        },
        ["phone_index"],
    )


def _decide(
    runtime, conn, lookups, event, event_id, phone, phone_error, index, now, skip
) -> Decision:
    config = runtime.config
    template = runtime.templates.resolve(event.kind, event.recipient.locale)
    row: dict[str, Any] = {
        "id": new_id(),
        "event_id": event_id,
        "source": event.source,
        "kind": event.kind,
        "idempotency_key": f"{event.source}|{event.key}|{event.kind}",
        "order_ref": event.order.ref if event.order else None,
        "phone_index": index,
        "to_enc": runtime.vault.encrypt(phone.e164) if phone else None,
        "locale": template.locale,
        "category": template.category,
        "urgent": template.urgent,
        "attempts": 0,
        "send_at": now,
        "expires_at": event.expires_at,
        "created_at": now,
        "updated_at": now,
    }

    def decide(status: str, reason: str | None = None, **extra) -> Decision:
        row.update(status=status, reason=reason, **extra)
        if status in ("skipped", "failed"):
            row["finished_at"] = now
        if not insert_ignore(conn, messages, row, ["idempotency_key"]):
            existing = conn.execute(_DECISION_OF, {"key": row["idempotency_key"]}).one()
            return Decision(*existing)
        if status == "skipped":
            note(
                conn, log, logging.INFO, "message %s %s skipped: %s", row["id"], event.kind, reason
            )
        return Decision(row["id"], status, reason)

    if skip is not None:
        return decide("skipped", skip)
    if phone is None:
        return decide("skipped", phone_error)
    number = lookups.number(index)
    if number.invalid_reason:
        return decide("skipped", "invalid_phone")
    if number.consent.opted_out:
        return decide("skipped", "opted_out")
    if template.category == "marketing" and number.consent.marketing != "opted_in":
        return decide("skipped", "not_opted_in")
    if template.category in number.off:
        return decide("skipped", "category_off")
    if config.policy.max_per_day and not template.urgent:
        sent_today = conn.execute(
            _SENT_TODAY[conn.dialect.name],
            {"index": index, "since": now - 86400, "counted": COUNTED},
        ).scalar_one()
        if sent_today >= config.policy.max_per_day:
            return decide("skipped", "frequency_cap")

    zone = event.recipient.timezone or (
        phone.zones[0] if phone.zones else runtime.config.sender.timezone
    )
    context = build_context(
        event.data,
        shop_name=config.sender.name,
        recipient_name=event.recipient.name,
        timezone=zone,
        locale=template.locale or event.recipient.locale,
    )
    try:
        rendered = runtime.templates.render(event.kind, event.recipient.locale, context)
    except TemplateError as exc:
        note(conn, log, logging.ERROR, "message %s: %s", row["id"], exc)
        return decide("failed", "render_error", error_text=str(exc)[:500])
    if not rendered.body:
        return decide("skipped", "no_template")
    row.update(
        body_enc=runtime.vault.encrypt(rendered.body),
        encoding=rendered.encoding,
        segments=rendered.segments,
    )

    send_at = max(now, event.send_at or now)
    zones = list(phone.zones) or [event.recipient.timezone or runtime.config.sender.timezone]
    later = None if template.urgent else quiet_until(send_at, zones, config.policy.quiet_hours)
    if event.expires_at is not None and (later or send_at) > event.expires_at:
        return decide("skipped", "expired")
    if later is not None:
        return decide("deferred", "quiet_hours", send_at=later)
    if send_at > now:
        return decide("deferred", "scheduled", send_at=send_at)
    note(conn, log, logging.DEBUG, "message %s queued for %s", row["id"], redact_phone(phone.e164))
    return decide("pending")
