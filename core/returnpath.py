"""The return path: inbound keywords (STOP, START, HELP) and delivery receipts.

Keywords are matched on the whole message after trimming spaces and punctuation, case-
insensitively, as carriers and Twilio do ("Stop please" is not a STOP). Every keyword is
recorded in the consent ledger with its evidence; any other text is stored encrypted and
changes nothing.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from sqlalchemy import Connection, select

from txsms.core import consent, outbox
from txsms.core.metrics import INBOUND, RECEIPTS
from txsms.core.phones import PhoneError, normalize
from txsms.core.providers import InboundMessage, Provider, StatusReport
from txsms.core.redact import redact_phone
from txsms.core.runtime import Runtime
from txsms.core.storage import insert_ignore, messages, provider_callbacks, recipients

log = logging.getLogger(__name__)

OPT_OUT = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
OPT_IN = {"START", "UNSTOP", "YES"}
HELP = {"HELP", "INFO"}

#: Delivery states only move forward: a late "sent" never overwrites "delivered".
RANK = {
    "pending": 0,
    "deferred": 0,
    "sending": 1,
    "unknown": 1,
    "queued": 1,
    "sent": 2,
    "undelivered": 3,
    "failed": 3,
    "delivered": 4,
}
REPLY_KIND = "keyword.reply"


def keyword(text: str) -> str | None:
    """ "opt_out", "opt_in", "help" or None for a whole-message keyword."""
    word = re.sub(r"[\W_]+", " ", text.upper()).strip()
    compact = word.replace(" ", "")
    if compact in OPT_OUT and (word == compact or word == "OPT OUT"):
        return "opt_out"
    if word in OPT_IN:
        return "opt_in"
    if word in HELP:
        return "help"
    return None


@dataclass(frozen=True)
class InboundResult:
    keyword: str | None
    reply: str | None  # text to send back; None: nothing (or the provider already did)


def handle_inbound(runtime: Runtime, provider: Provider, msg: InboundMessage) -> InboundResult:
    sender = runtime.config.sender
    kind = keyword(msg.text)
    INBOUND.labels(provider.name, kind or "other").inc()
    try:
        e164 = normalize(msg.sender, sender.default_region).e164
    except PhoneError:
        log.warning("inbound %s from an unparseable sender ignored", msg.provider_message_id)
        return InboundResult(kind, None)
    index = runtime.vault.index(e164)
    evidence = {
        "provider": provider.name,
        "message_id": msg.provider_message_id,
        "text": msg.text,
        "to": msg.recipient,
    }
    reply = {
        "opt_out": sender.stop_reply,
        "opt_in": sender.start_reply,
        "help": sender.help_reply,
    }.get(kind or "")
    handled = {"opt_out": "STOP", "opt_in": "START", "help": "HELP"}.get(kind or "")
    if msg.handled_keyword and msg.handled_keyword == handled:
        reply = None  # the provider's own confirmation is the one allowed confirmation
    with runtime.engine.begin() as conn:
        conn.execute(
            provider_callbacks.insert().values(
                provider=provider.name,
                kind="inbound",
                provider_message_id=msg.provider_message_id,
                status=kind or "text",
                payload_enc=runtime.vault.encrypt_json({"from": e164, **evidence}),
                received_at=time.time(),
                applied_at=time.time(),
            )
        )
        if kind in ("opt_out", "opt_in"):
            consent.record(
                conn,
                runtime.vault,
                index,
                scope="all",
                action=kind,
                source=f"inbound:{provider.name}",
                evidence=evidence,
            )
        if reply:
            reply = reply.format(name=sender.name)
            if provider.inbound_response(reply) is None:
                _queue_reply(runtime, conn, provider, e164, index, reply, msg)
    if kind:
        log.info("inbound %s from %s via %s", kind, redact_phone(e164), provider.name)
    if reply and provider.inbound_response(reply) is None:
        runtime.wakeup.notify()
        return InboundResult(kind, None)  # queued: nothing to put in the response
    return InboundResult(kind, reply)


def _queue_reply(runtime, conn, provider, e164, index, text, msg: InboundMessage) -> None:
    """A keyword reply goes through the outbox like any message, but skips the consent check:
    the confirmation of a STOP is the one message an opted-out number still gets."""
    from txsms.core.pipeline import new_id
    from txsms.core.segments import count_segments

    now = time.time()
    info = count_segments(text)
    insert_ignore(
        conn,
        messages,
        {
            "id": new_id(),
            "source": f"inbound:{provider.name}",
            "kind": REPLY_KIND,
            "idempotency_key": f"reply|{provider.name}|{msg.provider_message_id or new_id()}",
            "phone_index": index,
            "to_enc": runtime.vault.encrypt(e164),
            "body_enc": runtime.vault.encrypt(text),
            "category": "account",
            "urgent": True,
            "status": "pending",
            "encoding": info.encoding,
            "segments": info.segments,
            "attempts": 0,
            "send_at": now,
            "created_at": now,
            "updated_at": now,
        },
        ["idempotency_key"],
    )


def apply_reports(runtime: Runtime, provider: Provider, reports: list[StatusReport]) -> int:
    """Record receipts; apply those whose message is known. Returns how many were applied."""
    applied = 0
    with runtime.engine.begin() as conn:
        for report in reports:
            RECEIPTS.labels(provider.name, report.status).inc()
            row_id = conn.execute(
                provider_callbacks.insert()
                .values(
                    provider=provider.name,
                    kind="status",
                    provider_message_id=report.provider_message_id,
                    status=report.status,
                    payload_enc=runtime.vault.encrypt_json(report.__dict__),
                    received_at=time.time(),
                )
                .returning(provider_callbacks.c.id)
            ).scalar_one()
            if _apply(runtime, conn, provider, report):
                conn.execute(
                    provider_callbacks.update()
                    .where(provider_callbacks.c.id == row_id)
                    .values(applied_at=time.time())
                )
                applied += 1
    return applied


def apply_early_receipts(runtime: Runtime, provider: Provider, limit: int = 500) -> int:
    """Receipts that arrived before their send was recorded: apply them now that it is.

    Run by the worker's housekeeping, not on every send: an early receipt is rare, and a
    query per send to look for one would cost every message a round trip.
    """
    with runtime.engine.begin() as conn:
        rows = conn.execute(
            select(provider_callbacks)
            .join(
                messages,
                (messages.c.provider == provider_callbacks.c.provider)
                & (messages.c.provider_message_id == provider_callbacks.c.provider_message_id),
            )
            .where(
                provider_callbacks.c.provider == provider.name,
                provider_callbacks.c.kind == "status",
                provider_callbacks.c.applied_at.is_(None),
            )
            .order_by(provider_callbacks.c.id)
            .limit(limit)
        ).all()
        for row in rows:
            report = StatusReport(**runtime.vault.decrypt_json(row.payload_enc))
            if _apply(runtime, conn, provider, report):
                conn.execute(
                    provider_callbacks.update()
                    .where(provider_callbacks.c.id == row.id)
                    .values(applied_at=time.time())
                )
    return len(rows)


def _apply(runtime, conn: Connection, provider: Provider, report: StatusReport) -> bool:
    row = conn.execute(
        select(messages.c.id, messages.c.status, messages.c.phone_index).where(
            messages.c.provider == provider.name,
            messages.c.provider_message_id == report.provider_message_id,
        )
    ).first()
    if row is None:
        return False  # kept in provider_callbacks; applied when the send is recorded
    if report.error_code and report.error_code in provider.opted_out_codes and row.phone_index:
        consent.record(
            conn,
            runtime.vault,
            row.phone_index,
            scope="all",
            action="opt_out",
            source=f"provider:{provider.name}",
            evidence={"error_code": report.error_code, "message_id": row.id},
        )
    if report.error_code and report.error_code in provider.invalid_number_codes:
        conn.execute(
            recipients.update()
            .where(recipients.c.phone_index == row.phone_index)
            .values(invalid_reason=f"provider:{report.error_code}", updated_at=time.time())
        )
    if RANK.get(report.status, 0) <= RANK.get(row.status, 0):
        return True  # older news: recorded, changes nothing
    values = {"status": report.status, "provider_status": report.status}
    if report.error_code:
        values.update(error_code=report.error_code, error_text=report.error_text)
    if report.segments:
        values["segments"] = report.segments
    if report.status in ("undelivered", "failed"):
        values["reason"] = "provider_error"
    outbox.update(conn, row.id, **values)
    return True
