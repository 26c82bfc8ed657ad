"""Prometheus metrics. Labels stay low-cardinality: platform, never a shop or a number."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS = Counter("txsms_events_total", "Events received", ["platform", "kind", "result"])
DECISIONS = Counter("txsms_decisions_total", "Message decisions at ingest", ["status", "reason"])
SENDS = Counter("txsms_sends_total", "Provider send attempts", ["provider", "outcome"])
SEND_SECONDS = Histogram("txsms_send_seconds", "Provider request time", ["provider"])
INBOUND = Counter("txsms_inbound_total", "Inbound messages by keyword", ["provider", "keyword"])
RECEIPTS = Counter("txsms_receipts_total", "Delivery receipts", ["provider", "status"])
PROVIDER_ERRORS = Counter("txsms_provider_errors_total", "Provider errors", ["provider", "code"])
MESSAGES = Counter("txsms_messages_total", "Message outcomes", ["status", "reason"])
WEBHOOKS = Counter("txsms_http_requests_total", "Requests answered", ["route", "status"])
# Ingest worked out before SQLite's write lock (core/rehearsal.py): applied, worked out again
# under the lock because the database changed meanwhile, or not rehearsable.
REHEARSALS = Counter("txsms_ingest_rehearsals_total", "Ingest rehearsals", ["outcome"])


def platform_of(source: str) -> str:
    return source.split(":", 1)[0]
