"""The CRM poller: cursors that lose nothing, a bounded seen-set, batches into the core.

The cursor is (modified-at, id), kept in the `cursors` table as `crm:<name>`. Each run asks the
source for records modified at or after `cursor - overlap` (search indexes are eventually
consistent: a record updated a moment ago may show up late), skips what the seen-set says was
already handled at that modification, maps the rest into Events and hands each page to
`core.pipeline.ingest` as one transaction. Only then are the cursor, the seen-set and the
per-record memory (for `changed_to` and appointment schedules) saved, so a crash in between
re-reads the page and the event keys make every send exactly-once.

The first run arms the cursor at now (no backfill), unless `--since` says where to start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from sqlalchemy import select

from txsms.core.errors import TxsmsError
from txsms.core.pipeline import ingest
from txsms.core.ratelimit import RateLimiter
from txsms.core.runtime import Runtime
from txsms.core.storage import cursors, insert_ignore

from .mapping import Mapper, Record, iso, rules_of

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "interval_seconds": 60.0,
    "overlap_seconds": 120.0,  # HubSpot: "it may take a few moments" for search to catch up
    "page_size": 200,
    "seen_limit": 20000,
    "timeout_seconds": 30.0,
    "rate_per_second": 4.0,  # HubSpot search allows 5 per second per account
}
MAX_RETRIES = 6  # 429 and 5xx answers, then the run fails and the next one starts over
MAX_WAIT = 300.0  # a Retry-After longer than this fails the run instead of blocking it


class CrmError(TxsmsError):
    """A CRM request failed for good (this run); the next run starts from the saved cursor."""


def setting(entry: dict[str, Any], key: str) -> Any:
    return entry.get(key, DEFAULTS.get(key))


# -- HTTP: one client per source, rate-limited, honouring 429 and Retry-After --------------------


class Client:
    """Requests spaced by the core's database-backed limiter, one per account (API root and
    credential): every source, thread and process polling one account shares its rate."""

    def __init__(
        self,
        runtime: Runtime,
        entry: dict[str, Any],
        account: str,
        *,
        session: requests.Session | None = None,
        stop: threading.Event | None = None,
    ):
        self.name = entry["name"]
        self.timeout = setting(entry, "timeout_seconds")
        digest = hashlib.sha256(account.encode()).hexdigest()[:40]  # the account holds a secret
        rate = setting(entry, "rate_per_second")
        # A slot lost to a power cut is harmless: the relaxed (unsynced) transaction will do.
        self.limiter = RateLimiter(runtime.autocommit, f"crm:{digest}", rate)
        self.session = session or requests.Session()
        self.stop = stop or threading.Event()

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        for attempt in range(1, MAX_RETRIES + 1):
            if not self.limiter.acquire(self.stop):
                raise CrmError("stopped")
            try:
                resp = self.session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                problem, wait = f"{type(exc).__name__}", min(60.0, 2.0**attempt)
            else:
                if resp.status_code < 400:
                    return resp
                problem = f"HTTP {resp.status_code}: {_error_text(resp)}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise CrmError(f"{method} {url.split('?')[0]}: {problem}")
                wait = _retry_after(resp) or min(60.0, 2.0**attempt)
            if wait > MAX_WAIT or attempt == MAX_RETRIES:
                break
            log.warning("crm %s: %s; retrying in %.1fs", self.name, problem, wait)
            if self.stop.wait(wait):
                raise CrmError("stopped")
        raise CrmError(f"{method} {url.split('?')[0]}: {problem} (gave up)")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict):
        parts = [body.get("category") or body.get("error"), body.get("message")]
        return " ".join(str(p) for p in parts if p)[:300] or str(body)[:200]
    return str(body)[:200]


# -- state ---------------------------------------------------------------------------------------


@dataclass
class State:
    modified_ms: int  # the cursor: the newest modification handled...
    id: str  # ...and the record it belongs to
    floor_ms: int  # armed at (or --since): nothing modified before it is ever handled
    seen: dict[str, int] = field(default_factory=dict)  # record id -> modification handled

    def dump(self) -> str:
        return json.dumps(
            {"modified": self.modified_ms, "id": self.id, "floor": self.floor_ms, "seen": self.seen}
        )

    @classmethod
    def load(cls, text: str) -> State:
        v = json.loads(text)
        return cls(int(v["modified"]), str(v.get("id", "")), int(v["floor"]), v.get("seen", {}))


@dataclass
class PollResult:
    source: str
    armed: bool = False  # the first run: the cursor was set, nothing was read
    records: int = 0  # read from the CRM
    handled: int = 0  # new or changed since they were last seen
    accepted: int = 0  # new events
    queued: int = 0  # of their messages, those pending or deferred
    cursor_ms: int = 0


def _ms(when: datetime | float) -> int:
    """Epoch milliseconds, rounded down: a cursor set now must include this millisecond."""
    return math.floor((when.timestamp() if isinstance(when, datetime) else when) * 1000)


class Poller:
    """Polls one `[[crm]]` source. `source` is a HubSpotSource or an HttpSource."""

    def __init__(self, runtime: Runtime, entry: dict[str, Any], source: Any):
        self.runtime = runtime
        self.entry = entry
        self.name = entry["name"]
        self.cursor_name = f"crm:{self.name}"
        self.source = source
        self.mapper = Mapper(
            self.cursor_name, source.record_name, rules_of(entry), self._fingerprint
        )
        self.overlap_ms = _ms(setting(entry, "overlap_seconds"))
        self.seen_limit = setting(entry, "seen_limit")

    def _fingerprint(self, value: Any) -> str:
        # Keyed, so the memory of a record's fields is no readable copy of them.
        return self.runtime.vault.index(json.dumps(value, sort_keys=True, default=str))[:16]

    def arm(self, since: datetime | None = None) -> bool:
        """Start the cursor at `since` (default now) if it was never set; True if it was set."""
        at = _ms(since or time.time())
        state = State(at, "", at)
        with self.runtime.engine.begin() as conn:
            return insert_ignore(
                conn,
                cursors,
                {"name": self.cursor_name, "value": state.dump(), "updated_at": time.time()},
                ["name"],
            )

    def state(self) -> State | None:
        with self.runtime.engine.connect() as conn:
            text = conn.execute(
                select(cursors.c.value).where(cursors.c.name == self.cursor_name)
            ).scalar()
        return None if text is None else State.load(text)

    def run_once(self, since: datetime | None = None) -> PollResult:
        result = PollResult(self.cursor_name)
        state = self.state()
        if since is not None:  # read again from there; event keys keep it exactly-once
            state = State(_ms(since), "", _ms(since), state.seen if state else {})
        elif state is None:
            result.armed = self.arm()
            result.cursor_ms = (self.state() or State(0, "", 0)).modified_ms
            log.info("crm %s: first run, cursor armed at now (no backfill)", self.name)
            return result
        start = max(state.floor_ms, state.modified_ms - self.overlap_ms)
        newest = (state.modified_ms, state.id)
        for page in self.source.pages(start):
            result.records += len(page)
            fresh = [
                r
                for r in page
                if r.modified_ms >= state.floor_ms and state.seen.get(r.id, -1) < r.modified_ms
            ]
            memory = self._handle(self.source.enrich(fresh), result) if fresh else {}
            for r in fresh:
                state.seen[r.id] = max(r.modified_ms, state.seen.get(r.id, 0))
            newest = max([newest, *((r.modified_ms, r.id) for r in page)])
            if self.source.sorted:  # oldest first: everything up to here is handled
                state.modified_ms, state.id = newest
            self._save(state, memory)
        state.modified_ms, state.id = newest
        self._save(state, {})
        result.cursor_ms = state.modified_ms
        log.log(
            logging.INFO if result.handled else logging.DEBUG,
            "crm %s: %d record(s) read from %s, %d handled, %d new event(s), %d message(s) queued",
            self.name,
            result.records,
            iso(start / 1000),
            result.handled,
            result.accepted,
            result.queued,
        )
        return result

    def _handle(self, records: list[Record], result: PollResult) -> dict[str, str]:
        """Map and ingest one page; returns the per-record memory to save after the commit."""
        previous = self._memory([r.id for r in records]) if self.mapper.stateful else {}
        batch, memory, now = [], {}, time.time()
        for record in records:
            try:
                events, remember = self.mapper.events(record, previous.get(record.id), now)
            except Exception:  # one bad record must not stop the source for good
                log.exception("crm %s: record %s could not be mapped", self.name, record.id)
                continue
            batch += events
            if self.mapper.stateful:
                memory[record.id] = json.dumps(remember, sort_keys=True)
        result.handled += len(records)
        for r in ingest(self.runtime, batch) if batch else []:
            result.accepted += r.status == "accepted"
            result.queued += sum(d.status in ("pending", "deferred") for d in r.messages)
        return memory

    # -- storage ---------------------------------------------------------------------------

    def _record_name(self, record_id: str) -> str:
        if len(record_id) > 120:
            record_id = "#" + hashlib.sha256(record_id.encode()).hexdigest()[:32]
        return f"{self.cursor_name}:record:{record_id}"

    def _memory(self, ids: list[str]) -> dict[str, dict[str, str]]:
        names = {self._record_name(i): i for i in ids}
        with self.runtime.engine.connect() as conn:
            rows = conn.execute(
                select(cursors.c.name, cursors.c.value).where(cursors.c.name.in_(list(names)))
            ).all()
        return {names[row.name]: json.loads(row.value) for row in rows}

    def _save(self, state: State, memory: dict[str, str]) -> None:
        floor = max(state.floor_ms, state.modified_ms - self.overlap_ms)
        seen = sorted(((ms, rid) for rid, ms in state.seen.items() if ms >= floor), reverse=True)[
            : self.seen_limit
        ]
        state.seen = {rid: ms for ms, rid in sorted(seen)}
        now = time.time()
        rows = {self.cursor_name: state.dump()}
        rows.update({self._record_name(rid): value for rid, value in memory.items()})
        with self.runtime.engine.begin() as conn:
            for name, value in rows.items():
                row = {"name": name, "value": value, "updated_at": now}
                if not insert_ignore(conn, cursors, row, ["name"]):
                    conn.execute(cursors.update().where(cursors.c.name == name).values(**row))
