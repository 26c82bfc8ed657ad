"""Sending policy that depends on the clock: quiet hours in the recipient's zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from zoneinfo import ZoneInfo


def _in_window(local: dtime, start: dtime, end: dtime) -> bool:
    if start < end:
        return start <= local < end
    return local >= start or local < end  # the window wraps midnight, e.g. 21:00-08:00


def _window_end_after(moment: datetime, zone: ZoneInfo, end: dtime) -> datetime:
    day = moment.astimezone(zone).date()
    # Every reading of "end" today and tomorrow, both sides of a clock change (fold), compared
    # in UTC: two times in one zone compare by wall clock, which on the night the clocks go
    # back would put the window's end before `moment` or skip its second occurrence.
    candidates = (
        datetime.combine(d, end, tzinfo=zone).replace(fold=fold).astimezone(UTC)
        for d in (day, day + timedelta(days=1))
        for fold in (0, 1)
    )
    return min(c for c in candidates if c > moment)


def quiet_until(
    at: float, zones: list[str] | tuple[str, ...], window: tuple[dtime, dtime] | None
) -> float | None:
    """When a non-urgent message planned for `at` may go, or None if it may go at `at`.

    A number can map to several zones; the message goes only when *every* one of them is
    outside the quiet window, so we move to the latest window end and check again.
    """
    if window is None or not zones:
        return None
    start, end = window
    tzs = [ZoneInfo(z) for z in zones]
    moment = datetime.fromtimestamp(at, UTC)
    moved = False
    for _ in range(8):  # converges in one or two steps for real zone sets
        quiet = [tz for tz in tzs if _in_window(moment.astimezone(tz).time(), start, end)]
        if not quiet:
            break
        moment = max(_window_end_after(moment, tz, end) for tz in quiet)
        moved = True
    return moment.timestamp() if moved else None
