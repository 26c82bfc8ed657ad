"""Consent: folding the append-only ledger into a state; policy: quiet hours across zones."""

from __future__ import annotations

from datetime import UTC, datetime
from datetime import time as dtime
from zoneinfo import ZoneInfo

import pytest

from txsms.core import consent
from txsms.core.policy import quiet_until

# --- consent.state


STOP = ("all", "opt_out")
START = ("all", "opt_in")
MARKETING_IN = ("marketing", "opt_in")
MARKETING_OUT = ("marketing", "opt_out")

FOLDS = [
    # (ledger entries oldest first, transactional, marketing)
    pytest.param([], "allowed", "not_opted_in", id="nothing recorded"),
    pytest.param([STOP], "opted_out", "opted_out", id="stop"),
    pytest.param([STOP, START], "allowed", "not_opted_in", id="start after stop"),
    pytest.param([START], "allowed", "not_opted_in", id="start alone"),
    pytest.param([MARKETING_IN], "allowed", "opted_in", id="marketing opt-in"),
    pytest.param([MARKETING_IN, STOP], "opted_out", "opted_out", id="marketing opt-in then stop"),
    pytest.param(
        [MARKETING_IN, STOP, START],
        "allowed",
        "not_opted_in",  # START does not bring marketing back: that needs a fresh opt-in
        id="marketing opt-in, stop, start",
    ),
    pytest.param(
        [MARKETING_IN, STOP, START, MARKETING_IN],
        "allowed",
        "opted_in",
        id="fresh marketing opt-in after start",
    ),
    pytest.param([MARKETING_OUT], "allowed", "opted_out", id="marketing opt-out only"),
    pytest.param(
        [MARKETING_IN, MARKETING_OUT], "allowed", "opted_out", id="marketing opt-in then out"
    ),
    pytest.param([MARKETING_IN, START], "allowed", "opted_in", id="start keeps an existing opt-in"),
    pytest.param([STOP, STOP, START], "allowed", "not_opted_in", id="repeated stop"),
]


def record(runtime, index: str, entries, *, start: float = 1_000.0) -> None:
    with runtime.engine.begin() as conn:
        for i, (scope, action) in enumerate(entries):
            consent.record(
                conn,
                runtime.vault,
                index,
                scope=scope,
                action=action,
                source="test",
                evidence={"step": i},
                at=start + i,
            )


def state_of(runtime, index: str) -> consent.ConsentState:
    with runtime.engine.connect() as conn:
        return consent.state(conn, index)


@pytest.mark.parametrize(("entries", "transactional", "marketing"), FOLDS)
def test_state_folds_the_ledger(runtime, entries, transactional, marketing):
    index = runtime.vault.index("+14155550100")
    record(runtime, index, entries)
    record(runtime, runtime.vault.index("+14155550199"), [STOP])  # someone else's STOP
    state = state_of(runtime, index)
    assert (state.transactional, state.marketing) == (transactional, marketing)
    assert state.opted_out is (transactional == "opted_out")


def test_state_folds_by_time_not_by_insertion_order(runtime):
    # A delivery that arrives late (a platform's consent event, replayed) carries its own time.
    index = runtime.vault.index("+14155550100")
    with runtime.engine.begin() as conn:
        consent.record(conn, runtime.vault, index, scope="all", action="opt_out", source="a", at=20)
        consent.record(conn, runtime.vault, index, scope="all", action="opt_in", source="b", at=10)
    assert state_of(runtime, index).transactional == "opted_out"


def test_ledger_keeps_every_entry_with_its_evidence_oldest_first(runtime):
    index = runtime.vault.index("+14155550100")
    record(runtime, index, [MARKETING_IN, STOP, START])
    with runtime.engine.connect() as conn:
        entries = consent.ledger(conn, runtime.vault, index)
    assert [(e["scope"], e["action"], e["source"], e["evidence"], e["at"]) for e in entries] == [
        ("marketing", "opt_in", "test", {"step": 0}, 1000.0),
        ("all", "opt_out", "test", {"step": 1}, 1001.0),
        ("all", "opt_in", "test", {"step": 2}, 1002.0),
    ]


@pytest.mark.parametrize(("scope", "action"), [("everything", "opt_out"), ("all", "stop")])
def test_record_refuses_unknown_scopes_and_actions(runtime, scope, action):
    index = runtime.vault.index("+14155550100")
    with pytest.raises(ValueError), runtime.engine.begin() as conn:
        consent.record(conn, runtime.vault, index, scope=scope, action=action, source="x")
    with runtime.engine.connect() as conn:
        assert consent.ledger(conn, runtime.vault, index) == []


