"""The worker: claims due messages, sends them once, records every outcome."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Row, bindparam, select

from txsms.core import consent, outbox, retention
from txsms.core.metrics import MESSAGES, PROVIDER_ERRORS, SEND_SECONDS, SENDS
from txsms.core.notify import WAITING_SECONDS, PgListener, Waiting
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
from txsms.core.storage import (
    after_commit,
    log_failure,
    messages,
    note,
    recipients,
    run_transaction,
    transaction,
)

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 30.0
WINDOW_SECONDS = 0.05
MAX_BATCH = 50
# At most half a full batch per commit, so a batch goes out in two: with 8, a worker
# thread's commits took about a fifth of a message's CPU, contended with the sending
# thread's requests for the interpreter, and one worker sent 5 to 8 % fewer messages.
MAX_WINDOW = MAX_BATCH // 2

_FOOTER_SENT = (
    recipients.update()
    .where(recipients.c.phone_index == bindparam("_index"))
    .values(footer_sent_at=bindparam("_now"), updated_at=bindparam("_now"))
)


@dataclass(frozen=True)
class Batch:
    claim: str
    rows: Sequence[Row]
    ready: list[tuple]  # (row, Prepared): what passed the checks made at claim time
    # A batch claimed ahead: its first window is marked in flight with the claim, and these
    # are the ids of it that are ours (None: nothing marked yet).
    marked: set[str] | None = None


class _Ahead(threading.local):
    """Per worker thread: what its last batch left to the next one. (Class attributes are the
    defaults each thread starts with; they are only ever replaced, never changed in place.)"""

    future: Future | None = None  # the next batch's claim, under way
    handed: list[tuple] = []  # results that claim records (if it fails: carried instead)
    carried: list[tuple] = []  # results the next commit is to record


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
        batch: int | None = None,
    ):
        self.runtime = runtime
        config = runtime.config
        self.provider = provider or make_provider(
            config.provider, public_url=config.server.public_url
        )
        self.concurrency = concurrency or config.worker.concurrency
        # A batch is checked for consent when it is claimed: keep it to about half a second
        # of sending at the configured rate, so an opt-out is never older than that.
        rate = config.provider.rate_per_second
        self.batch = batch or max(1, min(MAX_BATCH, int(rate / 2)))
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # The lease must outlive the slowest provider request, or a second worker could
        # take over a message that is still on its way.
        # A lease that runs out mid-request is safe: the row is in flight, so no one resends
        # it (it becomes `unknown` until this worker records the real outcome).
        self.lease = config.worker.lease_seconds
        # How many messages one durable commit marks in flight. After a crash up to two
        # windows per thread are `unknown`; where the provider can be asked, looking each one
        # up settles them, so a wider window costs nothing there. It only pays at high rates,
        # where a commit per message would hold up sending: about 50 ms of sending at the
        # configured rate (1 up to 20/s), so results are never recorded much later than sent.
        self.window = config.worker.in_flight_window or (
            max(1, min(MAX_WINDOW, int(rate * WINDOW_SECONDS))) if self.provider.can_lookup else 1
        )
        self.limiter = RateLimiter(
            runtime.autocommit,
            f"provider:{config.provider.kind}",
            config.provider.rate_per_second,
        )
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = _Ahead()
        self._last_maintenance = 0.0
        self._listener: PgListener | None = None
        self._waiting: Waiting | None = None

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        if self.runtime.engine.dialect.name == "postgresql":
            self._listener = PgListener(self.runtime.engine, self.runtime.wakeup.notify)
            self._listener.start()
            # The row outlives two polls: a thread renews it only when its wait ends.
            poll = self.runtime.config.worker.poll_seconds
            self._waiting = Waiting(
                self.runtime.autocommit, self.worker_id, max(WAITING_SECONDS, 3 * poll)
            )
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
        try:
            while not self.stop_event.is_set():
                try:
                    done = self.run_once(claim_ahead=True)
                except Exception:  # a database outage must not kill the worker thread
                    log_failure(log, "worker iteration failed; retrying")
                    done = 0
                if done:
                    continue
                if self._tell_waiting(Waiting.enter):
                    continue  # look once more: what committed before it sent no NOTIFY
                self.runtime.wakeup.wait(poll)
                self._tell_waiting(Waiting.renew)
        finally:
            self._tell_waiting(Waiting.leave)
            self._release_next()

    def _tell_waiting(self, action) -> bool:
        """Tell the database this thread waits for work, or does not (PostgreSQL's receivers
        NOTIFY only while a worker waits): `action` is a `Waiting` method."""
        if self._waiting is None:
            return False
        try:
            return bool(action(self._waiting))
        except Exception:  # written again after the next poll; no NOTIFY may come meanwhile
            log_failure(log, "could not tell the database whether this worker waits")
            return False

    def run_once(self, *, claim_ahead: bool = False) -> int:
        """Claim one batch and send it; the number of messages handled.

        `claim_ahead` (the worker's own threads, at rates that send in windows): a full batch
        claims the next one, its first window marked in flight, while its last window is
        sent, so the claim's commit does not hold up sending (it was a tenth of a worker's
        time at high rates), nor does that window's. What a stopping worker had claimed ahead
        is released."""
        self.maintain()
        batch = self._take_next()
        if batch is None:
            with transaction(self.runtime.engine.begin) as conn:
                batch = self._claim(conn)
        if batch.rows:
            self._tell_waiting(Waiting.leave)  # busy: work arriving needs no NOTIFY now
        claim, rows, ready = batch.claim, batch.rows, batch.ready
        windows = [ready[n : n + self.window] for n in range(0, len(ready), self.window)]
        ahead_claim = claim_ahead and self.window > 1 and len(rows) == self.batch
        # (row, prepared, result, when): not recorded yet. This thread's last batch may have
        # left its last window's results to this batch's next commit.
        sent: list[tuple] = self._take_carried()
        marked: list[tuple] = []  # committed as in flight, not sent yet
        # The next window's commit, under way: (future, window, the results it records).
        ahead: tuple[Future, list[tuple], list[tuple]] | None = None
        if batch.marked is not None and windows:  # claimed ahead: committed with the claim
            ahead = (_resolved(batch.marked), windows[0], [])
        done = False
        try:
            for n, window in enumerate(windows):
                # One durable transaction records the results so far and marks a window in
                # flight: a crash after it can never resend those blindly. It goes through
                # the group committer (threads share one disk flush). With windows wider than
                # one, the next window's commit runs while this one is sent, so it rarely
                # holds up a request; a window of one keeps a single message in flight.
                if ahead is None:
                    ahead = (self._mark(window, sent, claim), window, sent)
                    sent = []
                owned = ahead[0].result()
                ahead = None
                marked = [(row, prepared) for row, prepared in window if row.id in owned]
                for row, _ in window:
                    if row.id not in owned:  # our lease ran out and another worker took it
                        log.warning(
                            "message %s: claim lost before sending; left to its owner", row.id
                        )
                if self.window > 1 and n + 1 < len(windows) and not self.stop_event.is_set():
                    ahead = (self._mark(windows[n + 1], sent, claim), windows[n + 1], sent)
                    sent = []
                elif ahead_claim and n + 1 == len(windows) and not self.stop_event.is_set():
                    # That commit records the results so far, as a window's would.
                    claim_next = partial(self._claim, mark_first=True, results=sent)
                    self._next.future = self.runtime.committer.submit(claim_next)
                    self._next.handed, sent = sent, []
                if not self._send_all(marked, sent):
                    break  # stopping: unsent claims go back when their lease ends
            done = True
        finally:
            if ahead is not None:  # its window was never started (or its commit failed)
                future, window, handed = ahead
                try:
                    owned = future.result()
                except Exception:
                    sent = handed + sent  # that commit failed: record its results below
                else:
                    marked += [(row, prepared) for row, prepared in window if row.id in owned]
            if done and sent and not marked and self._next.future is not None:
                # The next batch is claimed already, and its next commit (marking a window in
                # flight, or claiming ahead) records these, as each window's commit records
                # the window before: a transaction less per batch, which held up the sending
                # thread. In flight and not recorded: never more than two windows.
                self._next.carried = sent
            elif sent or marked:
                # Lost on power failure: settled as unknown. Run again if the database aborts
                # it for another worker's sake: left in flight, unsent rows would become
                # `unknown` when the lease ends instead of going back to the queue.
                unsent = [row.id for row, _ in marked]

                def settle(conn) -> None:
                    self._record_all(conn, sent)
                    outbox.unmark_in_flight(conn, unsent, claim)

                run_transaction(self.runtime.relaxed, settle)
        return len(rows)

    def _claim(self, conn, *, mark_first: bool = False, results: Sequence[tuple] = ()) -> Batch:
        """Claim a batch; `mark_first`: and mark its first window in flight (a batch claimed
        ahead, whose first window is sent as soon as the batch before is). `results`: sent
        messages of the batch before, recorded in the same transaction."""
        self._record_all(conn, results)
        claim = self._claim_token()
        rows = outbox.claim(conn, claim, lease=self.lease, limit=self.batch)
        # Consent, invalid numbers and disabled sources are checked here, moments before
        # sending, for the whole batch at once; skips are recorded in this transaction.
        ready = self._prepare(conn, rows)
        if not (mark_first and ready):
            return Batch(claim, rows, ready)
        return Batch(claim, rows, ready, self._in_flight([], ready[: self.window], claim, conn))

    def _take_next(self) -> Batch | None:
        """The batch claimed ahead by this thread, if any (None also if that claim failed:
        its transaction was rolled back, so nothing is held, and the results it was to
        record are left to the next commit)."""
        future, handed = self._next.future, self._next.handed
        self._next.future, self._next.handed = None, []
        if future is None:
            return None
        try:
            return future.result()
        except Exception:
            log_failure(log, "claiming the next batch failed; claiming again")
            self._next.carried = handed + self._next.carried
            return None

    def _take_carried(self) -> list[tuple]:
        """Results of this thread's last batch that its next commit is to record."""
        carried, self._next.carried = self._next.carried, []
        return carried

    def _release_next(self) -> None:
        batch = self._take_next()
        if carried := self._take_carried():  # the loop ended before a commit recorded them
            try:
                run_transaction(self.runtime.relaxed, partial(self._record_all, sent=carried))
            except Exception:  # left in flight: `unknown` when the lease ends, then looked up
                log_failure(log, "recording the last results failed")
        if batch is None or not batch.rows:
            return
        try:
            with self.runtime.relaxed() as conn:  # lost on power failure: the lease ends
                if batch.marked:  # its first window: marked in flight, but never sent
                    outbox.unmark_in_flight(conn, list(batch.marked), batch.claim)
                outbox.release(conn, [row.id for row in batch.rows], batch.claim)
        except Exception:  # stopping anyway: the claims come back when their lease ends
            log_failure(log, "giving back the batch claimed ahead failed")

    def _mark(self, window: list[tuple], sent: list[tuple], claim: str) -> Future:
        return self.runtime.committer.submit(partial(self._in_flight, sent, window, claim))

    def _send_all(self, marked: list[tuple], sent: list[tuple]) -> bool:
        """Send what is marked in flight, each in its rate slot, moving it from `marked` to
        `sent`; False when the worker is stopping."""
        while marked:
            slot = None if self.stop_event.is_set() else self.limiter.acquire(self.stop_event)
            if slot is None:
                return False
            while self.limiter.late(slot):  # the commit took long: starting now could crowd
                slot = self.limiter.acquire()  # the next slot, so take a fresh one
            row, prepared = marked.pop(0)
            sent.append((row, prepared, self._send(prepared.message), time.time()))
        return True

    def _in_flight(self, sent: list[tuple], window: list[tuple], claim: str, conn) -> set[str]:
        self._record_all(conn, sent)
        outbox.update_many(  # the body as it will be sent: with the number's first footer
            conn,
            [
                {
                    "_id": row.id,
                    "body_enc": prepared.body_enc,
                    "encoding": prepared.message.encoding,
                    "segments": prepared.message.segments,
                }
                for row, prepared in window
                if prepared.with_footer
            ],
        )
        ids = [row.id for row, _ in window]
        return outbox.mark_in_flight(conn, ids, claim, self.provider.name, lease=self.lease)

    def _send(self, message: OutgoingMessage) -> ProviderResult:
        started = time.monotonic()
        result = self.provider.send(message)
        SEND_SECONDS.labels(self.provider.name).observe(time.monotonic() - started)
        SENDS.labels(self.provider.name, result.outcome.value).inc()
        if result.error_code:
            PROVIDER_ERRORS.labels(self.provider.name, result.error_code).inc()
        return result

    def _claim_token(self) -> str:
        # Unique per claim, so a worker can tell its own claim from a later one on the row.
        return f"{self.worker_id[:40]}:{uuid.uuid4().hex[:16]}"

    def maintain(self, *, force: bool = False) -> None:
        """Housekeeping: interrupted claims become unknown, unknowns are settled where the
        provider can be asked, what is past the retention period goes. Runs every few seconds."""
        now = time.monotonic()
        if not force and now - self._last_maintenance < min(MAINTENANCE_SECONDS, self.lease):
            return
        self._last_maintenance = now
        with self.runtime.engine.begin() as conn:
            interrupted = outbox.sweep_interrupted(conn)
            purged = retention.purge(conn, self.runtime.config.security.retention_days)
            note(conn, log, logging.DEBUG, "past the retention period, dropped: %s", purged)
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

    def _prepare(self, conn, rows) -> list[tuple]:
        """Decide, for a claimed batch, what may still be sent; add each number's first footer."""
        vault, sender = self.runtime.vault, self.runtime.config.sender
        numbers = consent.numbers(
            conn, [r.phone_index for r in rows if r.phone_index and r.kind != REPLY_KIND]
        )
        disabled = {source: source_disabled(conn, source) for source in {r.source for r in rows}}
        footers: set[str] = set()  # numbers given the footer in this batch already
        ready = []
        for row in rows:
            is_reply = row.kind == REPLY_KIND  # a keyword's confirmation: no consent check
            number = None if is_reply else numbers.get(row.phone_index)
            reason = None
            if number is not None:
                if disabled[row.source]:
                    reason = "source_disabled"
                elif number.consent.opted_out:
                    reason = "opted_out"
                elif row.category == "marketing" and number.consent.marketing != "opted_in":
                    reason = "not_opted_in"
                elif number.invalid_reason:
                    reason = "invalid_phone"
            to, body = vault.decrypt(row.to_enc), vault.decrypt(row.body_enc)
            if reason is None and (to is None or body is None):
                reason = "erased"  # erased while queued
            if reason is None and row.expires_at is not None and time.time() > row.expires_at:
                reason = "expired"  # e.g. retries ran past the appointment
            if reason:
                self._finish(
                    conn,
                    row.id,
                    status="skipped",
                    reason=reason,
                    finished_at=time.time(),
                    lease_until=None,
                )
                continue
            with_footer = bool(
                not is_reply
                and sender.footer
                and (number is None or number.footer_sent_at is None)
                and row.phone_index not in footers
                and sender.footer not in body
            )
            if with_footer:
                body = f"{body}\n{sender.footer}"
                footers.add(row.phone_index)
            info = count_segments(body)
            message = OutgoingMessage(row.id, to, body, info.segments, info.encoding)
            body_enc = vault.encrypt(body) if with_footer else row.body_enc
            ready.append((row, Prepared(message, row.phone_index, with_footer, body_enc)))
        return ready

    def _record_all(self, conn, sent: Sequence[tuple]) -> None:
        """Record the results of sent messages; the usual case (sent) in one executemany."""
        now = time.time()
        accepted = [item for item in sent if item[2].outcome is Outcome.SENT]
        outbox.update_many(
            conn,
            [
                {
                    "_id": row.id,
                    "status": "sent",
                    "reason": None,
                    "sent_at": at,
                    "finished_at": at,
                    "segments": result.segments or prepared.message.segments,
                    "updated_at": now,
                    **self._result_columns(result),
                }
                for row, prepared, result, at in accepted
            ],
        )
        # In one order everywhere: two transactions that lock the same numbers' rows in
        # different orders deadlock (one of them is then run again, see `run_transaction`).
        footers = [
            {"_index": index, "_now": now}
            for index in sorted({p.index for _, p, _, _ in accepted if p.with_footer and p.index})
        ]
        if footers:
            conn.execute(_FOOTER_SENT, footers)
        if accepted:
            after_commit(conn, partial(MESSAGES.labels("sent", "").inc, len(accepted)))
        for row, prepared, result, _ in accepted:
            note(
                conn,
                log,
                logging.INFO,
                "message %s sent to %s (%s)",
                row.id,
                redact_phone(prepared.message.to),
                result.provider_message_id,
            )
        for row, prepared, result, at in sent:
            if result.outcome is not Outcome.SENT:
                self._record(conn, row, prepared, result, at)

    @staticmethod
    def _result_columns(result: ProviderResult) -> dict:
        return {
            "in_flight": False,
            "lease_until": None,
            "provider_message_id": result.provider_message_id,
            "provider_status": result.provider_status,
            "error_code": result.error_code,
            "error_text": (result.error_text or None) and result.error_text[:500],
        }

    def _record(self, conn, row, prepared: Prepared, result: ProviderResult, now: float) -> None:
        """Record one result other than "sent" (those go through `_record_all`); `now`: when
        the provider answered."""
        common = self._result_columns(result)
        if result.segments:
            common["segments"] = result.segments
        outcome = result.outcome
        to = redact_phone(prepared.message.to)
        if outcome is Outcome.RETRY and row.attempts < self.runtime.config.worker.max_attempts:
            delay = self._backoff(row.attempts, result.retry_after)
            self._finish(
                conn, row.id, status="pending", reason="retry", send_at=now + delay, **common
            )
            note(
                conn,
                log,
                logging.WARNING,
                "message %s to %s: provider said %s, retry in %.1fs",
                row.id,
                to,
                result.error_code or result.error_text,
                delay,
            )
        elif outcome is Outcome.UNKNOWN:
            self._finish(conn, row.id, status="unknown", reason="in_flight_error", **common)
            note(
                conn,
                log,
                logging.ERROR,
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
            self._finish(conn, row.id, status="failed", reason=reason, finished_at=now, **common)
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
            note(
                conn,
                log,
                logging.ERROR,
                "message %s to %s failed: %s %s",
                row.id,
                to,
                result.error_code,
                result.error_text,
            )

    @staticmethod
    def _finish(conn, message_id: str, *, status: str, reason: str | None, **values) -> None:
        outbox.update(conn, message_id, status=status, reason=reason, **values)
        after_commit(conn, MESSAGES.labels(status, reason or "").inc)

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


def _resolved(value) -> Future:
    """A future that is done already, with `value`."""
    future: Future = Future()
    future.set_result(value)
    return future
