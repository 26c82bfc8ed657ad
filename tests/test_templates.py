"""Templates: built-ins, context, locales, filters, strictness and the sandbox."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from babel.numbers import format_currency

from txsms.core.config import SenderConfig, TemplateConfig
from txsms.core.errors import TemplateError
from txsms.core.events import CATEGORIES, MESSAGE_KINDS, SHIPMENT_STATUSES
from txsms.core.segments import count_segments
from txsms.core.templates import (
    BUILTINS,
    CheckRow,
    Rendered,
    TemplateSet,
    build_context,
    sample_data,
)

SENDER = SenderConfig(name="Acme", timezone="UTC")


def ctx(data: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "shop_name": "Acme",
        "recipient_name": "Jane Doe",
        "timezone": "UTC",
        "locale": None,
    }
    return build_context(data or {}, **{**args, **kw})


def one(body: str, data: dict[str, Any] | None = None, **kw: Any) -> str:
    """Render `body` as the order.created override."""
    ts = TemplateSet({"order.created": TemplateConfig(body=body)}, SENDER)
    return ts.render("order.created", None, ctx(data, **kw)).body


# --- built-ins ---------------------------------------------------------------------------


def test_every_kind_has_a_builtin_with_its_category_and_urgency() -> None:
    assert set(BUILTINS) == set(MESSAGE_KINDS)
    expected = {"order": "orders", "shipment": "shipping", "appointment": "appointments"}
    for kind, (body, category, urgent) in BUILTINS.items():
        assert body.startswith("{{ shop.name }}: ")
        assert category in CATEGORIES
        assert category == expected.get(kind.split(".")[0], "account")
        assert urgent is (kind == "account.alert")


def _samples() -> list[tuple[str, dict[str, Any]]]:
    out = [(kind, sample_data(kind)) for kind in MESSAGE_KINDS if kind != "shipment.updated"]
    for status in SHIPMENT_STATUSES:
        data = sample_data("shipment.updated")
        data["shipment"]["status"] = status
        out.append(("shipment.updated", data))
    return out


@pytest.mark.parametrize(("kind", "data"), _samples())
def test_builtins_render_gsm7_in_at_most_two_segments(kind: str, data: dict[str, Any]) -> None:
    ts = TemplateSet({}, SENDER)
    r = ts.render(kind, None, ctx(data))
    assert isinstance(r, Rendered)
    assert r.body.startswith("Acme: ")
    assert (r.encoding, r.locale) == ("GSM-7", None)
    assert 1 <= r.segments <= 2
    assert r.segments == count_segments(r.body).segments
    assert (r.category, r.urgent) == BUILTINS[kind][1:]
    assert "None" not in r.body and "  " not in r.body and "{" not in r.body


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_builtins_degrade_gracefully_with_empty_data(kind: str) -> None:
    r = TemplateSet({}, SENDER).render(kind, None, ctx({}, recipient_name=None))
    assert r.body.startswith("Acme: ") and r.encoding == "GSM-7" and r.segments == 1
    for bad in ("None", "  ", " .", " ,", "()", ": .", "Tracking"):
        assert bad not in r.body, (bad, r.body)


def test_sample_data_reads_well() -> None:
    ts = TemplateSet({}, SENDER)
    body = ts.render("order.created", None, ctx(sample_data("order.created"))).body
    assert body.startswith("Acme: Thanks Jane! We got your order #1001 ($25.00)")
    appointment = sample_data("appointment.booked")["appointment"]
    starts = datetime.fromisoformat(appointment["starts_at"])
    assert (starts.hour, starts.minute, starts.utcoffset()) == (10, 0, UTC.utcoffset(None))
    assert appointment["location"] == "Main St clinic"
    assert sample_data("order.created") is not sample_data("order.created")  # fresh each time


def test_order_fulfilled_mentions_carrier_tracking_number_and_url() -> None:
    ts = TemplateSet({}, SENDER)
    body = ts.render("order.fulfilled", None, ctx(sample_data("order.fulfilled"))).body
    assert "UPS" in body and "1Z999AA10123456784" in body
    assert "https://www.ups.com/track?tracknum=1Z999AA10123456784" in body
    no_url = {"order": {"number": "#7"}, "shipment": {"tracking_number": "ABC", "carrier": ""}}
    assert ts.render("order.fulfilled", None, ctx(no_url)).body == (
        "Acme: Good news, your order #7 has shipped. Tracking ABC."
    )
    url_only = {"shipment": {"tracking_url": "https://t.example/1", "carrier": "DHL"}}
    assert ts.render("order.fulfilled", None, ctx(url_only)).body == (
        "Acme: Good news, your order has shipped via DHL. Track it: https://t.example/1"
    )


def test_order_refunded_uses_refund_amount() -> None:
    ts = TemplateSet({}, SENDER)
    data = {"order": {"number": "#9", "currency": "USD"}, "refund": {"amount": "12.5"}}
    assert ts.render("order.refunded", None, ctx(data)).body.startswith(
        "Acme: A refund of $12.50 for your order #9 has been issued."
    )


def test_shipment_wording_varies_with_status() -> None:
    ts = TemplateSet({}, SENDER)
    bodies = {}
    for status in (*SHIPMENT_STATUSES, ""):
        data = {"order": {"number": "#5"}, "shipment": {"status": status}}
        bodies[status] = ts.render("shipment.updated", None, ctx(data)).body
    assert len(set(bodies.values())) == len(bodies)
    assert bodies["out_for_delivery"] == "Acme: Your order #5 is out for delivery today."
    assert bodies["attempted_delivery"].startswith("Acme: The carrier tried to deliver")
    assert bodies[""] == "Acme: There is an update on your order #5."


def test_account_alert_is_urgent_and_uses_the_text() -> None:
    r = TemplateSet({}, SENDER).render("account.alert", None, ctx({"alert": {"text": "Hi."}}))
    assert (r.body, r.category, r.urgent) == ("Acme: Hi.", "account", True)


# --- context -----------------------------------------------------------------------------


def test_context_skeleton_has_every_documented_key() -> None:
    c = build_context({}, shop_name="S", recipient_name=None, timezone="UTC", locale=None)
    assert c == {
        "shop": {"name": "S"},
        "customer": {"first_name": "", "name": ""},
        "order": {"number": "", "total": "", "currency": "", "status_url": "", "items": []},
        "shipment": {"carrier": "", "tracking_number": "", "tracking_url": "", "status": ""},
        "refund": {"amount": ""},
        "appointment": {"starts_at": "", "location": ""},
        "alert": {"text": ""},
        "recipient": {"timezone": "UTC", "locale": None},
    }
    assert all(type(v) is dict for v in c.values())  # plain dicts: typos must fail


def test_context_deep_merges_data_which_wins() -> None:
    data = {
        "order": {"number": "#1", "items": [{"name": "Mug", "quantity": 2}], "extra": 1},
        "shipment": {"tracking_url": None},  # null keeps the "" default
        "loyalty": {"points": 5},
    }
    c = ctx(data, recipient_name="Ann Lee Smith", locale="fr-CA", timezone="Europe/Paris")
    assert c["order"]["number"] == "#1" and c["order"]["total"] == ""
    assert c["order"]["items"] == [{"name": "Mug", "quantity": 2}] and c["order"]["extra"] == 1
    assert c["shipment"]["tracking_url"] == ""
    assert c["loyalty"] == {"points": 5}
    assert c["customer"] == {"first_name": "Ann", "name": "Ann Lee Smith"}
    assert c["recipient"] == {"timezone": "Europe/Paris", "locale": "fr-CA"}
    assert data["shipment"] == {"tracking_url": None}  # the input is not modified
    explicit = ctx({"customer": {"name": "Bob Ray"}}, recipient_name="Ann")
    assert explicit["customer"] == {"first_name": "Bob", "name": "Bob Ray"}
    given = ctx({"customer": {"first_name": "Rob"}}, recipient_name="Ann")
    assert given["customer"] == {"first_name": "Rob", "name": "Ann"}


def test_order_items_is_the_data_not_the_dict_method() -> None:
    data = {"order": {"items": [{"name": "Mug", "quantity": 2}, {"name": "Tea", "quantity": 1}]}}
    body = one("{% for i in order.items %}{{ i.quantity }}x {{ i.name }} {% endfor %}", data)
    assert body == "2x Mug 1x Tea"


def test_output_is_stripped_but_keeps_inner_newlines() -> None:
    assert one("\n  {{ shop.name }}:\nline two\n\n") == "Acme:\nline two"


# --- locales -----------------------------------------------------------------------------


def _localised() -> TemplateSet:
    conf = TemplateConfig(
        locales={"fr": "FR {{ shop.name }}", "fr_CA": "CA {{ shop.name }}", "pt_BR": "BR"}
    )
    return TemplateSet({"order.created": conf}, SENDER)


@pytest.mark.parametrize(
    ("asked", "used", "body"),
    [
        ("fr-CA", "fr_CA", "CA Acme"),
        ("fr_ca", "fr_CA", "CA Acme"),
        ("FR-CA", "fr_CA", "CA Acme"),
        ("fr-BE", "fr", "FR Acme"),
        ("fr", "fr", "FR Acme"),
        ("pt-BR", "pt_BR", "BR"),
        ("pt_br", "pt_BR", "BR"),
        ("pt", None, None),  # pt-BR is not used for plain pt
        ("de-DE", None, None),
        (None, None, None),
        ("", None, None),
    ],
)
def test_locale_fallback(asked: str | None, used: str | None, body: str | None) -> None:
    ts = _localised()
    tpl = ts.resolve("order.created", asked)
    assert tpl.locale == used and tpl.kind == "order.created"
    r = ts.render("order.created", asked, ctx(sample_data("order.created")))
    assert r.locale == used
    assert r.body == body if body else r.body.startswith("Acme: Thanks Jane!")


def test_locales_and_kinds() -> None:
    ts = _localised()
    assert ts.kinds() == MESSAGE_KINDS
    assert ts.locales("order.created") == ("fr", "fr_CA", "pt_BR")
    assert ts.locales("order.paid") == ()


def test_unknown_kind_is_a_key_error() -> None:
    ts = TemplateSet({}, SENDER)
    with pytest.raises(KeyError):
        ts.resolve("order.shipped", None)
    with pytest.raises(KeyError):
        ts.render("customer.consent", "fr", ctx())


def test_same_locale_twice_is_refused() -> None:
    conf = TemplateConfig(locales={"fr_CA": "a", "fr-ca": "b"})
    with pytest.raises(TemplateError, match="configured twice"):
        TemplateSet({"order.created": conf}, SENDER)


# --- overrides and configuration errors ---------------------------------------------------


def test_configured_body_urgent_and_category_override_the_builtin() -> None:
    templates = {
        "order.paid": TemplateConfig(body="{{ shop.name }}: paid!"),
        "shipment.updated": TemplateConfig(urgent=True),
        "account.alert": TemplateConfig(urgent=False, category="orders"),
    }
    ts = TemplateSet(templates, SENDER)
    paid = ts.render("order.paid", None, ctx())
    assert (paid.body, paid.category, paid.urgent) == ("Acme: paid!", "orders", False)
    shipped = ts.resolve("shipment.updated", None)
    assert (shipped.category, shipped.urgent, shipped.source) == (
        "shipping",
        True,
        BUILTINS["shipment.updated"][0],
    )
    alert = ts.render("account.alert", None, ctx({"alert": {"text": "x"}}))
    assert (alert.category, alert.urgent) == ("orders", False)
    fr = TemplateSet({"account.alert": TemplateConfig(locales={"fr": "{{ alert.text }}"})}, SENDER)
    assert fr.resolve("account.alert", "fr").urgent is True  # a locale keeps the kind's flags


def test_unknown_kind_or_category_in_config_is_refused() -> None:
    with pytest.raises(TemplateError) as e:
        TemplateSet({"order.shipped": TemplateConfig(body="x")}, SENDER)
    assert e.value.key == "order.shipped"
    with pytest.raises(TemplateError) as e:
        TemplateSet({"order.paid": TemplateConfig(category="promos")}, SENDER)
    assert e.value.key == "order.paid" and "promos" in e.value.problem


@pytest.mark.parametrize(
    ("conf", "key"),
    [
        (TemplateConfig(body="{{ shop.name }: oops"), "order.created"),
        (TemplateConfig(body="{% if order.number %}x"), "order.created"),
        (TemplateConfig(locales={"fr": "{{ shop.name "}), "order.created.locales.fr"),
    ],
)
def test_syntax_error_names_the_key_at_construction(conf: TemplateConfig, key: str) -> None:
    with pytest.raises(TemplateError) as e:
        TemplateSet({"order.created": conf}, SENDER)
    assert e.value.key == key
    assert e.value.problem.startswith("line 1: ")
    assert str(e.value).startswith(f"templates.{key}: line 1: ")


# --- check() -------------------------------------------------------------------------------


def test_check_renders_every_kind_and_locale() -> None:
    ts = _localised()
    rows = ts.check()
    assert all(isinstance(r, CheckRow) for r in rows)
    extra_statuses = len(SHIPMENT_STATUSES) - 1
    assert len(rows) == len(MESSAGE_KINDS) + extra_statuses + 3
    shipment = {f"shipment.updated:{status}" for status in SHIPMENT_STATUSES}
    assert {r.key for r in rows} == set(MESSAGE_KINDS) - {"shipment.updated"} | shipment
    assert [r.locale for r in rows if r.key == "order.created"] == [None, "fr", "fr_CA", "pt_BR"]
    assert all(r.encoding == "GSM-7" and 1 <= r.segments <= 2 for r in rows)
    assert all(r.body == r.body.strip() and r.body for r in rows)


def test_check_takes_sample_contexts() -> None:
    ts = TemplateSet({}, SENDER)
    rows = ts.check({"account.alert": ctx({"alert": {"text": "Caf\u00e9 \u00e7a"}})})
    alert = next(r for r in rows if r.key == "account.alert")
    assert alert.body == "Acme: Caf\u00e9 \u00e7a" and alert.encoding == "UCS-2"


def test_strict_undefined_typo_is_caught_by_check() -> None:
    ts = TemplateSet({"order.created": TemplateConfig(body="{{ order.numbr }}")}, SENDER)
    with pytest.raises(TemplateError) as e:
        ts.check()
    assert e.value.key == "order.created"
    assert e.value.problem == "'dict object' has no attribute 'numbr'"
    with pytest.raises(TemplateError, match="'ordr' is undefined"):
        one("{{ ordr.number }}")
    with pytest.raises(TemplateError, match="no attribute 'numbr'"):
        one("{% if order.numbr %}x{% endif %}")  # even in a test, not just when printed


def test_typo_in_a_locale_and_in_a_rare_branch_is_caught_by_check() -> None:
    conf = TemplateConfig(locales={"fr": "{{ shop.nom }}"})
    with pytest.raises(TemplateError) as e:
        TemplateSet({"order.paid": conf}, SENDER).check()
    assert e.value.key == "order.paid.locales.fr"
    branch = "{% if shipment.status == 'failure' %}{{ shipment.carier }}{% endif %}ok"
    ts = TemplateSet({"shipment.updated": TemplateConfig(body=branch)}, SENDER)
    with pytest.raises(TemplateError, match="carier"):
        ts.check()  # every status is exercised, not only the sample's


def test_other_render_failures_become_template_errors() -> None:
    with pytest.raises(TemplateError) as e:
        one("{{ order.number | date }}", {"order": {"number": "not a date"}})
    assert e.value.key == "order.created" and e.value.problem.startswith("ValueError: ")
    with pytest.raises(TemplateError, match="TypeError"):
        one("{{ 1 + shop.name }}")


# --- the sandbox -----------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ order.__class__ }}",
    "{{ [].pop() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ order.items.append(1) }}",
    "{% set d = {} %}{{ d.update(a=1) }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ shop.name.__class__.__subclasses__() }}",
    "{{ self._TemplateReference__context.environment }}",
    "{{ range.__globals__ }}",
    "{{ (1).__class__.__base__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_are_refused_at_check_and_render(source: str) -> None:
    ts = TemplateSet({"order.created": TemplateConfig(body="Hi " + source)}, SENDER)
    with pytest.raises(TemplateError) as e:
        ts.check()
    assert e.value.key == "order.created"
    assert e.value.problem.startswith("unsafe access: ")
    assert "\n" not in e.value.problem
    with pytest.raises(TemplateError, match="unsafe access"):
        ts.render("order.created", None, ctx(sample_data("order.created")))


def test_huge_range_is_refused() -> None:
    with pytest.raises(TemplateError, match="OverflowError"):
        one("{% for i in range(10**9) %}{% endfor %}")


# --- filters ---------------------------------------------------------------------------------


def test_money_en_us() -> None:
    data = {"order": {"total": "25.00", "currency": "USD"}}
    assert one("{{ order.total | money }}", data, locale="en_US") == "$25.00"
    assert one("{{ order.total | money }}", data, locale=None) == "$25.00"  # default en_US
    assert one("{{ 1234.5 | money('EUR') }}", data, locale="en-US") == "\u20ac1,234.50"
    assert one("{{ 7 | money }}", {}, locale="en_US") == "$7.00"  # no currency: USD


def test_money_fr_fr_uses_plain_spaces_so_the_message_stays_gsm7() -> None:
    # What Babel (CLDR) really gives: a no-break space before the sign, a narrow one in groups.
    assert format_currency(25, "EUR", locale="fr_FR") == "25,00\u00a0\u20ac"
    assert format_currency(1234.5, "EUR", locale="fr_FR") == "1\u202f234,50\u00a0\u20ac"
    assert count_segments("Total 25,00\u00a0\u20ac").encoding == "UCS-2"  # that NBSP alone
    data = {"order": {"total": "25.00", "currency": "EUR"}}
    assert one("{{ order.total | money }}", data, locale="fr_FR") == "25,00 \u20ac"
    assert one("{{ 1234.5 | money }}", data, locale="fr-FR") == "1 234,50 \u20ac"
    body = one("{{ shop.name }}: total {{ order.total | money }}", data, locale="fr_FR")
    assert count_segments(body).encoding == "GSM-7"
    assert one("{{ 25 | money('USD') }}", data, locale="fr_CA") == "25,00 $ US"


def test_money_passes_formatted_and_empty_values_through() -> None:
    assert one("[{{ order.total | money }}]", {"order": {"total": "$25.00"}}) == "[$25.00]"
    assert one("[{{ order.total | money }}]", {"order": {"total": "25,00 EUR"}}) == "[25,00 EUR]"
    assert one("[{{ order.total | money }}]") == "[]"
    assert one("{{ '-3.5' | money('USD') }}") == "-$3.50"


def test_money_with_an_unknown_locale_falls_back_to_en_us() -> None:
    assert one("{{ 5 | money('USD') }}", locale="xx-YY") == "$5.00"


def test_date_converts_to_the_recipient_zone() -> None:
    ny = {"timezone": "America/New_York"}
    assert one("{{ '2024-03-10T15:30:00Z' | date }}", **ny) == "Mar 10, 11:30"  # EDT, UTC-4
    assert one("{{ '2024-01-10T15:30:00+00:00' | date }}", **ny) == "Jan 10, 10:30"  # EST
    assert one("{{ '2024-01-10T15:30:00' | date }}", **ny) == "Jan 10, 10:30"  # naive is UTC
    assert one("{{ '2024-01-10T15:30:00+01:00' | date('%H:%M %Z') }}", **ny) == "09:30 EST"
    assert one("{{ 0 | date('%Y-%m-%d %H:%M') }}", **ny) == "1969-12-31 19:00"  # epoch
    assert one("{{ 1700000000.5 | date('%Y-%m-%d %H:%M') }}", timezone="UTC") == (
        "2023-11-14 22:13"
    )
    when = {"appointment": {"starts_at": datetime(2024, 7, 4, 16, 0, tzinfo=UTC)}}
    assert one("{{ appointment.starts_at | date }}", when, **ny) == "Jul 04, 12:00"
    assert one("[{{ appointment.starts_at | date }}]", **ny) == "[]"


def test_builtin_appointment_uses_the_recipient_zone() -> None:
    data = {"appointment": {"starts_at": "2024-07-04T14:00:00Z", "location": "Main St clinic"}}
    c = ctx(data, timezone="America/New_York")
    body = TemplateSet({}, SENDER).render("appointment.reminder", None, c).body
    assert (
        body == "Acme: Reminder, Jane: you have an appointment on Jul 04, 10:00 at Main St clinic."
    )


def test_truncate_is_jinjas_builtin_without_leeway() -> None:
    text = {"alert": {"text": "Hello wonderful world"}}
    assert one("{{ alert.text | truncate(12) }}", text) == "Hello..."
    assert one("{{ alert.text | truncate(12, True) }}", text) == "Hello won..."
    assert one("{{ alert.text | truncate(21) }}", text) == "Hello wonderful world"
    assert len(one("{{ alert.text | truncate(20) }}", text)) <= 20
