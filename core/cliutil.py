"""Helpers shared by the `txsms` commands, including those connectors add."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from txsms.core.config import Config, load_config
from txsms.core.errors import ConfigError
from txsms.core.phones import PhoneError, normalize
from txsms.core.redact import redact_phone
from txsms.core.runtime import Runtime, StartupError, start

config_option = click.option(
    "--config",
    "config_path",
    envvar="TXSMS_CONFIG",
    type=click.Path(dir_okay=False),
    help="Configuration file (default: $TXSMS_CONFIG).",
)


def load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def open_runtime(config_path: str | None, *, migrate: bool | None = None) -> Runtime:
    try:
        return start(config_path, migrate=migrate)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None


def parse_phone(runtime: Runtime, raw: str):
    try:
        return normalize(raw, runtime.config.sender.default_region)
    except PhoneError as exc:
        raise click.ClickException(f"{redact_phone(raw)}: {exc.reason}") from None


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
