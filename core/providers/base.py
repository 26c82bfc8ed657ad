"""The provider interface: one small file per SMS provider behind it.

The worker owns retries, leases and bookkeeping; a provider only turns one message into one
HTTP request and classifies the answer into an `Outcome`. That classification is the whole
contract, because it decides between "try again", "never again" and "ask a human".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from txsms.core.config import ProviderConfig


class Outcome(StrEnum):
    SENT = "sent"  # the provider accepted the message
    RETRY = "retry"  # not accepted, safe to try again (429, 5xx, connection refused)
    FAILED = "failed"  # permanent: never retry this message
    OPTED_OUT = "opted_out"  # permanent, and the recipient has opted out at the provider
    INVALID_NUMBER = "invalid_number"  # permanent, and the number cannot receive SMS
    UNKNOWN = "unknown"  # the request may have reached the provider: never resend blindly


@dataclass(frozen=True)
class OutgoingMessage:
    id: str
    to: str  # E.164
    body: str
    segments: int = 1
    encoding: str = "GSM-7"


@dataclass(frozen=True)
class ProviderResult:
    outcome: Outcome
    provider_message_id: str | None = None
    provider_status: str | None = None  # the provider's own word, e.g. Twilio "queued"
    error_code: str | None = None
    error_text: str | None = None
    retry_after: float | None = None  # seconds, from a Retry-After header
    segments: int | None = None  # the provider's count, when it reports one


@dataclass(frozen=True)
class CallbackRequest:
    """A provider's webhook request, as the provider signed it."""

    method: str
    url: str  # the public URL the provider called: server.public_url + path + query
    headers: Mapping[str, str]
    body: bytes
    form: Mapping[str, list[str]] = field(default_factory=dict)  # POST form fields
    query: Mapping[str, list[str]] = field(default_factory=dict)

    def params(self) -> dict[str, str]:
        """Query and form fields, one value each (the last), for parsing."""
        merged = {k: v[-1] for k, v in self.query.items() if v}
        merged.update({k: v[-1] for k, v in self.form.items() if v})
        return merged


@dataclass(frozen=True)
class InboundMessage:
    sender: str  # the texter's number in E.164 (providers that drop the "+" add it back)
    text: str
    recipient: str | None = None  # our number
    provider_message_id: str | None = None
    # The provider already answered this keyword itself (Twilio Advanced Opt-Out sends
    # OptOutType): record it, but send no second confirmation.
    handled_keyword: str | None = None


@dataclass(frozen=True)
class StatusReport:
    provider_message_id: str
    status: str  # normalised: "queued" | "sent" | "delivered" | "undelivered" | "failed"
    error_code: str | None = None
    error_text: str | None = None
    segments: int | None = None


class LookupUnavailable(Exception):
    """The provider could not be asked right now; try to settle later."""


class Provider(ABC):
    """Base of every provider. Subclasses read their settings in __init__ and fail eagerly."""

    name: ClassVar[str]

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        self.config = config
        self.public_url = public_url.rstrip("/") if public_url else None

    @abstractmethod
    def send(self, message: OutgoingMessage) -> ProviderResult:
        """Send one message; never raises for provider or network trouble."""

    def status_callback_url(self) -> str | None:
        if not self.public_url:
            return None
        return f"{self.public_url}/webhooks/providers/{self.name}/status"

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release connections."""

    # -- the return path: inbound messages and delivery receipts ---------------------------

    #: Error codes in receipts that mean the number can never receive SMS.
    invalid_number_codes: ClassVar[frozenset[str]] = frozenset()
    #: Error codes in receipts that mean the recipient opted out at the carrier or provider.
    opted_out_codes: ClassVar[frozenset[str]] = frozenset()

    def verify_callback(self, request: CallbackRequest) -> bool:
        """True only for a request signed by this provider; unsigned is refused (403)."""
        return False

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        raise NotImplementedError(f"{self.name} does not receive messages")

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        raise NotImplementedError(f"{self.name} does not send delivery receipts")

    def inbound_response(self, reply: str | None) -> tuple[bytes, str] | None:
        """Providers that reply in the webhook's response (Twilio's TwiML) return (body,
        content type); the others return None and the reply is queued as a message."""
        return None

    # Settling `unknown`: can the provider tell whether a message reached it?
    can_lookup: ClassVar[bool] = False

    def lookup(self, to: str, body: str, since: float) -> ProviderResult | None:
        """The provider's record of a message with this body sent to `to` since `since`, or
        None if it has none. Raises LookupUnavailable when it cannot be asked now."""
        raise LookupUnavailable(f"{self.name} cannot be asked about sent messages")
