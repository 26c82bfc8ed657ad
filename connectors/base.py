"""What every platform connector is: verify a delivery, translate it into canonical Events.

A connector knows one platform's headers, signatures and payloads, and nothing of HTTP
serving or sending. The Flask side (`webhooks/platforms.py`) stays generic: raw body in,
`verify`, `events`, `core.pipeline.ingest`, answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from txsms.core.config import Config
from txsms.core.events import Event


@dataclass(frozen=True)
class Delivery:
    """A verified request: who sent it and how to recognise it if it comes again."""

    source: str  # "shopify:<shop domain>", "woocommerce:<store host>"
    topic: str
    delivery_id: str | None = None  # the platform's dedupe id; None: rely on event keys
    account: Mapping[str, Any] = field(default_factory=dict)  # the matched config entry


class Connector(ABC):
    name: ClassVar[str]

    def __init__(self, config: Config):
        self.config = config

    @abstractmethod
    def verify(self, headers: Mapping[str, str], body: bytes) -> Delivery | None:
        """Authenticate a delivery from its headers and *raw* body.

        Returns None for a ping that is answered 200 and changes nothing. Raises
        SignatureError (answered 401) or PayloadError (400).
        """

    @abstractmethod
    def events(self, delivery: Delivery, body: bytes) -> list[Event]:
        """Translate a verified delivery; [] for topics that carry nothing to send."""
