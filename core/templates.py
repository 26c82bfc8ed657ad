"""Message templates: Jinja2 in an immutable sandbox (no attribute escapes, no mutating calls;
the data comes from store platforms) with StrictUndefined (a typo such as `order.numbr` fails at
`check()`, at start-up, not as a blank in a customer's message). Built-ins are GSM-7 English."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency
from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import SenderConfig, TemplateConfig
from .errors import TemplateError
from .events import CATEGORIES, MESSAGE_KINDS, SHIPMENT_STATUSES
from .segments import count_segments

# Built-in bodies, single-line on purpose: the environment keeps the newlines an author writes.
# GSM-7 characters only. <tokens> expand to the snippets below, which leave out whatever the
# event did not carry ("your order" without a number, no tracking line without tracking).
_SNIPPETS = {
    "<num>": "{% if order.number %} {{ order.number }}{% endif %}",
    "<price>": "{% if order.total %} ({{ order.total | money }}){% endif %}",
    "<hi>": "{% if customer.first_name %}, {{ customer.first_name }}{% endif %}",
    "<track>": "{% if shipment.tracking_number %} Tracking {{ shipment.tracking_number }}"
    "{% if shipment.tracking_url %}: {{ shipment.tracking_url }}{% else %}.{% endif %}"
    "{% elif shipment.tracking_url %} Track it: {{ shipment.tracking_url }}{% endif %}",
    "<when>": "{% if appointment.starts_at %} on {{ appointment.starts_at | date }}{% endif %}"
    "{% if appointment.location %} at {{ appointment.location }}{% endif %}",
}
_BODIES = {
    "order.created": "Thanks{% if customer.first_name %} {{ customer.first_name }}{% endif %}!"
    " We got your order<num><price> and will text you when it ships."
    "{% if order.status_url %} Status: {{ order.status_url }}{% endif %}",
    "order.paid": "Payment received for your order<num><price>. Thank you<hi>!",
    "order.fulfilled": "Good news, your order<num> has shipped"
    "{% if shipment.carrier %} via {{ shipment.carrier }}{% endif %}.<track>",
    "order.cancelled": "Your order<num> has been cancelled."
    " If you did not expect this, please contact us.",
    "order.refunded": "A refund{% if refund.amount %} of {{ refund.amount | money }}{% endif %}"
    " for your order<num> has been issued. It may take a few days to show on your statement.",
    "shipment.updated": "{% if shipment.status == 'in_transit' %}Your order<num> is on its way"
    "{% if shipment.carrier %} with {{ shipment.carrier }}{% endif %}."
    "{% elif shipment.status == 'out_for_delivery' %}Your order<num> is out for delivery today."
    "{% elif shipment.status == 'delivered' %}Your order<num> has been delivered. Enjoy!"
    "{% elif shipment.status == 'attempted_delivery' %}"
    "{{ shipment.carrier or 'The carrier' }} tried to deliver your order<num> but could not."
    "{% elif shipment.status == 'failure' %}"
    "There is a problem delivering your order<num>. Please contact us."
    "{% else %}There is an update on your order<num>.{% endif %}"
    "{% if shipment.status != 'delivered' %}<track>{% endif %}",
    "appointment.booked": "Your appointment is booked<when>. See you then!",
    "appointment.reminder": "Reminder<hi>: you have an appointment<when>.",
    "appointment.cancelled": "Your appointment<when> has been cancelled."
    " Contact us to book a new time.",
    "account.alert": "{% if alert.text %}{{ alert.text }}"
    "{% else %}There is an important update about your account.{% endif %}",
}
_CATEGORY = dict(order="orders", shipment="shipping", appointment="appointments", account="account")


def _expand(body: str) -> str:
    for token, snippet in _SNIPPETS.items():
        body = body.replace(token, snippet)
    return "{{ shop.name }}: " + body


#: kind -> (body, category, urgent). Only account alerts are urgent: they ignore quiet hours.
BUILTINS: dict[str, tuple[str, str, bool]] = {
    k: (_expand(b), _CATEGORY[k.split(".")[0]], k == "account.alert") for k, b in _BODIES.items()
}


def build_context(
    data: dict[str, Any],
    *,
    shop_name: str,
    recipient_name: str | None,
    timezone: str,
    locale: str | None,
) -> dict[str, Any]:
    """The documented context with every key present (plain dicts, "" or []), merged with data."""
    skeleton: dict[str, Any] = {
        "shop": {"name": shop_name},
        "customer": {"first_name": "", "name": ""},
        "order": {"number": "", "total": "", "currency": "", "status_url": "", "items": []},
        "shipment": {"carrier": "", "tracking_number": "", "tracking_url": "", "status": ""},
        "refund": {"amount": ""},
        "appointment": {"starts_at": "", "location": ""},
        "alert": {"text": ""},
    }
    ctx = _merge(skeleton, data)
    if isinstance(customer := ctx["customer"], dict):
        customer["name"] = customer.get("name") or recipient_name or ""
        if not customer.get("first_name"):
            customer["first_name"] = (str(customer["name"]).split() or [""])[0]
    ctx["recipient"] = {"timezone": timezone, "locale": locale}  # from the Recipient, not data
    return ctx


def _merge(base: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """A new dict at every level both sides have one; other values are shared, not copied
    (the sandbox cannot change them, and only `customer` is changed here, in a new dict)."""
    out = dict(base)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None or key not in out:  # a platform's null keeps "", never "None"
            out[key] = value
    return out


def sample_data(kind: str) -> dict[str, Any]:
    """Realistic `data` for `kind`, used by check-config and the tests."""
    data: dict[str, Any] = {"customer": {"first_name": "Jane", "name": "Jane Doe"}}
    if kind.startswith(("order.", "shipment.")):
        url = "https://shop.example.com/orders/1001"
        data["order"] = {"number": "#1001", "total": "25.00", "currency": "USD", "status_url": url}
        data["order"]["items"] = [{"name": "Blue T-shirt", "quantity": 1}]
    if kind in ("order.fulfilled", "shipment.updated"):
        n = "1Z999AA10123456784"
        data["shipment"] = {"carrier": "UPS", "status": "in_transit", "tracking_number": n}
        data["shipment"]["tracking_url"] = f"https://www.ups.com/track?tracknum={n}"
    if kind == "order.refunded":
        data["refund"] = {"amount": "25.00"}
    if kind.startswith("appointment."):
        day = datetime.now(UTC).date() + timedelta(days=1)  # tomorrow 10:00 UTC
        starts = datetime(day.year, day.month, day.day, 10, tzinfo=UTC).isoformat()
        data["appointment"] = {"starts_at": starts, "location": "Main St clinic"}
    if kind == "account.alert":
        data["alert"] = {"text": "Your password was changed. If this was not you, contact us now."}
    return data


@jinja2.pass_context
def money(ctx: jinja2.runtime.Context, value: Any, currency: str | None = None) -> str:
    """A number in the recipient's locale; a string already formatted passes through."""
    if value is None or value == "":
        return ""
    if isinstance(value, str) and any(not (c.isdigit() or c in ".-") for c in value.strip()):
        return value  # e.g. "$25.00" from a platform that formats totals itself
    currency = currency or (ctx.get("order") or {}).get("currency") or "USD"
    name = (ctx.get("recipient") or {}).get("locale") or "en_US"
    locale = _locale(str(name))
    text = format_currency(Decimal(str(value).strip()), currency.upper(), locale=locale)
    # CLDR puts a (narrow) no-break space in "25,00 €" or "1 234,50 €"; either one alone would
    # turn the whole message into UCS-2 (70 characters a segment instead of 160).
    return text.replace("\u00a0", " ").replace("\u202f", " ")


