"""Growth: does a bigger history, or a long queue, make ingest or claim slower?

Three databases side by side: one holding 10 k events and messages, one `--growth-rows` (1 M
by default), realistic rows bulk-filled with multi-row inserts (most messages sent or delivered
over the past half year, bodies purged after 30 days, the same few pending in both), and one
with the small history and a backlog of 100 k messages waiting (a provider outage, a night of
quiet hours). Then, alternately on each so that the machine's load falls on all alike:
`txsms.core.pipeline.ingest` of single events (ms/event, commit included) and
`txsms.core.outbox.claim` of a batch of 50 (ms/claim, rolled back so every claim sees the same
queue).
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench import send
from bench.common import database, loadavg
from bench.gunicorn_ingest import PHONES

SMALL = 10_000
PENDING = 200  # messages waiting in both databases: the queue is the same, only history grows
BACKLOG = 100_000  # messages waiting in the third
CHUNK = 5_000  # rows per transaction
ROUNDS, INGESTS, CLAIMS, BATCH = 12, 25, 25, 50  # round 0 is a warm-up
DAY = 86400.0
SOURCE = "shopify:bench-shop.myshopify.com"
KINDS = (
    ("order.created", "orders"),
    ("order.paid", "orders"),
    ("order.fulfilled", "shipping"),
    ("shipment.updated", "shipping"),
)


@dataclass(frozen=True)
class Cost:
    p50_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True)
class Growth:
    rows: int
    fill_seconds: float
    ingest: Cost
    claim: Cost


def run(args, tmp: Path, kind: str, say) -> tuple[Growth, Growth, Growth, str]:
    """(small, large, backlog, the load average when measuring) on fresh `kind` databases."""
    small = min(SMALL, args.growth_rows)
    sizes = ((small, PENDING), (args.growth_rows, PENDING), (small + BACKLOG, BACKLOG))
    with (
        database(kind, tmp) as small_url,
        database(kind, tmp) as large_url,
        database(kind, tmp) as backlog_url,
    ):
        runtimes = [
            send.runtime(url, "http://127.0.0.1:9", tmp)
            for url in (small_url, large_url, backlog_url)
        ]
        try:
            fills = []
            for rt, (rows, pending) in zip(runtimes, sizes, strict=True):
                say(f"growth: filling {rows:,} rows on {kind}, {pending:,} of them waiting")
                fills.append(fill(rt, rows, pending))
                say(f"growth: filled {rows:,} rows on {kind} in {fills[-1]:.0f} s")
            say(f"growth: measuring ingest and claim on {kind}, alternately")
            load_ = loadavg()
            samples = measure(runtimes)
        finally:
            for rt in runtimes:
                rt.close()
    small, large, backlog = (
        Growth(rows, seconds, _cost(s["ingest"]), _cost(s["claim"]))
        for (rows, _), seconds, s in zip(sizes, fills, samples, strict=True)
    )
    return small, large, backlog, load_


def fill(rt, rows: int, pending: int = PENDING) -> float:
    """`rows` events, one message each, the last `pending` of them waiting to be sent,
    inserted in chunks; seconds taken (ANALYZE included)."""
    from sqlalchemy import text

    from txsms.core.storage import events, messages

    started = time.perf_counter()
    rnd = random.Random(rows)
    now = time.time()
    pool = _Pool(rt, rnd)
    history = rows - pending
    # Customers come back: about five messages per number.
    indexes = [
        rt.vault.index(f"+1{rnd.randrange(2012000000, 9899999999)}")
        for _ in range(max(100, rows // 5))
    ]
    for first in range(0, rows, CHUNK):
        ev_rows, msg_rows = [], []
        for n in range(first, min(rows, first + CHUNK)):
            pending = n >= history
            # Oldest first, as rows arrive; the pending ones in the last minute.
            at = now - 60 * rnd.random() if pending else now - 180 * DAY * (1 - n / history)
            ev, msg = _rows(n, at, now, pending, rnd.choice(indexes), pool, rnd)
            ev_rows.append(ev)
            msg_rows.append(msg)
        with rt.engine.begin() as conn:
            conn.execute(events.insert(), ev_rows)  # executemany: pipelined by psycopg
            conn.execute(messages.insert(), msg_rows)
    if rt.engine.dialect.name == "postgresql":
        with rt.engine.begin() as conn:
            conn.execute(text("ANALYZE events"))
            conn.execute(text("ANALYZE messages"))
    return time.perf_counter() - started


class _Pool:
    """Encrypted values of realistic sizes, made once: Fernet on a million rows would dominate."""

    def __init__(self, rt, rnd: random.Random):
        vault = rt.vault
        self.to = [vault.encrypt(p.replace(" ", "")) for p in PHONES[:200]]
        self.body = [
            vault.encrypt(
                f"Bench Shop: Thanks Ada! We got your order #{1000 + i} (${rnd.randrange(5, 400)}"
                ".00) and will text you when it ships.\nReply STOP to opt out."
            )
            for i in range(200)
        ]
        self.payload = [
            vault.encrypt_json(
                {
                    "recipient": {"phone": p, "name": "Ada Lovelace", "locale": "en"},
                    "data": {
                        "shop": {"name": "Bench Shop"},
                        "customer": {"first_name": "Ada", "name": "Ada Lovelace"},
                        "order": {
                            "number": f"#{1000 + i}",
                            "total": "$388.00",
                            "currency": "USD",
                            "items": [{"name": "Aviator sunglasses", "quantity": 1}],
                        },
                    },
                }
            )
            for i, p in enumerate(PHONES[:200])
        ]


def _rows(n, at, now, pending, index, pool, rnd) -> tuple[dict, dict]:
    kind, category = KINDS[n % len(KINDS)]
    key = f"order:{n}:{kind.split('.')[1]}"
    event_id, message_id = uuid.uuid4().hex, uuid.uuid4().hex
    event = {
        "id": event_id,
        "source": SOURCE,
        "key": key,
        "kind": kind,
        "phone_index": index,
        "payload_enc": rnd.choice(pool.payload),
        "order_ref": str(n),
        "occurred_at": at - 1,
        "received_at": at,
    }
    message = {
        "id": message_id,
        "event_id": event_id,
        "source": SOURCE,
        "kind": kind,
        "idempotency_key": f"{SOURCE}|{key}|{kind}",
        "order_ref": str(n),
        "phone_index": index,
        "to_enc": rnd.choice(pool.to),
        "body_enc": rnd.choice(pool.body) if pending or at > now - 30 * DAY else None,
        "locale": "en",
        "category": category,
        "urgent": False,
        "status": "pending",
        "reason": None,
        "encoding": "GSM-7",
        "segments": 1,
        "attempts": 0,
        "send_at": at,
        "lease_until": None,
        "claimed_by": None,
        "in_flight": False,
        "provider": None,
        "provider_message_id": None,
        "provider_status": None,
        "error_code": None,
        "error_text": None,
        "created_at": at,
        "updated_at": at,
        "sent_at": None,
        "finished_at": None,
    }
    if pending:
        return event, message
    roll = n % 100
    done = at + 1 + rnd.random()
    message.update(attempts=1, updated_at=done, finished_at=done)
    if roll < 3:  # skipped at ingest: never claimed
        message.update(status="skipped", reason=("opted_out", "invalid_phone", "no_phone")[roll])
        message.update(attempts=0, body_enc=None)
        return event, message
    message.update(
        claimed_by=f"bench-host:{1000 + n % 7}:7f3a9c2e10:{uuid.uuid4().hex[:16]}",
        provider="twilio",
        sent_at=done,
    )
    if roll < 5:
        message.update(status="failed", reason="provider_error", error_code="30003")
        message.update(error_text="Unreachable destination handset", sent_at=None)
        return event, message
    message.update(
        provider_message_id="SM" + uuid.uuid4().hex,
        status="sent" if roll < 35 else "delivered",
        provider_status="sent" if roll < 35 else "delivered",
    )
    return event, message


def measure(runtimes) -> list[dict[str, list[float]]]:
    """Per database, the seconds of each ingest and each claim, warm-up round left out."""
    from txsms.core import outbox
    from txsms.core.events import Event, OrderRef, Recipient
    from txsms.core.pipeline import ingest

    samples = [{"ingest": [], "claim": []} for _ in runtimes]
    n = 0
    for round_ in range(ROUNDS):
        for rt, got in zip(runtimes, samples, strict=True):
            for _ in range(INGESTS):
                n += 1
                event = Event(
                    source=SOURCE,
                    kind="order.created",
                    key=f"order:g{n}:created",
                    recipient=Recipient(phone=PHONES[n % len(PHONES)], name="Ada", country="US"),
                    data={"order": {"number": f"#G{n}", "total": "$25.00"}},
                    order=OrderRef(ref=f"g{n}", status="created", modified_at=time.time()),
                )
                t0 = time.perf_counter()
                [result] = ingest(rt, [event])
                if round_:
                    got["ingest"].append(time.perf_counter() - t0)
                if result.status != "accepted":
                    raise RuntimeError(f"growth ingest: {json.dumps(result.__dict__)[:200]}")
        for rt, got in zip(runtimes, samples, strict=True):
            for _ in range(CLAIMS):
                with rt.engine.connect() as conn:
                    transaction = conn.begin()
                    t0 = time.perf_counter()
                    rows = outbox.claim(conn, "bench-growth:claim", lease=60, limit=BATCH)
                    elapsed = time.perf_counter() - t0
                    transaction.rollback()
                if len(rows) != BATCH:
                    raise RuntimeError(f"growth claim: {len(rows)} rows, expected {BATCH}")
                if round_:
                    got["claim"].append(elapsed)
    return samples


def _cost(seconds: list[float]) -> Cost:
    ms = sorted(x * 1000 for x in seconds)
    return Cost(
        statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))], statistics.mean(ms)
    )
