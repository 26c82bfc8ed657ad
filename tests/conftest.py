"""Shared fixtures: a real database (SQLite file, and PostgreSQL when available), configs,
a runtime, and a fake Twilio over real HTTP.

PostgreSQL runs use TXSMS_TEST_DATABASE_URL (`.ci/run` sets it); each test gets its own
schema, dropped afterwards. Without it, those runs are skipped and pytest's summary says so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.fernet import Fernet
from fakes.twilio import FakeTwilio

from txsms.core.config import Config, config_from_mapping
from txsms.core.runtime import Runtime

API_TOKEN = "test-api-token-0123456789abcdef"
KEY = Fernet.generate_key().decode()
INDEX_KEY = "test-index-key-0123456789abcdef"
PG_URL = os.environ.get("TXSMS_TEST_DATABASE_URL")


def _pg_available() -> str | None:
    if not PG_URL:
        return "TXSMS_TEST_DATABASE_URL is not set: PostgreSQL runs skipped"
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"PostgreSQL at TXSMS_TEST_DATABASE_URL is unreachable ({type(exc).__name__})"
    return None


PG_SKIP = _pg_available()


@contextmanager
def pg_schema() -> Iterator[str]:
    """A URL to a PostgreSQL schema of its own, dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'txsms.db'}"
        return
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with pg_schema() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'txsms.db'}"


def make_config(tmp_path, url: str, **sections: dict[str, Any]) -> Config:
    """A valid config for tests; `sections` are merged over the defaults below."""
    data: dict[str, Any] = {
        "server": {"public_url": "https://sms.example.test"},
        "storage": {"url": url, "data_dir": str(tmp_path / "data")},
        "security": {"keys": [KEY], "index_key": INDEX_KEY, "api_tokens": [API_TOKEN]},
        "sender": {"name": "Test Shop", "default_region": "US", "timezone": "UTC"},
        "worker": {"poll_seconds": 0.05, "backoff_base_seconds": 0.2, "lease_seconds": 30},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_mapping(data, file=str(tmp_path / "test.toml"))


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


@pytest.fixture
def runtime_factory(tmp_path, database_url):
    """Build runtimes on the test's database; each is migrated and closed afterwards."""
    made: list[Runtime] = []

    def build(**sections) -> Runtime:
        runtime = Runtime(make_config(tmp_path, database_url, **sections))
        runtime.prepare_database(migrate=True)
        made.append(runtime)
        return runtime

    yield build
    for runtime in made:
        runtime.close()


@pytest.fixture
def runtime(runtime_factory) -> Runtime:
    return runtime_factory()


@pytest.fixture
def pg_runtime(tmp_path) -> Iterator[Runtime]:
    """A runtime on a PostgreSQL schema of its own (tests of PostgreSQL-only behaviour)."""
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with pg_schema() as url:
        runtime = Runtime(make_config(tmp_path, url))
        runtime.prepare_database(migrate=True)
        yield runtime
        runtime.close()


def twilio_section(fake: FakeTwilio, **extra: Any) -> dict[str, Any]:
    """The `[provider]` table pointing at a FakeTwilio."""
    from fakes.twilio import FROM_NUMBER

    return {
        "kind": "twilio",
        "base_url": fake.url,
        "account_sid": fake.account_sid,
        "auth_token": fake.auth_token,
        "from": FROM_NUMBER,
        **extra,
    }


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for test configs: tables of scalars and lists (no TOML writer in stdlib)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