@functools.lru_cache(maxsize=64)
def _locale(name: str) -> Locale:
    """Babel's locale for a recipient's (Babel wants fr_CA, not fr-CA); en_US for one it does
    not know. Kept: parsing one costs a fifth of formatting an amount."""
    try:
        return Locale.parse(name.replace("-", "_"))
    except (ValueError, UnknownLocaleError):
        return Locale.parse("en_US")


@jinja2.pass_context
def date(ctx: jinja2.runtime.Context, value: Any, fmt: str = "%b %d, %H:%M") -> str:
    """An ISO-8601 string, datetime or epoch seconds in the recipient's zone; naive is UTC."""
    if value is None or value == "":
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise TypeError(f"date: cannot read {type(value).__name__} {value!r}")
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    zone = (ctx.get("recipient") or {}).get("timezone") or "UTC"
    return when.astimezone(ZoneInfo(zone)).strftime(fmt)


class _Environment(ImmutableSandboxedEnvironment):
    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
        self.filters.update(money=money, date=date)  # `truncate` and the rest stay Jinja's
        self.policies["truncate.leeway"] = 0  # truncate(n) gives at most n characters, "..." incl.

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Jinja prefers attributes, so `order.items` would be the dict method, not the data.
        # For dicts a key wins; anything else (typos, dunders) goes through the sandbox as usual.
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


@dataclass(frozen=True)
class Template:
    kind: str
    locale: str | None  # the configured locale key used, None for the default body
    category: str
    urgent: bool
    source: str
    compiled: jinja2.Template = field(compare=False, repr=False)


