"""What every platform connector is: verify a delivery, translate it into canonical Events.

A connector knows one platform's headers, signatures and payloads, and nothing of HTTP
serving or sending. The Flask side (`webhooks/platforms.py`) stays generic: raw body in,
`verify`, `events`, `core.pipeline.ingest`, answer.

What a verification does is the same everywhere, and lives here: read the platform's headers
whatever their case, check an HMAC over the raw body against every configured secret, insist
on a topic. A connector adds only its names (`header_prefixes`, `signature_header`), how it
finds the account a delivery claims to come from, and what its payloads mean.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from txsms.core.config import Config
from txsms.core.errors import PayloadError, SignatureError
from txsms.core.events import Event


@dataclass(frozen=True)
class Delivery:
    """A verified request: who sent it and how to recognise it if it comes again."""

    source: str  # "shopify:<shop domain>", "woocommerce:<store host>"
    topic: str
    delivery_id: str | None = None  # the platform's dedupe id; None: rely on event keys
    account: Mapping[str, Any] = field(default_factory=dict)  # the matched config entry


class Headers:
    """A delivery's headers read by their platform names, whatever the case (proxies lower
    it), under any of the platform's prefixes; the first prefix is the one messages show."""

    def __init__(self, headers: Mapping[str, str], prefixes: tuple[str, ...]):
        self.lowered = {k.lower(): v for k, v in headers.items()}
        self.prefixes = prefixes

    def __getitem__(self, name: str) -> str:
        """`<prefix><name>` under the first prefix that has a value, stripped; "" if none."""
        for prefix in self.prefixes:
            if value := self.lowered.get(f"{prefix}{name}".lower()):
                return value.strip()
        return ""

    def spelled(self, name: str) -> str:
        return f"{self.prefixes[0]}{name}"

    @property
    def any_platform_header(self) -> bool:
        prefixes = tuple(p.lower() for p in self.prefixes)
        return any(k.startswith(prefixes) for k in self.lowered)

    @property
    def mime(self) -> str:
        """The Content-Type without its parameters, lower-cased; "" when there is none."""
        return self.lowered.get("content-type", "").split(";")[0].strip().lower()


def hmac_b64(key: bytes, body: bytes) -> str:
    """base64(HMAC-SHA256(key, body)), the signature both platforms send (not hex)."""
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


class Connector(ABC):
    name: ClassVar[str]
    #: How the platform spells its headers, e.g. ("X-Shopify-", "Shopify-"); all are read.
    header_prefixes: ClassVar[tuple[str, ...]]
    signature_header: ClassVar[str]  # after the prefix: "Hmac-Sha256"

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

    # -- for `verify` ------------------------------------------------------------------------

    def headers(self, headers: Mapping[str, str]) -> Headers:
        return Headers(headers, self.header_prefixes)

    def check_signature(self, headers: Headers, expected: Iterable[str], mismatch: str) -> None:
        """Raise SignatureError unless the signature header equals one of `expected`: the
        body signed with each configured secret, newest first (lazily: the first match ends
        it). Every secret is tried because during a rotation the platform signs with either.
        """
        given = headers[self.signature_header].encode()
        if not given:
            raise SignatureError(f"missing {headers.spelled(self.signature_header)}")
        # compare_digest on bytes: constant time, and no TypeError on a non-ASCII header.
        if not any(hmac.compare_digest(s.encode(), given) for s in expected):
            raise SignatureError(mismatch)

    @staticmethod
    def topic(headers: Headers) -> str:
        """The delivery's topic, lower-cased; a delivery without one cannot be routed (400)."""
        topic = headers["Topic"].lower()
        if not topic:
            raise PayloadError(f"missing {headers.spelled('Topic')}")
        return topic


# -- small readers for payloads that may carry nulls or odd types ------------------------------

#: A language tag as stores write it: "en", "fr-CA", "pt_BR", "zh-Hant-TW".
LOCALE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def epoch(value: Any) -> float | None:
    """An ISO 8601 time as epoch seconds; one without an offset is UTC (WooCommerce's *_gmt
    fields); None for anything unreadable, so the caller picks its own fallback."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
