"""The CRM poller against a fake HubSpot and a fake generic JSON API over real HTTP, on SQLite
and PostgreSQL: cursors that lose nothing, mapping rules, reminders that follow the record."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import INDEX_KEY, KEY, make_config, twilio_section
from fakes import wait_until
from fakes.hubspot import FakeHubSpot
from fakes.jsonapi import FakeJsonApi, Reply
from sqlalchemy import select
from test_serve import Server

from txsms.connectors import crm
from txsms.connectors.crm.mapping import Mapper, Record, rules_of
from txsms.connectors.crm.poller import CrmError, Poller
from txsms.core import consent
from txsms.core.config import config_from_mapping, load_config
from txsms.core.errors import ConfigError
from txsms.core.runtime import Runtime
from txsms.core.storage import cursors, events, messages
from txsms.core.worker import Worker

TXSMS = str(Path(sys.executable).parent / "txsms")
PHONE = "+14155550100"
DEAL_RULE = {
    "event": "order.paid",
    "when": {"field": "properties.dealstage", "changed_to": "closedwon"},
    "phone": "properties.phone",
    "data": {"order.number": "properties.dealname", "order.total": "properties.amount"},
}
CONSENT_RULE = {
    "event": "customer.consent",
    "when": {"field": "properties.sms_consent", "changed_to": False},
    "consent": "opt_out",
    "phone": ["properties.mobilephone", "properties.phone"],
}


@pytest.fixture
def crm_runtime(tmp_path, database_url):
    """Runtimes with `[[crm]]` entries (validated like a file's) on the test's database."""
    made: list[Runtime] = []

    def build(*entries: dict, **sections) -> Runtime:
        base = make_config(tmp_path, database_url, **sections)
        runtime = Runtime(replace(base, crm=config_from_mapping({"crm": list(entries)}).crm))
        runtime.prepare_database(migrate=True)
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.close()


def hubspot(hub: FakeHubSpot, **extra) -> dict:
    entry = {
        "name": "deals",
        "kind": "hubspot",
        "token": hub.token,
        "base_url": hub.url,
        "object": "deals",
        "rate_per_second": 50,
        "overlap_seconds": 10,
        "mapping": [DEAL_RULE],
    }
    return {**entry, **extra}


def crash_once(save):
    """A Poller._save that dies the first time: the batch is committed, the cursor is not."""
    calls = []

    def save_or_crash(self, state, memory):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("power cut")
        return save(self, state, memory)

    return save_or_crash


def busiest_second(times: list[float]) -> int:
    """The most requests that arrived within any one second."""
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times)


def rows(runtime: Runtime, kind: str | None = None) -> list:
    query = select(messages).order_by(messages.c.send_at)
    if kind:
        query = query.where(messages.c.kind == kind)
    with runtime.engine.connect() as conn:
        return conn.execute(query).all()


def event_keys(runtime: Runtime) -> list[str]:
    with runtime.engine.connect() as conn:
        return sorted(conn.execute(select(events.c.key)).scalars())


# --- configuration -------------------------------------------------------------------------


README_HUBSPOT = """
[[crm]]
name = "deals"
kind = "hubspot"
token = "${HUBSPOT_TOKEN}"
object = "deals"
interval_seconds = 60
associations = { contacts = ["phone", "firstname", "hs_language"] }

[crm.defaults]
phone = "associations.contacts.0.properties.phone"
name = "associations.contacts.0.properties.firstname"
locale = "associations.contacts.0.properties.hs_language"

[[crm.mapping]]
event = "order.paid"
when = { field = "properties.dealstage", changed_to = "closedwon" }
data = { "order.number" = "properties.dealname", "order.total" = "properties.amount" }
"""


def test_a_crm_file_loads_into_plain_dicts_with_durations_in_seconds(tmp_path):
    path = tmp_path / "txsms.toml"
    path.write_text(
        README_HUBSPOT
        + """
[[crm]]
name = "clinic"
kind = "http"
url = "https://clinic.example/api/appointments"
auth = { type = "basic", username = "txsms", password = "${CLINIC_PASSWORD}" }
items_path = "data"
cursor_param = "updated_since"

[[crm.mapping]]
event = "appointment.reminder"
starts_at = "starts_at"
reminders = ["24h", "90m", 30]
"""
    )
    config = load_config(path, environ={"HUBSPOT_TOKEN": "pat-x", "CLINIC_PASSWORD": "pw"})
    deals, clinic = config.crm
    assert isinstance(deals, dict) and deals["token"] == "pat-x"
    assert deals["mapping"][0]["when"] == [
        {"field": "properties.dealstage", "changed_to": "closedwon"}
    ]
    assert deals["defaults"]["phone"] == ["associations.contacts.0.properties.phone"]
    assert clinic["mapping"][0]["reminders"] == [86400, 5400, 30]
    assert clinic["auth"]["password"] == "pw"


@pytest.mark.parametrize(
    "entry, key, problem",
    [
        ({"kind": "hubspot"}, "crm.0.token", "required"),
        ({"kind": "http"}, "crm.0.url", "required"),
        ({"kind": "hubspot", "token": "t", "url": "https://x.example"}, "crm.0.url", "only for"),
        ({"kind": "hubspot", "token": "t", "page_size": 500}, "crm.0.page_size", "200"),
        ({"kind": "hubspot", "token": "t", "intervl_seconds": 5}, "crm.0.intervl_seconds", "did"),
        (
            {"kind": "hubspot", "token": "t", "mapping": [{"event": "order.payd"}]},
            "crm.0.mapping.0.event",
            "did you mean 'order.paid'",
        ),
        (
            {"kind": "hubspot", "token": "t", "mapping": [DEAL_RULE, {"event": "order.paid"}]},
            "crm.0.mapping.1.key",
            "give both rules a key",
        ),
        (
            {
                "kind": "hubspot",
                "token": "t",
                "mapping": [{"event": "order.paid", "when": {"field": "a", "equals": 1, "in": []}}],
            },
            "crm.0.mapping.0.when",
            "exactly one of",
        ),
        (
            {
                "kind": "hubspot",
                "token": "t",
                "mapping": [{"event": "order.paid", "when": [{"field": "a", "equls": 1}]}],
            },
            "crm.0.mapping.0.when.0.equls",
            "did you mean 'equals'",
        ),
        (
            {
                "kind": "hubspot",
                "token": "t",
                "mapping": [{"event": "appointment.reminder", "reminders": ["2h"]}],
            },
            "crm.0.mapping.0.starts_at",
            "required",
        ),
        (
            {
                "kind": "hubspot",
                "token": "t",
                "mapping": [
                    {"event": "appointment.reminder", "starts_at": "s", "reminders": ["2x"]}
                ],
            },
            "crm.0.mapping.0.reminders.0",
            "duration",
        ),
        (
            {"kind": "hubspot", "token": "t", "mapping": [{"event": "customer.consent"}]},
            "crm.0.mapping.0.consent",
            "required",
        ),
        (
            {
                "kind": "http",
                "url": "https://x.example",
                "auth": {"type": "basic", "username": "u"},
            },
            "crm.0.auth.password",
            "required",
        ),
        (
            {
                "kind": "http",
                "url": "https://x.example",
                "mapping": [{"event": "order.paid", "data": {"order": {"number": 5}}}],
            },
            "crm.0.mapping.0.data.order.number",
            "field path",
        ),
        (
            {
                "kind": "http",
                "url": "https://x.example",
                "mapping": [{"event": "order.paid", "key": "x"}],
            },
            "crm.0.mapping.0.key",
            "{id}",
        ),
    ],
)
def test_bad_crm_entries_name_the_dotted_key(entry, key, problem):
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"crm": [{"name": "c", **entry}]})
    assert info.value.key == key
    assert problem in info.value.problem


# --- mapping rules, as data --------------------------------------------------------------------


def deal(stage: str, modified_ms: int = 1000, rid: str = "42") -> Record:
    props = {"dealstage": stage, "phone": PHONE, "dealname": "Big deal", "amount": "120"}
    return Record(rid, modified_ms, {"id": rid, "properties": props})


def mapper(*rules: dict) -> Mapper:
    entry = config_from_mapping(
        {"crm": [{"name": "x", "kind": "http", "url": "https://x.example", "mapping": list(rules)}]}
    ).crm[0]
    return Mapper("crm:x", "deal", rules_of(entry))


def test_changed_to_fires_on_the_change_and_a_second_win_has_the_same_key():
    m = mapper(DEAL_RULE)
    first, memory = m.events(deal("closedwon"), None, time.time())  # never seen: a change
    assert [(e.kind, e.key) for e in first] == [("order.paid", "deal:42:order.paid")]
    assert first[0].data == {"order": {"number": "Big deal", "total": "120"}}
    assert first[0].recipient.phone == PHONE and first[0].order.ref == "deal:42"
    again, memory = m.events(deal("closedwon", 2000), memory, time.time())
    assert again == []  # re-read, or changed elsewhere: the stage did not change
    _, memory = m.events(deal("closedlost", 3000), memory, time.time())
    won_twice, _ = m.events(deal("closedwon", 4000), memory, time.time())
    assert [e.key for e in won_twice] == ["deal:42:order.paid"]  # collides: sent once


def test_consent_flipping_false_true_false_opts_out_twice():
    m = mapper(CONSENT_RULE)

    def contact(value: str, ms: int) -> Record:
        return Record("7", ms, {"id": "7", "properties": {"sms_consent": value, "phone": PHONE}})

    memory, keys = None, []
    for value, ms in (("false", 1000), ("false", 1500), ("true", 2000), ("false", 3000)):
        out, memory = m.events(contact(value, ms), memory, time.time())
        keys += [e.key for e in out]
    assert keys == ["deal:7:customer.consent:1000", "deal:7:customer.consent:3000"]
    out, _ = m.events(contact("false", 5000), None, time.time())
    assert out[0].consent.action == "opt_out" and out[0].consent.scope == "all"
    assert out[0].consent.evidence["fields"] == {"properties.sms_consent": "false"}


@pytest.mark.parametrize(
    "when, fires",
    [
        ({"field": "properties.dealstage", "equals": "ClosedWon"}, True),
        ({"field": "properties.dealstage", "not_equals": "closedwon"}, False),
        ({"field": "properties.dealstage", "in": ["closedlost", "closedwon"]}, True),
        ({"field": "properties.amount", "present": True}, True),
        ({"field": "properties.missing", "present": True}, False),
        ({"field": "properties.missing", "present": False}, True),
        ([{"field": "properties.amount", "equals": 120}, {"field": "id", "equals": "42"}], True),
    ],
)
def test_conditions(when, fires):
    out, _ = mapper({**DEAL_RULE, "when": when}).events(deal("closedwon"), None, time.time())
    assert bool(out) is fires


def appointment(status: str, starts: float, ms: int) -> Record:
    props = {"status": status, "starts_at": iso_z(starts), "phone": PHONE}
    return Record("9", ms, {"id": "9", "properties": props})


def iso_z(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def test_a_schedule_moved_and_moved_back_cancels_and_queues_each_time():
    m = mapper(
        {
            "event": "appointment.reminder",
            "starts_at": "properties.starts_at",
            "reminders": ["1h"],
            "when": {"field": "properties.status", "equals": "booked"},
        },
        {
            "event": "appointment.cancelled",
            "when": {"field": "properties.status", "changed_to": "cancelled"},
        },
    )
    t1, t2 = time.time() + 86400, time.time() + 2 * 86400
    seen, memory = [], None
    for status, starts, ms in (
        ("booked", t1, 1),
        ("booked", t1, 2),  # another field changed: nothing to do
        ("booked", t2, 3),
        ("booked", t1, 4),  # moved back: new keys, or the cancelled rows would block them
        ("cancelled", t1, 5),
    ):
        out, memory = m.events(appointment(status, starts, ms), memory, time.time())
        seen.append([(e.kind, e.data.get("reason")) for e in out])
    assert seen == [
        [("appointment.reminder", None)],
        [],
        [("messages.cancel", "appointment_moved"), ("appointment.reminder", None)],
        [("messages.cancel", "appointment_moved"), ("appointment.reminder", None)],
        [("messages.cancel", "appointment_cancelled"), ("appointment.cancelled", None)],
    ]


def test_a_cancellation_queues_no_reminders_even_if_their_rule_still_matches():
    m = mapper(
        {"event": "appointment.reminder", "starts_at": "properties.starts_at", "reminders": [60]},
        {
            "event": "appointment.cancelled",
            "when": {"field": "properties.status", "changed_to": "cancelled"},
        },
    )
    t = time.time() + 86400
    _, memory = m.events(appointment("booked", t, 1), None, time.time())
    out, _ = m.events(appointment("cancelled", t + 60, 2), memory, time.time())
    assert [e.kind for e in out] == ["messages.cancel", "appointment.cancelled"]


def test_a_reminder_already_due_is_recorded_as_skipped_not_sent_late():
    m = mapper(
        {
            "event": "appointment.reminder",
            "starts_at": "properties.starts_at",
            "reminders": ["24h", "1h"],
        }
    )
    out, _ = m.events(appointment("booked", time.time() + 7200, 1), None, time.time())
    assert [(e.key.split(":")[3], e.skip) for e in out] == [
        ("86400s", "reminder_past"),
        ("3600s", None),
    ]
    assert out[1].send_at == pytest.approx(time.time() + 3600, abs=5)


# --- HubSpot --------------------------------------------------------------------------------


def test_every_qualifying_record_once_across_polls_late_records_429_and_a_crash(
    crm_runtime, monkeypatch
):
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, page_size=4, rate_per_second=20))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        assert poller.run_once().armed  # first run: no backfill
        old = hub.upsert("deals", dealstage="closedwon", phone=PHONE, modified=time.time() - 60)
        won = [hub.upsert("deals", dealstage="closedwon", phone=PHONE) for _ in range(6)]
        lost = [hub.upsert("deals", dealstage="closedlost", phone=PHONE) for _ in range(5)]
        # Updated now, but search shows the update only in 1.5 s: the next poll misses it.
        late = hub.upsert("deals", dealstage="closedwon", phone=PHONE, visible_after=1.5)
        time.sleep(0.05)  # not a wait: the next record must be modified after `late`
        hub.upsert("deals", dealstage="closedlost", phone=PHONE)  # moves the cursor past `late`
        hub.script(Reply(429, headers={"Retry-After": "1"}))

        # A crash after the first page's batch was committed, before the cursor was saved.
        monkeypatch.setattr(Poller, "_save", crash_once(Poller._save))
        with pytest.raises(RuntimeError):
            poller.run_once()
        retried = [r.at for r in hub.searches]
        assert retried[1] - retried[0] >= 1.0  # Retry-After: 1 was honoured
        committed = len(rows(runtime))
        assert committed > 0

        restarted = crm.make_poller(runtime, runtime.config.crm[0])  # a new process
        again = restarted.run_once()
        assert again.handled >= 4  # the page whose cursor was not saved is read again
        # The rest of `won`, and `late` once search shows it (already, on a slow machine).
        accepted = [again.accepted]
        wait_until(
            lambda: (
                accepted.append(restarted.run_once().accepted)
                or sum(accepted) == len(won) - committed + 1
            ),
            timeout=5,
        )
        for _ in range(2):
            assert restarted.run_once().accepted == 0

    paid = {r.idempotency_key.split("|")[1] for r in rows(runtime, "order.paid")}
    assert paid == {f"deal:{i}:order.paid" for i in [*won, late]}
    assert event_keys(runtime) == sorted(paid)  # one event per qualifying deal
    assert len(rows(runtime)) == len(won) + 1  # nothing for lost deals, nothing twice
    assert old not in {k.split(":")[1] for k in paid}  # modified before the cursor was armed
    assert not set(lost) & {k.split(":")[1] for k in paid}


def test_requests_never_exceed_the_configured_rate(crm_runtime):
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, page_size=2, rate_per_second=5))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        t = time.time()
        for n in range(8):
            hub.upsert("deals", dealstage="closedwon", phone=PHONE, modified=t + n / 100)
        assert poller.run_once().handled == 8
    times = [r.at for r in hub.searches]
    assert len(times) >= 6 and busiest_second(times) <= 5  # as HubSpot counts: per second
    assert (times[-1] - times[0]) / (len(times) - 1) >= 0.2


def test_more_than_10000_changed_records_are_read_without_passing_the_cap(crm_runtime):
    rule = {**DEAL_RULE, "when": {"field": "properties.dealstage", "equals": "closedwon"}}
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, rate_per_second=200, mapping=[rule]))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        start = time.time()
        for n in range(10_050):
            stage = "closedwon" if n % 500 == 0 else "x"
            hub.upsert("deals", dealstage=stage, phone=PHONE, modified=start + n / 10000)
        result = poller.run_once()
    assert result.handled == 10_050  # every record once, none twice
    assert len(rows(runtime, "order.paid")) == len(range(0, 10_050, 500))
    bodies = [r.json for r in hub.searches]
    assert all(b["limit"] == 200 and "after" not in b for b in bodies)  # never near the cap
    starts = [int(b["filterGroups"][0]["filters"][0]["value"]) for b in bodies]
    assert starts == sorted(starts) and 51 <= len(bodies) <= 55  # from the last seen, each


def test_a_full_page_in_one_millisecond_is_read_by_object_id(crm_runtime):
    rule = {**DEAL_RULE, "when": {"field": "properties.dealstage", "equals": "closedwon"}}
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, page_size=100, mapping=[rule]))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        same = time.time()
        for n in range(250):  # a bulk import: more than a page in one millisecond
            hub.upsert("deals", dealstage="closedwon" if n % 10 == 0 else "x", modified=same)
        hub.upsert("deals", dealstage="closedwon", modified=same + 1)
        result = poller.run_once()
    assert result.handled == 251
    assert len(rows(runtime, "order.paid")) == 26
    by_id = [r.json for r in hub.searches if r.json["sorts"][0]["propertyName"] == "hs_object_id"]
    assert len(by_id) == 3


def test_a_deal_updated_while_the_poller_pages_does_not_hide_another(crm_runtime):
    # With offset paging, updating a record already passed shifts the rest one place forward
    # and the record at the page boundary is never returned. Keyset paging cannot skip it.
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, page_size=2, overlap_seconds=0))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        t = time.time()
        ids = [
            hub.upsert("deals", dealstage="closedwon", phone=PHONE, modified=t + n / 100)
            for n in range(6)
        ]
        original = poller.source._search

        def search_then_update(filters, sort):
            page = original(filters, sort)
            if len(hub.searches) == 1:
                hub.upsert("deals", ids[0], amount="5")  # moves to the end of the index
            return page

        poller.source._search = search_then_update
        poller.run_once()
    assert len(rows(runtime, "order.paid")) == 6


def test_a_deal_is_addressed_through_its_associated_contact(crm_runtime):
    with FakeHubSpot() as hub:
        contact = hub.upsert("contacts", phone=PHONE, firstname="Ada", hs_language="fr")
        runtime = crm_runtime(
            hubspot(
                hub,
                associations={"contacts": ["phone", "firstname", "hs_language"]},
                defaults={
                    "phone": "associations.contacts.0.properties.phone",
                    "name": "associations.contacts.0.properties.firstname",
                    "locale": "associations.contacts.0.properties.hs_language",
                },
                mapping=[{k: v for k, v in DEAL_RULE.items() if k != "phone"}],
            ),
            templates={
                "order.paid": {
                    "body": "Paid {{ order.number }}",
                    "locales": {"fr": "Payé {{ order.number }}, {{ customer.first_name }}"},
                }
            },
        )
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        d = hub.upsert("deals", dealstage="closedwon", dealname="#77")
        hub.associate("deals", d, "contacts", contact)
        poller.run_once()
    [row] = rows(runtime, "order.paid")
    assert row.status == "pending" and runtime.vault.decrypt(row.to_enc) == PHONE
    assert runtime.vault.decrypt(row.body_enc).startswith("Payé #77, Ada")


def test_a_contact_unticking_sms_consent_is_an_opt_out_in_the_ledger(crm_runtime):
    with FakeHubSpot() as hub:
        entry = hubspot(hub, name="contacts", object="contacts", mapping=[CONSENT_RULE])
        runtime = crm_runtime(entry)
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        c = hub.upsert("contacts", mobilephone=PHONE, sms_consent="true")
        poller.run_once()
        hub.upsert("contacts", c, sms_consent="false")
        poller.run_once()
        poller.run_once()
    index = runtime.vault.index(PHONE)
    with runtime.engine.connect() as conn:
        assert consent.state(conn, index).opted_out
        ledger = consent.ledger(conn, runtime.vault, index)
    assert [(e["action"], e["source"]) for e in ledger] == [("opt_out", "crm:contacts")]


def test_several_sources_run_side_by_side_as_serve_jobs(crm_runtime):
    with FakeHubSpot() as hub:
        runtime = crm_runtime(
            hubspot(hub),
            hubspot(hub, name="contacts", object="contacts", mapping=[CONSENT_RULE]),
            hubspot(hub, name="off", enabled=False),
        )
        jobs = crm.background_jobs(runtime)  # arms both cursors
        assert [j.name for j in jobs] == ["crm-deals", "crm-contacts"]
        hub.upsert("deals", dealstage="closedwon", phone=PHONE)
        hub.upsert("contacts", phone="+14155550199", sms_consent="false")
        threads = [threading.Thread(target=j.run) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(rows(runtime, "order.paid")) == 1
    with runtime.engine.connect() as conn:
        assert consent.state(conn, runtime.vault.index("+14155550199")).opted_out
        names = set(conn.execute(select(cursors.c.name)).scalars())
    assert {"crm:deals", "crm:contacts"} <= names and "crm:off" not in names


def test_a_wrong_token_fails_the_run_and_keeps_the_cursor(crm_runtime):
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub, token="pat-wrong"))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        before = poller.state()
        with pytest.raises(CrmError, match="401: INVALID_AUTHENTICATION"):
            poller.run_once()
        assert poller.state() == before


def test_since_reads_back_and_the_keys_keep_it_exactly_once(crm_runtime):
    with FakeHubSpot() as hub:
        runtime = crm_runtime(hubspot(hub))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        hub.upsert("deals", dealstage="closedwon", phone=PHONE, modified=time.time() - 3600)
        assert poller.run_once().armed
        assert poller.run_once().handled == 0  # armed at now: the old deal is not backfilled
        since = datetime.fromtimestamp(time.time() - 7200, UTC)
        assert poller.run_once(since).accepted == 1
        assert poller.run_once(since).accepted == 0
    assert len(rows(runtime)) == 1


# --- a generic JSON API -------------------------------------------------------------------------


def http_entry(api: FakeJsonApi, auth: dict, **extra) -> dict:
    entry = {
        "name": "shop",
        "kind": "http",
        "url": f"{api.url}/api/records",
        "auth": auth,
        "items_path": "data",
        "modified_path": "updated_at",
        "cursor_param": "updated_since",
        "params": {"per_page": "3"},
        "overlap_seconds": 10,
        "rate_per_second": 20,
        "mapping": [
            {
                "event": "order.paid",
                "when": {"field": "status", "changed_to": "paid"},
                "phone": "customer.phone",
                "name": "customer.name",
                "data": {"order": {"number": "number"}},
            }
        ],
    }
    return {**entry, **extra}


def test_generic_api_with_link_paging_and_basic_auth_loses_nothing(crm_runtime, monkeypatch):
    with FakeJsonApi(auth=("basic", "txsms", "pw-0123456789")) as api:
        auth = {"type": "basic", "username": "txsms", "password": "pw-0123456789"}
        runtime = crm_runtime(http_entry(api, auth))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        assert poller.run_once().armed
        for n in range(7):
            api.upsert(
                str(n),
                status="paid" if n % 2 else "open",
                number=f"#{n}",
                customer={"phone": PHONE, "name": "Ada"},
            )
        api.upsert("late", status="paid", customer={"phone": PHONE}, visible_after=1.0)
        time.sleep(0.05)  # not a wait: the next record must be modified after "late"
        api.upsert("after", status="open")
        api.script(Reply(429, {"error": "slow down"}, {"Retry-After": "1"}))

        monkeypatch.setattr(Poller, "_save", crash_once(Poller._save))
        with pytest.raises(RuntimeError):
            poller.run_once()
        restarted = crm.make_poller(runtime, runtime.config.crm[0])
        restarted.run_once()
        # `late` becomes visible after a second: poll until it is in, then once more.
        wait_until(
            lambda: (
                restarted.run_once() is not None
                and any(":late:" in r.idempotency_key for r in rows(runtime))
            ),
            timeout=5,
        )
        restarted.run_once()
    got = sorted(r.idempotency_key.split("|")[1] for r in rows(runtime))
    assert got == sorted(f"record:{i}:order.paid" for i in ("1", "3", "5", "late"))
    pages = [r for r in api.requests if r.query.get("page")]
    assert pages, "the Link header was followed"
    gaps = [b.at - a.at for a, b in itertools.pairwise(api.requests)]
    assert min(gaps) >= 0.7 / 20  # rate_per_second = 20: spaced (network jitter aside), no burst
    assert all(r.headers["Authorization"].startswith("Basic ") for r in api.requests)


@pytest.mark.parametrize(
    "paging, auth, extra",
    [
        ("next_url", ("bearer", "tok-0123456789"), {"next_path": "links.next"}),
        (
            "cursor",
            ("header", "X-Api-Key", "key-0123456789"),
            {"next_path": "meta.next_cursor", "next_param": "cursor"},
        ),
    ],
)
def test_generic_api_body_paging_and_other_auth(crm_runtime, paging, auth, extra):
    conf = (
        {"type": "bearer", "token": auth[1]}
        if auth[0] == "bearer"
        else {"type": "header", "name": auth[1], "value": auth[2]}
    )
    with FakeJsonApi(auth=auth, paging=paging) as api:
        runtime = crm_runtime(http_entry(api, conf, **extra))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        for n in range(8):
            api.upsert(str(n), status="paid", customer={"phone": PHONE})
        assert poller.run_once().accepted == 8
        assert poller.run_once().accepted == 0
    assert len([r for r in api.requests if r.query.get("page") or r.query.get("cursor")]) >= 2


# --- appointments ---------------------------------------------------------------------------


APPOINTMENTS = """
[storage]
url = "{db}"
data_dir = "{tmp}"

[security]
keys = ["{key}"]
index_key = "{index_key}"

[sender]
name = "Clinic"
timezone = "UTC"

[[crm]]
name = "clinic"
kind = "hubspot"
token = "${{HUBSPOT_TOKEN}}"
base_url = "{hub}"
object = "2-3444025"          # a custom object: appointments
record = "appointment"
interval_seconds = 0.3
overlap_seconds = 30

[crm.defaults]
phone = "properties.phone"
name = "properties.firstname"
starts_at = "properties.starts_at"
data = {{ "appointment.location" = "properties.location" }}

[[crm.mapping]]
event = "appointment.booked"
when = {{ field = "properties.status", equals = "booked" }}

[[crm.mapping]]
event = "appointment.reminder"
when = {{ field = "properties.status", equals = "booked" }}
reminders = ["24h", "2h"]

[[crm.mapping]]
event = "appointment.cancelled"
when = {{ field = "properties.status", changed_to = "cancelled" }}

[crm.sample]                  # for `txsms check-config`
id = "1"

[crm.sample.properties]
status = "booked"
phone = "+1 415 555 0100"
firstname = "Ada"
starts_at = "2030-05-04T15:30:00Z"
location = "Main St"
hs_lastmodifieddate = "2030-05-01T09:00:00.000Z"
"""


def appointment_config(tmp_path: Path, hub: FakeHubSpot, db: str) -> Path:
    path = tmp_path / "txsms.toml"
    text = APPOINTMENTS.format(db=db, tmp=tmp_path, key=KEY, index_key=INDEX_KEY, hub=hub.url)
    path.write_text(text)
    return path


def txsms(path: Path, *args: str, env: dict | None = None) -> str:
    done = subprocess.run(
        [TXSMS, *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_booked_moved_cancelled_through_txsms_poll_and_messages_json(tmp_path, database_url):
    with FakeHubSpot() as hub:
        path = appointment_config(tmp_path, hub, database_url)
        env = {"HUBSPOT_TOKEN": hub.token}
        txsms(path, "db", "upgrade", env=env)  # PostgreSQL deployments run this once
        assert "armed" in txsms(path, "poll", "--once", env=env)
        day = 86400
        starts = int(time.time()) + 3 * day  # whole seconds, as `messages --json` shows them
        a = hub.upsert(
            "2-3444025",
            status="booked",
            phone=PHONE,
            firstname="Ada",
            starts_at=int(starts * 1000),
            location="Main St",
        )
        in_an_hour = int((time.time() + 3600) * 1000)  # its reminders' times have passed
        hub.upsert("2-3444025", status="booked", phone="+14155550111", starts_at=in_an_hour)
        assert "6 new event(s)" in txsms(path, "poll", "--once", env=env)
        hub.upsert("2-3444025", a, starts_at=int((starts + day) * 1000))  # moved a day later
        txsms(path, "poll", "--once", env=env)
        hub.upsert("2-3444025", a, status="cancelled")
        txsms(path, "poll", "--once", env=env)
        txsms(path, "poll", "--once", env=env)  # nothing new
        listed = [
            json.loads(line)
            for line in txsms(path, "messages", "--json", "--limit", "100", env=env).splitlines()
        ]

    ada = [m for m in listed if m["to"] == "+1******0100"]
    by_kind: dict[str, list] = {}
    for m in ada:
        by_kind.setdefault(m["kind"], []).append(m)
    assert [m["status"] for m in by_kind["appointment.booked"]] == ["pending"]
    assert [m["status"] for m in by_kind["appointment.cancelled"]] == ["pending"]
    reminders = by_kind["appointment.reminder"]
    assert len(reminders) == 4 and {m["status"] for m in reminders} == {"cancelled"}
    reasons = sorted(m["reason"] for m in reminders)
    assert reasons == ["appointment_cancelled"] * 2 + ["appointment_moved"] * 2
    old_times = {starts - 86400, starts - 7200}
    at_old = [m for m in reminders if datetime.fromisoformat(m["send_at"]).timestamp() in old_times]
    assert len(at_old) == 2 and all(m["reason"] == "appointment_moved" for m in at_old)
    past = [m for m in listed if m["to"] == "+1******0111" and m["kind"] == "appointment.reminder"]
    assert sorted((m["status"], m["reason"]) for m in past) == [("skipped", "reminder_past")] * 2


def test_a_reminder_is_an_outbox_row_the_worker_sends_when_due(crm_runtime, fake_twilio):
    with FakeHubSpot() as hub:
        entry = hubspot(
            hub,
            name="clinic",
            object="2-3444025",
            record="appointment",
            mapping=[
                {
                    "event": "appointment.reminder",
                    "starts_at": "properties.starts_at",
                    "phone": "properties.phone",
                    "reminders": ["2h"],
                }
            ],
        )
        runtime = crm_runtime(entry, provider=twilio_section(fake_twilio))
        poller = crm.make_poller(runtime, runtime.config.crm[0])
        poller.arm()
        hub.upsert("2-3444025", phone=PHONE, starts_at=str(int((time.time() + 7202) * 1000)))
        poller.run_once()
    [row] = rows(runtime)
    assert (row.status, row.reason) == ("deferred", "scheduled")
    worker = Worker(runtime)  # any worker, in any process: the row is the queue
    assert worker.run_once() == 0
    wait_until(lambda: worker.run_once() is not None and fake_twilio.messages, timeout=8)
    assert "appointment" in fake_twilio.messages[0]["body"]


def test_serve_runs_the_enabled_pollers(tmp_path):
    with FakeHubSpot() as hub:
        path = appointment_config(tmp_path, hub, f"sqlite:///{tmp_path / 'txsms.db'}")
        server = Server(tmp_path, path=path, env={"HUBSPOT_TOKEN": hub.token})
        path.write_text(path.read_text() + f"\n[server]\nport = {server.port}\n")
        server.start()
        try:
            time.sleep(0.2)  # not a wait: the record must be modified after the armed cursor
            hub.upsert(
                "2-3444025",
                status="booked",
                phone=PHONE,
                starts_at=int((time.time() + 86400 * 2) * 1000),
            )
            wait_until(
                lambda: any(
                    m["kind"] == "appointment.booked" and m["status"] == "sent"
                    for m in server.messages()
                ),
                timeout=15,
            )
        finally:
            assert server.stop() == 0
    assert "Clinic: Your appointment is booked" in server.out.read_text()


# --- check-config -------------------------------------------------------------------------------


def test_check_prints_what_the_sample_record_makes(tmp_path):
    with FakeHubSpot() as hub:
        path = appointment_config(tmp_path, hub, f"sqlite:///{tmp_path / 'x.db'}")
    config = load_config(path, environ={"HUBSPOT_TOKEN": "pat"})
    lines = crm.check(config)
    text = "\n".join(lines)
    assert lines[0] == "crm:clinic: the sample record 1 makes 3 event(s)"
    assert "appointment.booked     appointment:1:appointment.booked  to +1******0100" in text
    assert "Clinic: Your appointment is booked on May 04, 08:30 at Main St." in text  # 415: Pacific
    assert "at 2030-05-03T15:30:00+00:00" in text and "at 2030-05-04T13:30:00+00:00" in text


def test_check_names_the_rule_a_sample_cannot_satisfy(tmp_path):
    with FakeHubSpot() as hub:
        path = appointment_config(tmp_path, hub, f"sqlite:///{tmp_path / 'x.db'}")
    text = path.read_text()
    bad = '{ field = "properties.state", changed_to = "cancelled" }'
    path.write_text(text.replace('{ field = "properties.status", changed_to = "cancelled" }', bad))
    config = load_config(path, environ={"HUBSPOT_TOKEN": "pat"})
    with pytest.raises(ConfigError) as info:
        crm.check(config)
    assert info.value.key == "crm.0.mapping.2.when.0.field"
    assert "'properties.state' is not in the sample" in info.value.problem


def test_the_readme_examples_load_and_check_prints_what_the_readme_shows(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## CRM and appointment reminders", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")
    configs = [b[len("toml\n") :] for b in blocks[1::2] if b.startswith("toml\n")]
    shown = "\n".join(b for b in blocks[1::2] if b.startswith("\ncrm:"))
    assert len(configs) == 2  # HubSpot, and a generic JSON API
    for n, toml in enumerate(configs):
        path = tmp_path / f"readme{n}.toml"
        path.write_text('[sender]\nname = "Demo Store"\ntimezone = "America/New_York"\n' + toml)
        env = {"HUBSPOT_TOKEN": "pat-na1-x", "CLINIC_API_PASSWORD": "pw"}
        lines = crm.check(load_config(path, environ=env))
        assert lines and all(line in shown for line in lines), lines


def test_check_config_prints_the_events_a_sample_record_makes(tmp_path):
    from click.testing import CliRunner

    from txsms.core.cli import cli

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```toml", readme.index("### HubSpot")) + len("```toml")
    config = readme[start : readme.index("```", start)]
    path = tmp_path / "crm.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/x.db"\n{config}')
    env = {"HUBSPOT_TOKEN": "pat-test-token"}
    result = CliRunner().invoke(cli, ["check-config", "--config", str(path)], env=env)
    assert result.exit_code == 0, result.output
    assert "crm:deals: the sample record 4521 makes 1 event(s)" in result.output
    assert "Payment received for your order #4521" in result.output
    assert "4155550100" not in result.output

    path.write_text(
        path.read_text().replace('field = "properties.dealstage"', 'field = "properties.stage"')
    )
    result = CliRunner().invoke(cli, ["check-config", "--config", str(path)], env=env)
    assert result.exit_code == 1
    assert "crm.0.mapping.0" in result.output and "properties.stage" in result.output
