"""Providers, looked up by `provider.kind`. Adding one is one file and one line here."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    LookupUnavailable,
    Outcome,
    OutgoingMessage,
    Provider,
    ProviderResult,
    StatusReport,
)

if TYPE_CHECKING:
    from txsms.core.config import ProviderConfig

#: kind -> "module:Class", imported on first use so an unused provider costs nothing.
REGISTRY: dict[str, str] = {
    "console": "txsms.core.providers.console:ConsoleProvider",
    "twilio": "txsms.core.providers.twilio:TwilioProvider",
    "vonage": "txsms.core.providers.vonage:VonageProvider",
    "plivo": "txsms.core.providers.plivo:PlivoProvider",
    "messagebird": "txsms.core.providers.messagebird:MessageBirdProvider",
}


def make_provider(config: ProviderConfig, *, public_url: str | None = None, **options) -> Provider:
    module_name, _, class_name = REGISTRY[config.kind].partition(":")
    cls = getattr(import_module(module_name), class_name)
    return cls(config, public_url=public_url, **options)


__all__ = [
    "REGISTRY",
    "CallbackRequest",
    "InboundMessage",
    "LookupUnavailable",
    "Outcome",
    "OutgoingMessage",
    "Provider",
    "ProviderResult",
    "StatusReport",
    "make_provider",
]