def test_category_preferences_switch_off_and_on(runtime):
    index = runtime.vault.index("+14155550100")

    def off() -> set[str]:
        with runtime.engine.connect() as conn:
            return consent.disabled_categories(conn, index)

    assert off() == set()
    with runtime.engine.begin() as conn:
        consent.set_preference(conn, index, "shipping", False)
        consent.set_preference(conn, index, "orders", False)
    assert off() == {"shipping", "orders"}
    with runtime.engine.begin() as conn:
        consent.set_preference(conn, index, "shipping", True)
        consent.set_preference(conn, index, "orders", False)  # again: still one row
    assert off() == {"orders"}


# --- policy.quiet_until

NY, LA = "America/New_York", "America/Los_Angeles"
NIGHT = (dtime(21, 0), dtime(8, 0))  # wraps midnight
LUNCH = (dtime(12, 0), dtime(14, 0))  # does not


def at(zone: str, *args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=ZoneInfo(zone), fold=fold).timestamp()


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


QUIET = [
    # (planned local time in New York, window, expected local time in New York)
    pytest.param((2025, 6, 10, 23, 0), NIGHT, (2025, 6, 11, 8, 0), id="wrapping: evening"),
    pytest.param((2025, 6, 11, 3, 0), NIGHT, (2025, 6, 11, 8, 0), id="wrapping: after midnight"),
    pytest.param((2025, 6, 10, 21, 0), NIGHT, (2025, 6, 11, 8, 0), id="wrapping: at the start"),
    pytest.param((2025, 6, 11, 7, 59), NIGHT, (2025, 6, 11, 8, 0), id="wrapping: a minute left"),
    pytest.param((2025, 6, 10, 13, 0), LUNCH, (2025, 6, 10, 14, 0), id="non-wrapping"),
    pytest.param((2025, 6, 10, 12, 0), LUNCH, (2025, 6, 10, 14, 0), id="non-wrapping: start"),
    # DST days: the window ends at 08:00 on the wall clock, whatever the offset did overnight.
    pytest.param((2025, 3, 9, 1, 0), NIGHT, (2025, 3, 9, 8, 0), id="spring forward"),
    pytest.param((2025, 3, 8, 22, 0), NIGHT, (2025, 3, 9, 8, 0), id="spring forward, evening"),
    pytest.param((2025, 11, 1, 23, 0), NIGHT, (2025, 11, 2, 8, 0), id="fall back, evening"),
    pytest.param((2025, 11, 2, 1, 30), NIGHT, (2025, 11, 2, 8, 0), id="fall back, 01:30"),
]


@pytest.mark.parametrize(("planned", "window", "expected"), QUIET)
def test_quiet_hours_defer_to_the_window_end(planned, window, expected):
    result = quiet_until(at(NY, *planned), [NY], window)
    assert result == at(NY, *expected)
    assert isinstance(result, float)


def test_dst_days_in_new_york_in_utc():
    # 01:00 EST on 2025-03-09 -> 08:00 EDT (12:00 UTC, not 13:00); on 2025-11-02 the other way.
    assert quiet_until(utc(2025, 3, 9, 6, 0), [NY], NIGHT) == utc(2025, 3, 9, 12, 0)
    assert quiet_until(utc(2025, 11, 2, 5, 30), [NY], NIGHT) == utc(2025, 11, 2, 13, 0)


@pytest.mark.parametrize(
    "planned",
    [(2025, 6, 10, 8, 0), (2025, 6, 10, 12, 0), (2025, 6, 10, 20, 59)],
    ids=["at the end", "midday", "just before the start"],
)
def test_outside_the_window_is_none(planned):
    assert quiet_until(at(NY, *planned), [NY], NIGHT) is None


def test_non_wrapping_window_end_is_outside():
    assert quiet_until(at(NY, 2025, 6, 10, 14, 0), [NY], LUNCH) is None
    assert quiet_until(at(NY, 2025, 6, 10, 11, 59), [NY], LUNCH) is None
    assert quiet_until(at(NY, 2025, 6, 10, 23, 0), [NY], LUNCH) is None


def test_no_window_or_no_zone_is_none():
    moment = at(NY, 2025, 6, 10, 23, 0)  # inside NIGHT
    assert quiet_until(moment, [NY], None) is None
    assert quiet_until(moment, [], NIGHT) is None


