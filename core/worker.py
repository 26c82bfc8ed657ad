"""The worker: claims due messages, sends them once, records every outcome."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from txsms.core import consent, outbox
from txsms.core.metrics import MESSAGES, PROVIDER_ERRORS, SEND_SECONDS, SENDS
from txsms.core.notify import PgListener
from txsms.core.pipeline import source_disabled
from txsms.core.providers import (
    LookupUnavailable,
    Outcome,
    OutgoingMessage,
    Provider,
    ProviderResult,
    make_provider,
)
from txsms.core.ratelimit import RateLimiter
from txsms.core.redact import redact_phone
from txsms.core.returnpath import REPLY_KIND, apply_early_receipts
from txsms.core.runtime import Runtime
from txsms.core.segments import count_segments
from txsms.core.storage import messages, recipients

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 30.0


@dataclass(frozen=True)
class Prepared:
    message: OutgoingMessage
    index: str | None
    with_footer: bool
    body_enc: bytes  # what is stored as sent: the body with its footer, if it has one


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        provider: Provider | None = None,
        *,
        concurrency: int | None = None,
        batch: int = 5,
    ):
        self.runtime = runtime
        config = runtime.config
        self.provider = provider or make_provider(
            config.provider, public_url=config.server.public_url
        )
        self.concurrency = concurrency or config.worker.concurrency
        self.batch = batch
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # The lease must outlive the slowest provider request, or a second worker could
        # take over a message that is still on its way.
        # A lease that runs out mid-request is safe: the row is in flight, so no one resends
        # it (it becomes `unknown` until this worker records the real outcome).
        self.lease = config.worker.lease_seconds
        self.limiter = RateLimiter(
            runtime.relaxed,
            f"provider:{config.provider.kind}",
            config.provider.rate_per_second,
        )
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_maintenance = 0.0
        self._listener: PgListener | None = None

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        if self.runtime.engine.dialect.name == "postgresql":
            self._listener = PgListener(self.runtime.engine, self.runtime.wakeup.notify)
            self._listener.start()
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"txsms-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.runtime.wakeup.notify()
        if self._listener is not None:
            self._listener.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.provider.close()

    def _loop(self) -> None:
        poll = self.runtime.config.worker.poll_seconds
        while not self.stop_event.is_set():
            try:
                done = self.run_once()
            except Exception:  # a database hiccup must not kill the worker thread
                log.exception("worker iteration failed; retrying")
                done = 0
            if not done:
                self.runtime.wakeup.wait(poll)

    def run_once(self) -> int:
        """Claim one batch and send it; the number of messages handled."""
        self.maintain()
        with self.runtime.engine.begin() as conn:
            rows = outbox.claim(conn, self._claim_token(), lease=self.lease, limit=self.batch)
        for row in rows:
            if self.stop_event.is_set():
                break  # unsent claims go back when their lease ends
            self._handle(row)
        return len(rows)

    def _claim_token(self) -> str:
        # Unique per claim, so a worker can tell its own claim from a later one on the row.
        return f"{self.worker_id[:40]}:{uuid.uuid4().hex[:16]}"

    def maintain(self, *, force: bool = False) -> None:
        """Housekeeping: interrupted claims become unknown, unknowns are settled where the
        provider can be asked, expired bodies are purged. Runs every few seconds."""
        now = time.monotonic()
        if not force and now - self._last_maintenance < min(MAINTENANCE_SECONDS, self.lease):
            return
        self._last_maintenance = now
        with self.runtime.engine.begin() as conn:
            interrupted = outbox.sweep_interrupted(conn)
            outbox.purge_bodies(conn, self.runtime.config.security.retention_days)
        apply_early_receipts(self.runtime, self.provider)
        if self.provider.can_lookup:
            self._settle_unknown()
        if interrupted:
            log.warning(
                "%d message(s) were in flight when a worker stopped: now 'unknown' "
                "(see 'txsms messages --status unknown')",
                interrupted,
            )

    # -- one message -----------------------------------------------------------------------

    def _handle(self, row) -> None:
        prepared = self._prepare(row)
        if prepared is None:
            return
        # The rate-limit slot is taken last, right before "in flight" and the request, so
        # the spacing it promises is the spacing the provider sees; and a crash while
        # waiting for it leaves a message that is safe to send, not one whose fate is unknown.
        if not self.limiter.acquire(self.stop_event):
            return
        with self.runtime.engine.begin() as conn:
            owned = outbox.mark_in_flight(
                conn,
                row.id,
                row.claimed_by,
                provider=self.provider.name,
                body_enc=prepared.body_enc,
                encoding=prepared.message.encoding,
                segments=prepared.message.segments,
            )
        if not owned:  # our lease ran out and another worker took the message over
            log.warning("message %s: claim lost before sending; left to its new owner", row.id)
            return
        started = time.monotonic()
        result = self.provider.send(prepared.message)
        SEND_SECONDS.labels(self.provider.name).observe(time.monotonic() - started)
        SENDS.labels(self.provider.name, result.outcome.value).inc()
        if result.error_code:
            PROVIDER_ERRORS.labels(self.provider.name, result.error_code).inc()
        self._record(row, prepared, result)

    def _prepare(self, row) -> Prepared | None:
        """Re-check consent at send time, and add the footer to a number's first message."""
        vault, sender = self.runtime.vault, self.runtime.config.sender
        with self.runtime.engine.begin() as conn:
            recipient = None
            is_reply = row.kind == REPLY_KIND  # a keyword's confirmation: no consent check
            if row.phone_index and not is_reply:
                recipient = conn.execute(
                    select(recipients.c.invalid_reason, recipients.c.footer_sent_at).where(
                        recipients.c.phone_index == row.phone_index
                    )
                ).first()
                state = consent.state(conn, row.phone_index)
                reason = None
                if source_disabled(conn, row.source):
                    reason = "source_disabled"
                elif state.opted_out:
                    reason = "opted_out"
                elif row.category == "marketing" and state.marketing != "opted_in":
                    reason = "not_opted_in"
                elif recipient is not None and recipient.invalid_reason:
                    reason = "invalid_phone"
                if reason:
                    outbox.update(
                        conn,
                        row.id,
                        status="skipped",
                        reason=reason,
                        finished_at=time.time(),
                        lease_until=None,
                    )
                    return None
            to, body = vault.decrypt(row.to_enc), vault.decrypt(row.body_enc)
            if to is None or body is None:  # erased while queued
                outbox.update(
                    conn, row.id, status="skipped", reason="erased", finished_at=time.time()
                )
                return None
            with_footer = bool(
                not is_reply
                and sender.footer
                and (recipient is None or recipient.footer_sent_at is None)
                and sender.footer not in body
            )
            if with_footer:
                body = f"{body}\n{sender.footer}"
            info = count_segments(body)
        return Prepared(
            OutgoingMessage(row.id, to, body, info.segments, info.encoding),
            row.phone_index,
            with_footer,
            vault.encrypt(body) if with_footer else row.body_enc,
        )

    def _record(self, row, prepared: Prepared, result: ProviderResult) -> None:
        now = time.time()
        common = {
            "in_flight": False,
            "lease_until": None,
            "provider_message_id": result.provider_message_id,
            "provider_status": result.provider_status,
            "error_code": result.error_code,
            "error_text": (result.error_text or None) and result.error_text[:500],
        }
        if result.segments:
            common["segments"] = result.segments
        outcome = result.outcome
        to = redact_phone(prepared.message.to)
        with self.runtime.relaxed() as conn:  # a lost result is settled as `unknown`
            if outcome is Outcome.SENT:
                self._finish(
                    conn, row.id, status="sent", reason=None, sent_at=now, finished_at=now, **common
                )
                if prepared.with_footer and prepared.index:
                    conn.execute(
                        recipients.update()
                        .where(recipients.c.phone_index == prepared.index)
                        .values(footer_sent_at=now, updated_at=now)
                    )
                log.info("message %s sent to %s (%s)", row.id, to, result.provider_message_id)
            elif (
                outcome is Outcome.RETRY and row.attempts < self.runtime.config.worker.max_attempts
            ):
                delay = self._backoff(row.attempts, result.retry_after)
                self._finish(
                    conn, row.id, status="pending", reason="retry", send_at=now + delay, **common
                )
                log.warning(
                    "message %s to %s: provider said %s, retry in %.1fs",
                    row.id,
                    to,
                    result.error_code or result.error_text,
                    delay,
                )
            elif outcome is Outcome.UNKNOWN:
                self._finish(conn, row.id, status="unknown", reason="in_flight_error", **common)
                log.error(
                    "message %s to %s: outcome unknown (%s); not resent blindly",
                    row.id,
                    to,
                    result.error_text,
                )
            else:
                reason = {
                    Outcome.OPTED_OUT: "opted_out",
                    Outcome.INVALID_NUMBER: "invalid_phone",
                    Outcome.RETRY: "retries_exhausted",
                }.get(outcome, "provider_error")
                self._finish(
                    conn, row.id, status="failed", reason=reason, finished_at=now, **common
                )
                if outcome is Outcome.OPTED_OUT and prepared.index:
                    consent.record(
                        conn,
                        self.runtime.vault,
                        prepared.index,
                        scope="all",
                        action="opt_out",
                        source=f"provider:{self.provider.name}",
                        evidence={"error_code": result.error_code, "message_id": row.id},
                    )
                if outcome is Outcome.INVALID_NUMBER and prepared.index:
                    conn.execute(
                        recipients.update()
                        .where(recipients.c.phone_index == prepared.index)
                        .values(invalid_reason=f"provider:{result.error_code}", updated_at=now)
                    )
                log.error(
                    "message %s to %s failed: %s %s",
                    row.id,
                    to,
                    result.error_code,
                    result.error_text,
                )

    @staticmethod
    def _finish(conn, message_id: str, *, status: str, reason: str | None, **values) -> None:
        outbox.update(conn, message_id, status=status, reason=reason, **values)
        MESSAGES.labels(status, reason or "").inc()

    def _settle_unknown(self, limit: int = 20) -> None:
        """Ask the provider about `unknown` messages after a grace period: found → take its
        id and status; not found → send once more. Providers that cannot be asked leave
        them for an operator (`txsms messages --status unknown`, `txsms resend ID`)."""
        grace = self.runtime.config.worker.unknown_grace_seconds
        vault = self.runtime.vault
        with self.runtime.engine.connect() as conn:
            rows = conn.execute(
                select(messages)
                .where(messages.c.status == "unknown", messages.c.updated_at < time.time() - grace)
                .limit(limit)
            ).all()
        for row in rows:
            try:
                found = self.provider.lookup(
                    vault.decrypt(row.to_enc), vault.decrypt(row.body_enc), since=row.created_at
                )
            except LookupUnavailable as exc:
                log.warning("message %s stays unknown for now: %s", row.id, exc)
                return
            now = time.time()
            if found is None:
                values = {"status": "pending", "reason": "resend_after_lookup", "send_at": now}
            else:
                status = "sent" if found.outcome is Outcome.SENT else "failed"
                values = {
                    "status": status,
                    "reason": "settled_by_lookup",
                    "provider_message_id": found.provider_message_id,
                    "provider_status": found.provider_status,
                    "error_code": found.error_code,
                    "sent_at": now,
                    "finished_at": now,
                }
            with self.runtime.engine.begin() as conn:
                settled = conn.execute(
                    messages.update()
                    .where(messages.c.id == row.id, messages.c.status == "unknown")
                    .values(updated_at=now, in_flight=False, **values)
                    .returning(messages.c.id)
                ).first()
            if settled:
                log.warning("unknown message %s settled: %s", row.id, values["reason"])
                if found is None:
                    self.runtime.wakeup.notify()

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        cfg = self.runtime.config.worker
        ceiling = min(cfg.backoff_max_seconds, cfg.backoff_base_seconds * 2 ** (attempts - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter"
        return max(delay, retry_after or 0.0)
