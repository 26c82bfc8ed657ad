"""Platform connectors, looked up by name. Adding one is one file and one line here."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

#: name -> module. A webhook platform defines `Connector` (a connectors.base.Connector
#: subclass, served at POST /webhooks/<name>). Any module may define click commands
#: `install_command`, `simulate_command`, `reconcile_command` (as `txsms install <name>` …),
#: `commands` (top-level commands) and `background_jobs(runtime)` (run by `txsms serve`).
REGISTRY: dict[str, str] = {
    "shopify": "txsms.connectors.shopify",
    "woocommerce": "txsms.connectors.woocommerce",
    "crm": "txsms.connectors.crm",
}


def module(name: str) -> ModuleType:
    return import_module(REGISTRY[name])
