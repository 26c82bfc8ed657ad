"""The console provider: prints every SMS to stdout instead of sending it.

For development and demos. Numbers are redacted unless `show_numbers=True` is passed through
`make_provider(config, show_numbers=True)`.
"""

from __future__ import annotations

import sys
import threading
import uuid
from typing import TYPE_CHECKING

from txsms.core.providers.base import Outcome, OutgoingMessage, Provider, ProviderResult
from txsms.core.redact import redact_phone

if TYPE_CHECKING:
    from txsms.core.config import ProviderConfig

_print_lock = threading.Lock()  # one block per message, even with several worker threads


class ConsoleProvider(Provider):
    name = "console"

    def __init__(
        self,
        config: ProviderConfig,
        *,
        public_url: str | None = None,
        show_numbers: bool = False,
    ):
        super().__init__(config, public_url=public_url)
        self.show_numbers = show_numbers

    def send(self, message: OutgoingMessage) -> ProviderResult:
        to = message.to if self.show_numbers else redact_phone(message.to)
        unit = "segment" if message.segments == 1 else "segments"
        block = f"SMS to {to} ({message.encoding}, {message.segments} {unit})\n{message.body}\n"
        try:
            with _print_lock:
                out = sys.stdout  # looked up each time so pytest's capsys and redirects see it
                out.write(block)
                out.flush()
        except (OSError, ValueError) as exc:  # closed or broken stdout: nothing was shown
            return ProviderResult(Outcome.RETRY, error_text=f"stdout: {type(exc).__name__}")
        return ProviderResult(
            Outcome.SENT,
            provider_message_id=f"console-{uuid.uuid4().hex}",
            provider_status="sent",
            segments=message.segments,
        )