@pytest.mark.parametrize("zones", [[NY, LA], [LA, NY]], ids=["NY+LA", "LA+NY"])
def test_several_zones_wait_for_the_latest_window_end(zones):
    # 07:30 in New York is 04:30 in Los Angeles: both quiet; LA's 08:00 is the later end.
    assert quiet_until(at(NY, 2025, 6, 11, 7, 30), zones, NIGHT) == at(LA, 2025, 6, 11, 8, 0)
    # 23:30 in New York is 20:30 in Los Angeles: only NY is quiet, but NY's 08:00 is 05:00 in
    # LA, inside LA's window; the message waits for LA's 08:00.
    assert quiet_until(at(NY, 2025, 6, 11, 23, 30), zones, NIGHT) == at(LA, 2025, 6, 12, 8, 0)
    # 10:00 in New York is 07:00 in Los Angeles: only LA is quiet.
    assert quiet_until(at(NY, 2025, 6, 11, 10, 0), zones, NIGHT) == at(LA, 2025, 6, 11, 8, 0)
    # 12:00 in New York, 09:00 in Los Angeles: nobody is quiet.
    assert quiet_until(at(NY, 2025, 6, 11, 12, 0), zones, NIGHT) is None


def test_the_result_is_never_inside_any_zones_window():
    zones = [NY, LA, "America/Chicago", "Europe/London"]
    for hour in range(24):
        planned = utc(2025, 6, 11, hour, 15)
        result = quiet_until(planned, zones, NIGHT)
        if result is None:
            continue
        assert result > planned
        for zone in zones:
            local = datetime.fromtimestamp(result, ZoneInfo(zone)).time()
            assert not (local >= NIGHT[0] or local < NIGHT[1]), (hour, zone, local)


def test_fall_back_night_never_moves_a_message_into_the_past():
    # 2025-11-02 01:10 EST (the second 01:10, 06:10 UTC) is inside 00:00-01:15 in New York;
    # the first 01:15 (EDT, 05:15 UTC) is already over, so the end is the second one.
    planned = at(NY, 2025, 11, 2, 1, 10, fold=1)
    assert planned == utc(2025, 11, 2, 6, 10)
    result = quiet_until(planned, [NY], (dtime(0, 0), dtime(1, 15)))
    assert result is not None and result > planned


def test_fall_back_night_ends_the_window_at_its_second_occurrence():
    planned = at(NY, 2025, 11, 2, 1, 10, fold=1)
    result = quiet_until(planned, [NY], (dtime(0, 0), dtime(1, 15)))
    assert result == utc(2025, 11, 2, 6, 15)  # 01:15 EST, not 2025-11-03 06:15 UTC


def test_numbers_reads_recipient_ledger_and_preferences_of_many_in_one_query(runtime):
    from txsms.core.storage import recipients

    ada, bob, new = (runtime.vault.index(f"+1415555010{n}") for n in range(3))
    with runtime.engine.begin() as conn:
        for index, reason, footer in ((ada, None, 5.0), (bob, "provider:30006", None)):
            conn.execute(
                recipients.insert().values(
                    phone_index=index,
                    invalid_reason=reason,
                    footer_sent_at=footer,
                    created_at=1.0,
                    updated_at=1.0,
                )
            )
        # Ada: STOP, then START (recorded out of order), then marketing in; orders switched off.
        consent.record(conn, runtime.vault, ada, scope="all", action="opt_in", source="t", at=20)
        consent.record(conn, runtime.vault, ada, scope="all", action="opt_out", source="t", at=10)
        consent.record(
            conn, runtime.vault, ada, scope="marketing", action="opt_in", source="t", at=30
        )
        consent.set_preference(conn, ada, "orders", False)
        consent.set_preference(conn, ada, "shipping", True)
        consent.record(conn, runtime.vault, bob, scope="all", action="opt_out", source="t", at=10)
    with runtime.engine.connect() as conn:
        found = consent.numbers(conn, [ada, bob, new, ada])
    assert set(found) == {ada, bob, new}
    a, b, n = found[ada], found[bob], found[new]
    assert (a.known, a.invalid_reason, a.footer_sent_at, a.off) == (
        True,
        None,
        5.0,
        frozenset({"orders"}),
    )
    assert (a.consent.transactional, a.consent.marketing) == ("allowed", "opted_in")
    assert (b.known, b.invalid_reason, b.consent.opted_out, b.off) == (
        True,
        "provider:30006",
        True,
        frozenset(),
    )
    assert (n.known, n.invalid_reason, n.footer_sent_at, n.consent.opted_out, n.off) == (
        False,
        None,
        None,
        False,
        frozenset(),
    )
