"""Ingest: canonical Events in, decisions and queued messages out, in one transaction.

Every event ends in exactly one recorded decision per template: a queued message (pending or
deferred) or a skip with its reason. Nothing here talks to the network, so a webhook can wait
for `ingest` to commit before it answers, and answer fast.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from txsms.core import consent, privacy
from txsms.core.errors import TemplateError
from txsms.core.events import MESSAGE_KINDS, Event
from txsms.core.metrics import DECISIONS, EVENTS, platform_of
from txsms.core.phones import Phone, PhoneError, normalize
from txsms.core.policy import quiet_until
from txsms.core.redact import redact_phone
from txsms.core.runtime import Runtime
from txsms.core.storage import events, insert_ignore, messages, recipients
from txsms.core.templates import build_context

log = logging.getLogger(__name__)

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
    status: str  # "accepted" | "duplicate"
    id: str
    messages: list[Decision] = field(default_factory=list)


def new_id() -> str:
    return uuid.uuid4().hex


def ingest(runtime: Runtime, batch: list[Event]) -> list[IngestResult]:
    """Record `batch` durably; returns after the commit, one result per event."""
    now = time.time()
    with runtime.engine.begin() as conn:
        results = [_ingest_one(runtime, conn, event, now) for event in batch]
    for event, result in zip(batch, results, strict=True):
        EVENTS.labels(platform_of(event.source), event.kind, result.status).inc()
        for d in result.messages:
            DECISIONS.labels(d.status, d.reason or "").inc()
    if any(d.status in ("pending", "deferred") for r in results for d in r.messages):
        runtime.wakeup.notify()
    return results


def _ingest_one(runtime: Runtime, conn: Connection, event: Event, now: float) -> IngestResult:
    event_id = new_id()
    phone, phone_error = _parse_phone(runtime, event)
    index = runtime.vault.index(phone.e164) if phone else None
    payload = {"recipient": event.recipient.__dict__, "data": event.data}
    inserted = insert_ignore(
        conn,
        events,
        {
            "id": event_id,
            "source": event.source,
            "key": event.key,
            "kind": event.kind,
            "phone_index": index,
            "payload_enc": runtime.vault.encrypt_json(payload),
            "occurred_at": event.occurred_at,
            "received_at": now,
        },
        ["source", "key"],
    )
    if not inserted:
        existing = conn.execute(
            select(events.c.id).where(events.c.source == event.source, events.c.key == event.key)
        ).scalar_one()
        return IngestResult(event.key, "duplicate", existing)
    result = IngestResult(event.key, "accepted", event_id)

    if phone is not None:
        _remember_recipient(runtime, conn, phone, index, now)
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
    if event.kind == "privacy.redact":
        privacy.erase(conn, index, source=event.source, whole_source=index is None)
    elif event.kind == "privacy.data_request" and index is not None:
        privacy.export(
            conn, runtime.vault, index, runtime.config.storage.data_dir, source=event.source
        )
    elif event.kind in MESSAGE_KINDS:
        result.messages.append(
            _decide(runtime, conn, event, event_id, phone, phone_error, index, now)
        )
    return result


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


def _decide(runtime, conn, event, event_id, phone, phone_error, index, now) -> Decision:
    config = runtime.config
    template = runtime.templates.resolve(event.kind, event.recipient.locale)
    row: dict[str, Any] = {
        "id": new_id(),
        "event_id": event_id,
        "source": event.source,
        "kind": event.kind,
        "idempotency_key": f"{event.source}|{event.key}|{event.kind}",
        "phone_index": index,
        "to_enc": runtime.vault.encrypt(phone.e164) if phone else None,
        "locale": template.locale,
        "category": template.category,
        "urgent": template.urgent,
        "attempts": 0,
        "send_at": now,
        "created_at": now,
        "updated_at": now,
    }

    def decide(status: str, reason: str | None = None, **extra) -> Decision:
        row.update(status=status, reason=reason, **extra)
        if status in ("skipped", "failed"):
            row["finished_at"] = now
        if not insert_ignore(conn, messages, row, ["idempotency_key"]):
            existing = conn.execute(
                select(messages.c.id, messages.c.status, messages.c.reason).where(
                    messages.c.idempotency_key == row["idempotency_key"]
                )
            ).one()
            return Decision(*existing)
        if status == "skipped":
            log.info("message %s %s skipped: %s", row["id"], event.kind, reason)
        return Decision(row["id"], status, reason)

    if phone is None:
        return decide("skipped", phone_error)
    invalid = conn.execute(
        select(recipients.c.invalid_reason).where(recipients.c.phone_index == index)
    ).scalar()
    if invalid:
        return decide("skipped", "invalid_phone")
    state = consent.state(conn, index)
    if state.opted_out:
        return decide("skipped", "opted_out")
    if template.category == "marketing" and state.marketing != "opted_in":
        return decide("skipped", "not_opted_in")
    if template.category in consent.disabled_categories(conn, index):
        return decide("skipped", "category_off")
    if config.policy.max_per_day and not template.urgent:
        sent_today = conn.execute(
            select(func.count())
            .select_from(messages)
            .where(
                messages.c.phone_index == index,
                messages.c.created_at > now - 86400,
                messages.c.status.in_(COUNTED),
            )
        ).scalar_one()
        if sent_today >= config.policy.max_per_day:
            return decide("skipped", "frequency_cap")

    zone = event.recipient.timezone or (phone.zones[0] if phone.zones else runtime.default_zone)
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
        log.error("message %s: %s", row["id"], exc)
        return decide("failed", "render_error", error_text=str(exc)[:500])
    if not rendered.body:
        return decide("skipped", "no_template")
    row.update(
        body_enc=runtime.vault.encrypt(rendered.body),
        encoding=rendered.encoding,
        segments=rendered.segments,
    )

    send_at = max(now, event.send_at or now)
    zones = list(phone.zones) or [event.recipient.timezone or runtime.default_zone]
    later = None if template.urgent else quiet_until(send_at, zones, config.policy.quiet_hours)
    if later is not None:
        return decide("deferred", "quiet_hours", send_at=later)
    if send_at > now:
        return decide("deferred", "scheduled", send_at=send_at)
    log.debug("message %s queued for %s", row["id"], redact_phone(phone.e164))
    return decide("pending")
