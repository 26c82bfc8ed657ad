"""Configuration: TOML, `${VAR}` from the environment, validated by marshmallow schemas.

The section and key names are a contract (DESIGN.md); add keys freely, rename none.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import time as dtime
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
from cryptography.fernet import Fernet
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from txsms.core.errors import ConfigError
from txsms.core.events import CATEGORIES, MESSAGE_KINDS
from txsms.core.providers import REGISTRY


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # e.g. https://sms.example.com, used for callbacks and signatures
    max_body_bytes: int = 2 * 1024 * 1024
    threads: int = 8  # WSGI threads in `txsms serve`


@dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite:///txsms.db"
    data_dir: str = "txsms-data"  # exports, the generated development key
    sqlite_synchronous: str = "FULL"  # FULL: a commit survives power loss, not just a crash


@dataclass(frozen=True)
class SecurityConfig:
    keys: tuple[str, ...] = ()  # Fernet keys, newest first; empty: a development key is generated
    index_key: str | None = None  # blind-index key; default: derived from the oldest key
    api_tokens: tuple[str, ...] = ()
    retention_days: int = 30  # bodies, event payloads, delivery ids then go (core/retention.py)


@dataclass(frozen=True)
class SenderConfig:
    name: str = "Our store"
    default_region: str = "US"
    timezone: str = "UTC"
    footer: str = "Reply STOP to opt out."
    help_reply: str = (
        "{name}: order and delivery updates. Reply STOP to opt out. Msg&data rates may apply."
    )
    stop_reply: str = (
        "{name}: you are unsubscribed and will get no more messages. Reply START to resubscribe."
    )
    start_reply: str = "{name}: you are subscribed again. Reply HELP for help, STOP to opt out."


@dataclass(frozen=True)
class ProviderConfig:
    kind: str = "console"
    base_url: str | None = None
    account_sid: str | None = None
    auth_token: str | None = None
    from_: str | None = None  # TOML key "from"
    messaging_service_sid: str | None = None
    # vonage: api_key, api_secret, signature_secret (+ signature_method) for signed webhooks
    api_key: str | None = None
    api_secret: str | None = None
    signature_secret: str | None = None
    signature_method: str = "sha256"  # md5hash | md5 | sha1 | sha256 | sha512
    # plivo: auth_id + auth_token; messagebird: access_key + signing_key
    auth_id: str | None = None
    access_key: str | None = None
    signing_key: str | None = None
    rate_per_second: float = 10.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class PolicyConfig:
    quiet_hours: tuple[dtime, dtime] | None = None  # (start, end); may wrap midnight
    max_per_day: int | None = None


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    concurrency: int = 1
    max_attempts: int = 8
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 3600.0
    unknown_grace_seconds: float = 300.0
    # Messages marked "in flight" per durable commit; None: 8 where the provider can be asked
    # about a message (a crash's window is settled by looking it up), else 1.
    in_flight_window: int | None = None


@dataclass(frozen=True)
class TemplateConfig:
    body: str | None = None  # None: the built-in default for the kind
    urgent: bool | None = None  # None: the built-in default for the kind
    category: str | None = None
    locales: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    templates: dict[str, TemplateConfig] = field(default_factory=dict)
    # Platform sections: validated here, interpreted by their connectors.
    shopify: dict[str, Any] = field(default_factory=dict)
    woocommerce: dict[str, Any] = field(default_factory=dict)
    crm: tuple[dict[str, Any], ...] = ()


# --- Checks and conversions, one per rule. Converters return the stored value; all raise
# ValidationError with a message written for the person editing the file.


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_of(choices: Any, what: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValidationError(f"unknown {what} '{value}'{_suggest(value, choices)}")

    return check


def _db_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):  # SQLAlchemy would pick psycopg2 for these
        return f"postgresql+psycopg://{rest}"
    if url.startswith(("sqlite:", "postgresql+")):
        return url
    raise ValidationError("expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")


def _must(test: Callable[[str], object], problem: str) -> Callable[[str], None]:
    """A validator: `test(value)` must not raise. The libraries' own checks are the truth."""

    def check(value: str) -> None:
        try:
            test(value)
        except Exception:  # each library raises its own kinds; any of them means "invalid"
            raise ValidationError(problem) from None

    return check


