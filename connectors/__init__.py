"""Platform connectors, looked up by name. Adding one is one file and one line here."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

#: name -> module; each module defines `Connector` (a connectors.base.Connector subclass)
#: and may define click commands `install_command` and `simulate_command`.
REGISTRY: dict[str, str] = {
    "shopify": "txsms.connectors.shopify",
    "woocommerce": "txsms.connectors.woocommerce",
}


def module(name: str) -> ModuleType:
    return import_module(REGISTRY[name])
