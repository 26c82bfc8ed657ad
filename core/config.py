"""Configuration: TOML, `${VAR}` from the environment, validated by marshmallow schemas.

The section and key names are a contract (DESIGN.md); add keys freely, rename none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import time as dtime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # e.g. https://sms.example.com, used for callbacks and signatures
    max_body_bytes: int = 2 * 1024 * 1024
    threads: int = 8  # WSGI threads in `txsms serve`


@dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite:///txsms.db"
    data_dir: str = "txsms-data"  # exports, the generated development key
    sqlite_synchronous: str = "FULL"  # FULL: a commit survives power loss, not just a crash


@dataclass(frozen=True)
class SecurityConfig:
    keys: tuple[str, ...] = ()  # Fernet keys, newest first; empty: a development key is generated
    index_key: str | None = None  # blind-index key; default: derived from the oldest key
    api_tokens: tuple[str, ...] = ()
    retention_days: int = 30  # message bodies are purged this long after the final status


@dataclass(frozen=True)
class SenderConfig:
    name: str = "Our store"
    default_region: str = "US"
    timezone: str = "UTC"
    footer: str = "Reply STOP to opt out."
    help_reply: str = (
        "{name}: order and delivery updates. Reply STOP to opt out. Msg&data rates may apply."
    )
    stop_reply: str = (
        "{name}: you are unsubscribed and will get no more messages. Reply START to resubscribe."
    )
    start_reply: str = "{name}: you are subscribed again. Reply HELP for help, STOP to opt out."


@dataclass(frozen=True)
class ProviderConfig:
    kind: str = "console"
    base_url: str | None = None
    account_sid: str | None = None
    auth_token: str | None = None
    from_: str | None = None  # TOML key "from"
    messaging_service_sid: str | None = None
    rate_per_second: float = 10.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class PolicyConfig:
    quiet_hours: tuple[dtime, dtime] | None = None  # (start, end); may wrap midnight
    max_per_day: int | None = None


@dataclass(frozen=True)
class WorkerConfig:
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    concurrency: int = 1
    max_attempts: int = 8
    backoff_base_seconds: float = 2.0
    backoff_max_seconds: float = 3600.0
    unknown_grace_seconds: float = 300.0


@dataclass(frozen=True)
class TemplateConfig:
    body: str | None = None  # None: the built-in default for the kind
    urgent: bool | None = None  # None: the built-in default for the kind
    category: str | None = None
    locales: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    templates: dict[str, TemplateConfig] = field(default_factory=dict)
    # Platform sections: validated here, interpreted by their connectors.
    shopify: dict[str, Any] = field(default_factory=dict)
    woocommerce: dict[str, Any] = field(default_factory=dict)
    crm: tuple[dict[str, Any], ...] = ()