@dataclass(frozen=True)
class Rendered:
    body: str
    category: str
    urgent: bool
    locale: str | None
    encoding: str
    segments: int


@dataclass(frozen=True)
class CheckRow:
    key: str  # the kind
    locale: str | None
    encoding: str
    segments: int
    body: str


class TemplateSet:
    """Built-ins overlaid with `[templates.<kind>]`, all compiled (and so checked) up front."""

    def __init__(self, templates: dict[str, TemplateConfig], sender: SenderConfig):
        self.sender = sender
        env = _Environment()
        self._by_key: dict[tuple[str, str | None], Template] = {}  # (kind, normalised locale)
        self._locales: dict[str, tuple[str, ...]] = {}
        for kind in set(templates) - set(BUILTINS):
            raise TemplateError(f"unknown message kind; expected one of {MESSAGE_KINDS}", key=kind)
        for kind, (body, category, urgent) in BUILTINS.items():
            conf = templates.get(kind, TemplateConfig())
            category = conf.category or category
            if category not in CATEGORIES:
                raise TemplateError(f"unknown category {category!r}", key=kind)
            urgent = urgent if conf.urgent is None else conf.urgent
            variants = [(None, body if conf.body is None else conf.body), *conf.locales.items()]
            for locale, source in variants:
                norm = None if locale is None else locale.strip().replace("_", "-").lower()
                if (kind, norm) in self._by_key:
                    raise TemplateError(f"locale {locale!r} is configured twice", key=kind)
                try:
                    compiled = env.from_string(source)
                except jinja2.TemplateSyntaxError as e:
                    where = kind if locale is None else f"{kind}.locales.{locale}"
                    raise TemplateError(f"line {e.lineno}: {e.message}", key=where) from e
                tpl = Template(kind, locale, category, urgent, source, compiled)
                self._by_key[(kind, norm)] = tpl
            self._locales[kind] = tuple(conf.locales)

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._locales)

    def locales(self, kind: str) -> tuple[str, ...]:
        """The configured locale keys of `kind`, as written in the config."""
        return self._locales[kind]

    def resolve(self, kind: str, locale: str | None) -> Template:
        """`fr-CA` tries fr-CA, then fr, then the default body; `_` and case do not matter."""
        if kind not in self._locales:
            raise KeyError(kind)
        parts = locale.strip().replace("_", "-").lower().split("-") if locale else []
        for n in range(len(parts), 0, -1):
            if found := self._by_key.get((kind, "-".join(parts[:n]))):
                return found
        return self._by_key[(kind, None)]

    def render(self, kind: str, locale: str | None, context: dict[str, Any]) -> Rendered:
        """Render; every failure (typo, sandbox refusal, bad value) is a one-line TemplateError."""
        tpl = self.resolve(kind, locale)
        key = kind if tpl.locale is None else f"{kind}.locales.{tpl.locale}"
        try:
            body = tpl.compiled.render(context).strip()
        except Exception as e:  # also a filter's ValueError, a TypeError in an expression, ...
            raise TemplateError(_problem(e), key=key) from e
        info = count_segments(body)
        return Rendered(body, tpl.category, tpl.urgent, tpl.locale, info.encoding, info.segments)

    def check(self, sample_contexts: dict[str, dict[str, Any]] | None = None) -> list[CheckRow]:
        """Render every kind x locale; `sample_contexts` maps a kind to a full context. Without
        one, shipment.updated renders per status: StrictUndefined only trips in branches run."""
        rows: list[CheckRow] = []
        given, s = sample_contexts or {}, self.sender
        fill = partial(build_context, shop_name=s.name, recipient_name=None, timezone=s.timezone)
        for kind in self.kinds():
            datas = [sample_data(kind)]
            if kind == "shipment.updated":
                datas = [_merge(datas[0], {"shipment": {"status": x}}) for x in SHIPMENT_STATUSES]
            for locale in (None, *self.locales(kind)):
                ctxs = [given[kind]] if kind in given else [fill(d, locale=locale) for d in datas]
                for ctx in ctxs:
                    r = self.render(kind, locale, ctx)
                    status = ctx["shipment"]["status"] if kind == "shipment.updated" else ""
                    key = f"{kind}:{status}" if status else kind
                    rows.append(CheckRow(key, r.locale, r.encoding, r.segments, r.body))
        return rows


def _problem(e: Exception) -> str:
    text = " ".join(str(e).split())  # one line, for logs and `txsms check-config`
    if isinstance(e, SecurityError):
        return f"unsafe access: {text}"
    return text if isinstance(e, UndefinedError) else f"{type(e).__name__}: {text}"