def _quiet_hours(text: str) -> tuple[dtime, dtime]:
    match = re.fullmatch(r"(\d\d?):(\d\d)\s*-\s*(\d\d?):(\d\d)", text.strip())
    try:
        h1, m1, h2, m2 = (int(g) for g in match.groups())  # type: ignore[union-attr]
        start, end = dtime(h1, m1), dtime(h2, m2)
    except (AttributeError, ValueError):  # no match, or 25:00
        raise ValidationError('expected "HH:MM-HH:MM", e.g. "21:00-08:00"') from None
    if start == end:
        raise ValidationError("start and end are the same; leave quiet_hours out for none")
    return start, end


class Text(fields.String):
    """A string, normalised by `convert` before any validator runs."""

    def __init__(self, convert: Callable[[str], Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.convert = convert

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        return self.convert(text) if self.convert else text


class Secrets(fields.Field):
    """One secret, or several while a rotation is under way; stored as a list."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not (isinstance(items, list) and items and all(isinstance(s, str) and s for s in items)):
            raise ValidationError("expected a secret or a list of secrets (non-empty strings)")
        return list(items)


def _url(**kwargs: Any) -> Text:
    # Paths get appended to these later: strip the slash so there is one, never two.
    error = "expected an http(s) URL such as 'https://sms.example.com'"
    check = validate.URL(schemes={"http", "https"}, require_tld=False, error=error)
    return Text(lambda url: url.rstrip("/"), validate=check, **kwargs)


def _int(low: int, high: int | None = None) -> fields.Integer:
    return fields.Integer(validate=validate.Range(min=low, max=high))


def _positive() -> fields.Float:
    return fields.Float(validate=validate.Range(min=0, min_inclusive=False))


def _secret16() -> Text:  # API tokens, index key: short ones can be guessed
    return Text(validate=validate.Length(min=16, error="must be at least {min} characters long"))


_locale = partial(
    Text,
    lambda tag: tag.replace("_", "-"),  # pt_BR as Babel writes it, pt-BR as browsers do
    validate=validate.Regexp(
        r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*\Z", error="not a locale: '{input}'"
    ),
)
_reply = _must(lambda text: text.format(name=""), "may use only {name} ({{ and }} for braces)")
_HOST = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+\Z"


# --- Schemas, one per section. Absent keys stay absent, so the dataclass defaults apply.


class _Section(Schema):
    class Meta:
        unknown = RAISE

    builds: Any = None  # the dataclass made from the section; None: a plain dict
    noun = "key"  # what an unknown key is called in its error
    unique: tuple[str, str] | None = None  # (list, key): webhooks pick shops and stores by it

    @validates_schema
    def _check_unique(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not self.unique:
            return
        items, key = data.get(self.unique[0], []), self.unique[1]
        values = [item.get(key) for item in items]
        errors = {
            i: {key: [f"duplicate {key} '{v}'"]} for i, v in enumerate(values) if v in values[:i]
        }
        if errors:
            raise ValidationError({self.unique[0]: errors})

    @post_load
    def _build(self, data: dict[str, Any], **kwargs: Any) -> Any:
        if self.builds is None:  # a plain dict, keyed as in the file
            return {getattr(self.fields.get(k), "data_key", None) or k: v for k, v in data.items()}
        return self.builds(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def handle_error(self, error: ValidationError, data: Any, **kwargs: Any) -> None:
        # Marshmallow says "Unknown field."; the usual cause is a typo, so name the nearest key.
        known = [f.data_key or name for name, f in self.fields.items()]
        for key, messages in error.messages_dict.items():
            if messages == [self.error_messages["unknown"]]:
                error.messages_dict[key] = [f"unknown {self.noun}{_suggest(str(key), known)}"]


class ServerSchema(_Section):
    builds = ServerConfig
    host = fields.String()
    port = _int(1, 65535)
    public_url = _url()
    max_body_bytes = _int(1024)
    threads = _int(1, 256)


class StorageSchema(_Section):
    builds = StorageConfig
    url = Text(_db_url)
    data_dir = fields.String()  # a relative path is resolved by the caller, against the CWD
    sqlite_synchronous = Text(
        str.upper, validate=validate.OneOf(("OFF", "NORMAL", "FULL", "EXTRA"))
    )


class SecuritySchema(_Section):
    builds = SecurityConfig
    keys = fields.List(
        Text(validate=_must(Fernet, "not a valid Fernet key (make one with 'txsms keygen')"))
    )
    index_key = _secret16()
    api_tokens = fields.List(_secret16())
    retention_days = _int(1)

    @validates_schema
    def _index_key(self, data: dict[str, Any], **kwargs: Any) -> None:
        # The blind index must outlive every Fernet key: derived from one of them, it would
        # change when a rotation drops that key, and every opt-out would stop matching.
        if data.get("keys") and not data.get("index_key"):
            raise ValidationError(
                {
                    "index_key": [
                        "required with security.keys; it must never change, unlike the "
                        "keys (make one with 'txsms keygen')"
                    ]
                }
            )


class SenderSchema(_Section):
    builds = SenderConfig
    name = fields.String()
    default_region = Text(str.upper, validate=_one_of(phonenumbers.SUPPORTED_REGIONS, "region"))
    timezone = Text(validate=_must(ZoneInfo, "unknown time zone (e.g. 'America/New_York')"))
    footer = fields.String()
    # Formatted with name= only: a stray {field} fails here, not at the first STOP.
    help_reply = Text(validate=_reply)
    stop_reply = Text(validate=_reply)
    start_reply = Text(validate=_reply)


class ProviderSchema(_Section):
    builds = ProviderConfig
    kind = Text(validate=_one_of(REGISTRY, "provider kind"))
    base_url = _url()
    account_sid = fields.String()
    auth_token = fields.String()
    from_ = fields.String(data_key="from")  # `from` is a Python keyword
    messaging_service_sid = fields.String()
    api_key = fields.String()
    api_secret = fields.String()
    signature_secret = fields.String()
    signature_method = Text(
        str.lower, validate=_one_of(("md5hash", "md5", "sha1", "sha256", "sha512"), "method")
    )
    auth_id = fields.String()
    access_key = fields.String()
    signing_key = fields.String()
    rate_per_second = _positive()
    timeout_seconds = _positive()

    #: kind -> the keys it cannot work without
    REQUIRED = {
        "twilio": ("account_sid", "auth_token"),
        "vonage": ("api_key", "api_secret", "from_"),
        "plivo": ("auth_id", "auth_token", "from_"),
        "messagebird": ("access_key", "from_"),
    }

    @validates_schema
    def _required(self, data: dict[str, Any], **kwargs: Any) -> None:
        kind = data.get("kind")
        needed = f'required when kind = "{kind}"'
        errors = {
            ("from" if k == "from_" else k): [needed]
            for k in self.REQUIRED.get(kind, ())
            if not data.get(k)
        }
        if kind == "twilio" and not (data.get("from_") or data.get("messaging_service_sid")):
            errors["from"] = [f'"from" or "messaging_service_sid" is {needed}']
        if errors:
            raise ValidationError(errors)


class PolicySchema(_Section):
    builds = PolicyConfig
    quiet_hours = Text(_quiet_hours)
    max_per_day = _int(1)


class WorkerSchema(_Section):
    builds = WorkerConfig
    lease_seconds = _positive()
    poll_seconds = _positive()
    concurrency = _int(1, 64)
    max_attempts = _int(1)
    backoff_base_seconds = _positive()
    backoff_max_seconds = _positive()
    unknown_grace_seconds = fields.Float(validate=validate.Range(min=0))
    in_flight_window = _int(1, 50)


class TemplateSchema(_Section):
    builds = TemplateConfig
    body = fields.String()  # Jinja compiles it elsewhere, at start-up
    urgent = fields.Boolean()
    category = Text(validate=_one_of(CATEGORIES, "category"))
    locales = fields.Dict(keys=_locale(), values=fields.String())


# One field per kind, so a misspelt kind is an unknown key and gets a suggestion. Attribute
# names must not hold dots (marshmallow reads those as paths), hence data_key.
TemplatesSchema = type(
    "TemplatesSchema",
    (_Section,),
    {
        "noun": "event kind",
        **{k.replace(".", "_"): fields.Nested(TemplateSchema, data_key=k) for k in MESSAGE_KINDS},
    },
)


class ShopSchema(_Section):
    domain = Text(
        str.lower,
        required=True,
        validate=validate.Regexp(
            _HOST, error="expected a host name such as 'my-shop.myshopify.com'"
        ),
    )
    secret = Secrets(required=True)
    access_token = fields.String()
    name = fields.String()
    send_test_orders = fields.Boolean(load_default=False)
    locale = _locale()
    admin_url = _url()  # the Admin API root instead of https://<domain> (tests, proxies)


class ShopifySchema(_Section):
    unique = ("shops", "domain")
    shops = fields.List(fields.Nested(ShopSchema), load_default=list)
    # The Admin API version `txsms install shopify` speaks (default: the connector's pin).
    api_version = Text(
        validate=validate.Regexp(
            r"(\d{4}-(01|04|07|10)|unstable)\Z", error="expected a version such as '2026-07'"
        )
    )


class StoreSchema(_Section):
    url = _url(required=True)
    secret = Secrets(required=True)
    consumer_key = fields.String()  # ck_…, for reconciliation and `txsms install woocommerce`
    consumer_secret = fields.String()
    name = fields.String()
    locale = _locale()
    # order status slug -> event kind, over the connector's defaults; "" sends nothing
    status_events = fields.Dict(
        keys=fields.String(),
        values=Text(
            validate=_one_of(
                ("", *(k for k in MESSAGE_KINDS if k.startswith(("order.", "shipment.")))),
                "event kind",
            )
        ),
    )
    # what a new shipment-tracking number sends; "" turns tracking messages off
    tracking_event = Text(validate=_one_of(("", "order.fulfilled", "shipment.updated"), "kind"))
    reconcile_minutes = _int(1)

    @validates_schema
    def _rest_keys(self, data: dict[str, Any], **kwargs: Any) -> None:
        if bool(data.get("consumer_key")) != bool(data.get("consumer_secret")):
            missing = "consumer_secret" if data.get("consumer_key") else "consumer_key"
            raise ValidationError({missing: ["consumer_key and consumer_secret go together"]})
        if data.get("reconcile_minutes") and not data.get("consumer_key"):
            needed = "reconciliation reads the REST API: set consumer_key and consumer_secret"
            raise ValidationError({"reconcile_minutes": [needed]})


class WooCommerceSchema(_Section):
    unique = ("stores", "url")
    stores = fields.List(fields.Nested(StoreSchema), load_default=list)

    @validates_schema
    def _same_store(self, data: dict[str, Any], **kwargs: Any) -> None:
        # Deliveries pick their store by X-WC-Webhook-Source, whatever its scheme and case.
        from urllib.parse import urlsplit

        seen: list[tuple[str, str]] = []
        for i, store in enumerate(data.get("stores", [])):
            parts = urlsplit(store.get("url", ""))
            key = (parts.netloc.lower(), parts.path.rstrip("/"))
            if key in seen:
                error = f"the same store as stores.{seen.index(key)} (scheme and case aside)"
                raise ValidationError({"stores": {i: {"url": [error]}}})
            seen.append(key)


# -- [[crm]]: a CRM poller source (connectors/crm), loaded as plain dicts. Defaults live in the
# connector, so a value left out stays out here.

CRM_EVENTS = (*MESSAGE_KINDS, "customer.consent")
_PATH = r"[^.\s]+(\.[^.\s]+)*\Z"  # a dotted field path into a record: properties.dealstage


def _path(**kwargs: Any) -> Text:
    return Text(
        validate=validate.Regexp(_PATH, error="expected a field path such as 'a.b.c'"), **kwargs
    )


def _seconds(value: Any) -> int:
    """A duration: "24h", "90m", "1d", "30s", or a number of seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([dhms]?)", str(value).strip())
    if isinstance(value, bool) or not match:
        raise ValidationError('expected a duration such as "24h", "90m" or "1d"')
    seconds = float(match[1]) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[match[2]]
    if seconds <= 0:
        raise ValidationError("must be more than zero")
    return round(seconds)


class _Converted(fields.Field):
    """A value of any TOML type, checked and converted by a function."""

    def __init__(self, convert: Callable[[Any], Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.convert = convert

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        return self.convert(value)


def _paths(value: Any) -> list[str]:
    """One field path, or several tried in order (the first with a value wins)."""
    items = [value] if isinstance(value, str) else value
    if not (isinstance(items, list) and items and all(isinstance(p, str) for p in items)):
        raise ValidationError("expected a field path or a list of field paths")
    bad = [p for p in items if not re.match(_PATH, p)]
    if bad:
        raise ValidationError(f"not a field path: '{bad[0]}'")
    return list(items)


def _key_template(key: str) -> None:
    if "{id}" not in key:
        raise ValueError(key)
    key.format(record="", id="", event="", modified=0)


def _context_map(value: Any, prefix: str = "") -> dict[str, str]:
    """Template context path -> record field path; nested tables or dotted keys."""
    if not isinstance(value, dict):
        raise ValidationError("expected a table of template paths to field paths")
    out: dict[str, str] = {}
    for key, path in value.items():
        name = f"{prefix}{key}"
        if isinstance(path, dict):
            out.update(_context_map(path, f"{name}."))
        elif not (isinstance(path, str) and re.match(_PATH, path)):
            raise ValidationError({name: ["expected a field path such as 'properties.firstname'"]})
        else:
            out[name] = path
    return out


class ConditionSchema(_Section):
    OPERATORS = ("equals", "not_equals", "in", "changed_to", "changed", "present")
    field = _path(required=True)
    equals = fields.Raw(allow_none=True)
    not_equals = fields.Raw(allow_none=True)
    in_ = fields.List(fields.Raw(), data_key="in")
    changed_to = fields.Raw(allow_none=True)
    changed = fields.Boolean()
    present = fields.Boolean()

    @validates_schema
    def _one_operator(self, data: dict[str, Any], **kwargs: Any) -> None:
        used = [
            op
            for op in ("equals", "not_equals", "in_", "changed_to", "changed", "present")
            if op in data
        ]
        if len(used) != 1:
            raise ValidationError(f"give exactly one of {', '.join(self.OPERATORS)}")


def _conditions(value: Any) -> list[dict[str, Any]]:
    """A condition table, or a list of them that must all hold."""
    if isinstance(value, dict):
        return [ConditionSchema().load(value)]
    if not isinstance(value, list) or not value:
        raise ValidationError("expected a condition table or a list of them")
    loaded, errors = [], {}
    for i, item in enumerate(value):
        try:
            loaded.append(ConditionSchema().load(item))
        except ValidationError as exc:
            errors[i] = exc.messages
    if errors:
        raise ValidationError(errors)
    return loaded


class CrmFieldsSchema(_Section):
    """Where a record keeps what events need; `[crm.defaults]` holds these for every rule."""

    phone = _Converted(_paths)
    country = _Converted(_paths)
    locale = _Converted(_paths)
    name = _Converted(_paths)
    timezone = _Converted(_paths)
    customer_id = _Converted(_paths)
    data = _Converted(_context_map)
    starts_at = _path()  # appointments: when it starts


class CrmRuleSchema(CrmFieldsSchema):
    """One mapping rule: a condition on a record, and the event it makes."""

    event = Text(required=True, validate=_one_of(CRM_EVENTS, "event kind"))
    when = _Converted(_conditions)  # absent: every record
    key = Text(
        validate=_must(
            _key_template, "must hold {id} and may use only {record}, {id}, {event} and {modified}"
        )
    )
    repeat = fields.Boolean()  # a new event for every modification the condition holds on
    reminders = fields.List(_Converted(_seconds), validate=validate.Length(min=1))
    consent = Text(validate=_one_of(("opt_out", "opt_in"), "consent action"))
    scope = Text(validate=_one_of(("all", "marketing"), "consent scope"))

    @validates_schema
    def _kind_keys(self, data: dict[str, Any], **kwargs: Any) -> None:
        event = data.get("event", "")
        errors: dict[str, list[str]] = {}
        if event == "appointment.reminder" and "reminders" not in data:
            errors["reminders"] = ['required when event = "appointment.reminder"']
        elif "reminders" in data and event != "appointment.reminder":
            errors["reminders"] = ['only for event = "appointment.reminder"']
        if "starts_at" in data and not event.startswith("appointment."):
            errors["starts_at"] = ["only for appointment events"]
        if event == "customer.consent" and "consent" not in data:
            errors["consent"] = ['required when event = "customer.consent" (opt_out or opt_in)']
        for key in ("consent", "scope"):
            if key in data and event != "customer.consent":
                errors[key] = ['only for event = "customer.consent"']
        if errors:
            raise ValidationError(errors)


class CrmAuthSchema(_Section):
    NEEDS = {"bearer": ("token",), "basic": ("username", "password"), "header": ("name", "value")}
    type = Text(required=True, validate=_one_of(NEEDS, "auth type"))
    token = fields.String()
    username = fields.String()
    password = fields.String()
    name = fields.String()  # the header's name, e.g. X-Api-Key
    value = fields.String()

    @validates_schema
    def _needs(self, data: dict[str, Any], **kwargs: Any) -> None:
        kind = data.get("type")
        needed = self.NEEDS.get(kind, ())
        errors = {k: [f'required when type = "{kind}"'] for k in needed if not data.get(k)}
        errors |= {
            k: [f'not used when type = "{kind}"']
            for k in ("token", "username", "password", "name", "value")
            if k in data and k not in needed
        }
        if errors:
            raise ValidationError(errors)


class CrmSchema(_Section):
    # The name goes into event sources (`crm:<name>`) and poller cursors: keep it plain.
    name = Text(required=True, validate=validate.Regexp(r"[a-z0-9_-]+\Z", error="use a-z 0-9 _ -"))
    kind = Text(required=True, validate=_one_of(("hubspot", "http"), "CRM kind"))
    enabled = fields.Boolean()
    interval_seconds = _positive()
    overlap_seconds = fields.Float(validate=validate.Range(min=0))
    rate_per_second = _positive()
    page_size = _int(1, 1000)
    seen_limit = _int(0)
    timeout_seconds = _positive()
    base_url = _url()
    record = Text(validate=validate.Regexp(r"[A-Za-z0-9_-]+\Z", error="use A-Z a-z 0-9 _ -"))
    defaults = fields.Nested(CrmFieldsSchema)  # for every rule that does not say otherwise
    mapping = fields.List(fields.Nested(CrmRuleSchema))
    sample = fields.Dict(keys=fields.String())  # a record, for `txsms check-config`
    # kind = "hubspot"
    token = fields.String()  # a private-app access token, e.g. "${HUBSPOT_TOKEN}"
    object = Text(validate=validate.Regexp(r"[A-Za-z0-9_-]+\Z", error="expected an object type"))
    modified_property = fields.String()
    properties = fields.List(fields.String())
    # object type -> the properties to read of the associated records (a deal's contacts)
    associations = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    # kind = "http"
    url = _url()
    auth = fields.Nested(CrmAuthSchema)
    params = fields.Dict(keys=fields.String(), values=fields.String())
    items_path = fields.String()  # "" : the body is the list
    id_path = _path()
    modified_path = _path()
    cursor_param = fields.String()
    cursor_format = Text(validate=_one_of(("iso", "epoch", "epoch_ms"), "cursor format"))
    next_path = _path()  # next page URL (or token, with next_param) in the body
    next_param = fields.String()
    sorted = fields.Boolean()  # items come oldest-modified first

    ONLY = {
        "hubspot": ("token", "object", "modified_property", "properties", "associations"),
        "http": (
            *("url", "auth", "params", "items_path", "id_path", "modified_path"),
            *("cursor_param", "cursor_format", "next_path", "next_param", "sorted"),
        ),
    }

    @validates_schema
    def _kind_keys(self, data: dict[str, Any], **kwargs: Any) -> None:
        kind = data.get("kind")
        errors: dict[str, Any] = {
            key: [f'only for kind = "{other}"']
            for other, keys in self.ONLY.items()
            if other != kind
            for key in keys
            if key in data
        }
        if kind == "hubspot" and not data.get("token"):
            errors["token"] = ['required when kind = "hubspot" (a private-app token)']
        if kind == "hubspot" and data.get("page_size", 0) > 200:
            errors["page_size"] = ["HubSpot search returns at most 200 per page"]
        if kind == "http" and not data.get("url"):
            errors["url"] = ['required when kind = "http"']
        if "next_param" in data and "next_path" not in data:
            errors["next_param"] = ["needs next_path (where the body holds the token)"]
        seen: dict[str, int] = {}
        for i, rule in enumerate(data.get("mapping", [])):
            event = rule.get("event")
            if event == "appointment.reminder" and "starts_at" not in {
                **data.get("defaults", {}),
                **rule,
            }:
                problem = "required for reminders (here or in [crm.defaults])"
                errors.setdefault("mapping", {})[i] = {"starts_at": [problem]}
            if event in seen and not (rule.get("key") and data["mapping"][seen[event]].get("key")):
                problem = f"mapping.{seen[event]} also makes {event}: give both rules a key"
                errors.setdefault("mapping", {})[i] = {"key": [problem]}
            seen.setdefault(event, i)
        if errors:
            raise ValidationError(errors)


class ConfigSchema(_Section):
    builds = Config
    noun = "section"
    unique = ("crm", "name")
    server = fields.Nested(ServerSchema)
    storage = fields.Nested(StorageSchema)
    security = fields.Nested(SecuritySchema)
    sender = fields.Nested(SenderSchema)
    provider = fields.Nested(ProviderSchema)
    policy = fields.Nested(PolicySchema)
    worker = fields.Nested(WorkerSchema)
    templates = fields.Nested(TemplatesSchema)
    shopify = fields.Nested(ShopifySchema)
    woocommerce = fields.Nested(WooCommerceSchema)
    crm = fields.List(fields.Nested(CrmSchema))


# --- Loading


def _substitute(value: Any, environ: Mapping[str, str], key: str, file: str) -> Any:
    """Replace ${VAR} and ${VAR:-default} (the default also when VAR is empty, as in a shell)."""
    if isinstance(value, dict):
        return {
            k: _substitute(v, environ, f"{key}.{k}" if key else k, file) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute(v, environ, f"{key}.{i}", file) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        name, default = match.groups()
        found = environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            raise ConfigError(f"environment variable {name} is not set", key=key, file=file)
        return found

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", lookup, value)


def _flatten(messages: Any, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Marshmallow's nested messages as (dotted key, problem) pairs."""
    if isinstance(messages, dict):
        return [
            pair
            for k, v in messages.items()
            for pair in _flatten(v, path if k == "_schema" else (*path, str(k)))
        ]
    if isinstance(messages, list):
        return [pair for m in messages for pair in _flatten(m, path)]
    return [(".".join(path), str(messages))]


def _key_order(problem: tuple[str, str]) -> list[tuple[int, int, str]]:
    # Numeric parts sort as numbers: shops.2 before shops.10.
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in problem[0].split(".")]


def config_from_mapping(
    data: dict[str, Any], *, file: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate parsed configuration. Raises ConfigError for the first problem by key, with
    every (key, problem) found in `.all_errors` (for `txsms check-config`)."""
    data = _substitute(data, os.environ if environ is None else environ, "", file)
    try:
        return ConfigSchema().load(data)
    except ValidationError as exc:
        problems = sorted(_flatten(exc.messages), key=_key_order)
        error = ConfigError(problems[0][1], key=problems[0][0] or None, file=file)
        error.all_errors = problems  # type: ignore[attr-defined]
        raise error from None


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate the TOML file at `path`, else at $TXSMS_CONFIG."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("TXSMS_CONFIG") or None
    if path is None:
        raise ConfigError("no configuration: pass --config PATH or set TXSMS_CONFIG")
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return replace(config_from_mapping(data, file=file, environ=environ), path=Path(file))
