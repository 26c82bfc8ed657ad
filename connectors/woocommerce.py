"""woocommerce connector (being written)."""

from __future__ import annotations

from txsms.connectors.base import Connector as _Base
from txsms.core.errors import SignatureError


class Connector(_Base):
    name = "woocommerce"

    def verify(self, headers, body):
        raise SignatureError("woocommerce connector is not configured")

    def events(self, delivery, body):
        return []
