"""The canonical Event: the one currency between connectors and the core."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

#: Every event kind the engine knows. Connectors translate platform payloads into these.
MESSAGE_KINDS: tuple[str, ...] = (
    "order.created",
    "order.paid",
    "order.fulfilled",
    "order.cancelled",
    "order.refunded",
    "shipment.updated",
    "appointment.booked",
    "appointment.reminder",
    "appointment.cancelled",
    "account.alert",
)
#: Kinds that change state instead of producing a message.
#: `source.disabled` stops a source from sending (e.g. Shopify app/uninstalled);
#: `messages.cancel` cancels the pending messages of one order or appointment (`Event.order`),
#: e.g. the reminders of a moved or cancelled appointment (data: kinds, reason).
CONTROL_KINDS: tuple[str, ...] = (
    "customer.consent",
    "privacy.redact",
    "privacy.data_request",
    "source.disabled",
    "messages.cancel",
)
EVENT_KINDS: tuple[str, ...] = MESSAGE_KINDS + CONTROL_KINDS

SHIPMENT_STATUSES: tuple[str, ...] = (
    "in_transit",
    "out_for_delivery",
    "delivered",
    "attempted_delivery",
    "failure",
)

#: Preference categories a recipient can switch off; "marketing" also needs an opt-in.
CATEGORIES: tuple[str, ...] = ("orders", "shipping", "appointments", "account", "marketing")


@dataclass(frozen=True)
class Recipient:
    phone: str | None = None
    name: str | None = None
    locale: str | None = None
    country: str | None = None  # ISO 3166 alpha-2 hint for numbers without a leading +
    customer_id: str | None = None
    timezone: str | None = None  # an IANA zone the platform knows for this person


@dataclass(frozen=True)
class Consent:
    """A consent change the platform captured, e.g. Shopify's sms_marketing_consent."""

    scope: str  # "marketing" | "all"
    action: str  # "opt_in" | "opt_out"
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OrderRef:
    """Ties an event to a platform order, so later deliveries that lack the number or the
    order name (a Shopify refund, a WooCommerce status change) can still be addressed, and
    deliveries older than what was already seen are ignored."""

    ref: str  # the platform's order id, as a string (ids above 2**53 stay exact)
    status: str | None = None
    modified_at: float | None = None  # the platform's own last-modified time of the order


@dataclass(frozen=True)
class Event:
    source: str
    kind: str
    key: str
    recipient: Recipient = field(default_factory=Recipient)
    data: dict[str, Any] = field(default_factory=dict)
    occurred_at: float = field(default_factory=time.time)
    consent: Consent | None = None
    send_at: float | None = None
    order: OrderRef | None = None
    # After this time the message is pointless (a reminder for an appointment that has
    # started): skipped as `expired` instead of sent late, e.g. when quiet hours push it.
    expires_at: float | None = None
    # A connector that knows the event must not send says why (e.g. "test_order"); the
    # pipeline records the skip like any other decision.
    skip: str | None = None
