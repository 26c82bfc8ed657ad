"""The send rate limit, shared by every worker thread and process through the database.

`provider.rate_per_second` is a promise to the provider (and to carriers), so it must hold
for the whole deployment, not per process. One row per limiter holds the earliest time the
next request may start; taking a slot is one conditional UPDATE, so any number of workers on
any number of hosts space their requests at least 1/rate apart. There is no burst: the
promise is "never more than `rate` in any one-second window", measured at the provider.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import Connection, bindparam, select

from txsms.core.storage import insert_ignore, rate_limits

# Requests are spaced 10% wider than 1/rate: the time between taking a slot and the request
# reaching the provider varies (a commit, a busy CPU), and that jitter must not add up to one
# request too many in some second. With 10%, up to ~100 ms of jitter cannot.
JITTER_MARGIN = 1.1
#: A request that could not leave within this long after its slot takes a new one.
MAX_LATE_SECONDS = 0.05

Begin = Callable[[], AbstractContextManager[Connection]]


# At high rates one database round trip per message would cost more than the message: a
# process then takes the slots of the next 20 ms at once and hands them out itself. But no
# more than one process can use before they go late: at 100,000/s the 20 ms are 1,818 slots,
# of which a process sending 700/s used 35 before letting go of the rest, and building them
# was a measurable share of its sends.
CHUNK_SECONDS = 0.02
MAX_CHUNK = 32

# Built once: building and compiling them took most of a slot's round trip.
_TAKE = (
    rate_limits.update()
    .where(rate_limits.c.name == bindparam("_name"), rate_limits.c.next_at <= bindparam("_now"))
    .values(next_at=bindparam("_next_at"))
    .returning(rate_limits.c.next_at)
)
_NEXT_AT = select(rate_limits.c.next_at).where(rate_limits.c.name == bindparam("_name"))


class RateLimiter:
    def __init__(self, begin: Begin, name: str, rate_per_second: float):
        """`begin` opens a transaction (each use is a single statement, so `Runtime.autocommit`
        serves): a lost slot is harmless, so it need not be durable."""
        self.begin = begin
        self.name = name
        self.interval = JITTER_MARGIN / rate_per_second
        self.chunk = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / self.interval)))
        self._slots: deque[float] = deque()  # start times this process holds
        self._lock = threading.Lock()
        with begin() as conn:
            insert_ignore(conn, rate_limits, {"name": name, "next_at": 0.0}, ["name"])

    def acquire(self, stop: threading.Event | None = None) -> float | None:
        """Block until this caller may start a request; the slot's time, or None if `stop`
        was set meanwhile. A caller that is late for its slot (see `late`) takes another."""
        while True:
            with self._lock:
                if self._slots and self.late(self._slots[0]):
                    self._slots.clear()  # this process could not keep up with them: let go
                slot = self._slots.popleft() if self._slots else self._take()
            if slot is not None:
                wait = slot - time.time()
                if wait <= 0:
                    return slot
            else:
                wait = max(0.0005, self._next_at() - time.time())
            if stop is not None and stop.wait(wait):
                return None
            if stop is None:
                time.sleep(wait)
            if slot is not None:
                return slot

    @staticmethod
    def late(slot: float) -> bool:
        return time.time() - slot > MAX_LATE_SECONDS

    def _take(self) -> float | None:
        """Take the next `chunk` slots if the first is due now; the first slot's time."""
        now = time.time()
        params = {"_name": self.name, "_now": now, "_next_at": now + self.interval * self.chunk}
        with self.begin() as conn:
            taken = conn.execute(_TAKE, params).first()
        if taken is None:
            return None
        self._slots.extend(now + self.interval * n for n in range(1, self.chunk))
        return now

    def _next_at(self) -> float:
        with self.begin() as conn:
            return conn.execute(_NEXT_AT, {"_name": self.name}).scalar_one()
