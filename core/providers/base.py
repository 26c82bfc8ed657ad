"""The provider interface: one small file per SMS provider behind it.

The worker owns retries, leases and bookkeeping; a provider only turns one message into one
HTTP request and classifies the answer into an `Outcome`. That classification is the whole
contract, because it decides between "try again", "never again" and "ask a human".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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
