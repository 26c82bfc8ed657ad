"""The runtime: everything built once from a Config and shared by the receiver and workers."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from txsms.core import storage
from txsms.core.config import Config, load_config
from txsms.core.crypto import Vault
from txsms.core.errors import ConfigError, TemplateError
from txsms.core.groupcommit import GroupCommitter
from txsms.core.templates import TemplateSet

log = logging.getLogger(__name__)


class Wakeup:
    """Tells idle workers in this process that new work was committed (the poll is the fallback)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def notify(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


class Runtime:
    def __init__(self, config: Config, *, engine: Engine | None = None):
        self.config = config
        # Compiling (and test-rendering) every template here means a bad template stops
        # start-up, not the first order.
        self.templates = TemplateSet(config.templates, config.sender)
        self.templates.check()
        self.engine = engine or storage.make_engine(config.storage)
        self.vault = Vault.from_config(config.security, config.storage.data_dir)
        self.wakeup = Wakeup()

    def prepare_database(self, *, migrate: bool | None = None) -> None:
        """Apply migrations (by default only on SQLite, where this process owns the file)."""
        if migrate is None:
            migrate = storage.is_sqlite(self.engine)
        if migrate:
            storage.upgrade(self.engine)
            return
        current, head = storage.current_revision(self.engine), storage.head_revision()
        if current != head:
            log.warning(
                "database is at revision %s, code expects %s: run 'txsms db upgrade'", current, head
            )

    @cached_property
    def _relaxed_engine(self) -> Engine:
        return storage.make_engine(self.config.storage, relaxed=True)

    @contextmanager
    def relaxed(self) -> Iterator[Connection]:
        """A transaction whose commit survives a crash but may be lost on power failure.

        For writes that are safe to lose that way: a send's recorded result (the message is
        then `unknown` and settled by asking the provider), a rate-limit slot. Anything that
        is acknowledged to someone, or that guards against sending twice, uses `engine`.
        """
        with self._relaxed_engine.begin() as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """Relaxed (see `relaxed`), for work that is a single statement: on PostgreSQL it
        commits by itself, one round trip where BEGIN, the statement and COMMIT take three,
        on one connection the process keeps for it (its users, the rate limiters, take a
        slot at a time). SQLite has no such saving: there it is a relaxed transaction."""
        if storage.is_sqlite(self._relaxed_engine):
            with self._relaxed_engine.begin() as conn:
                yield conn
            return
        with self._autocommitter.connection() as conn:
            yield conn

    @cached_property
    def _autocommitter(self) -> storage.KeptConnections:
        return storage.KeptConnections(self._relaxed_engine, storage.autocommitter, shared=True)

    @cached_property
    def committer(self) -> GroupCommitter:
        return GroupCommitter(self.engine)

    @cached_property
    def readers(self) -> storage.KeptConnections:
        """Connections for reads outside a write transaction, one per thread."""
        return storage.KeptConnections(self.engine)

    def close(self) -> None:
        for name in ("committer", "_ingest_committer", "readers", "_autocommitter"):
            if name in self.__dict__:
                self.__dict__[name].close()
        if "_relaxed_engine" in self.__dict__:
            self._relaxed_engine.dispose()
        self.engine.dispose()


class StartupError(Exception):
    """Why a process cannot start, in one line: the file, the key and what is wrong."""


def start(
    config: Config | str | os.PathLike | None = None, *, migrate: bool | None = None
) -> Runtime:
    """The runtime of a process that is starting: the config loaded (a path, or
    `$TXSMS_CONFIG`), every template compiled, the database reached and checked. What stops
    it is a StartupError, never a traceback: a bad file, key or template, or a database that
    cannot be reached."""
    try:
        if not isinstance(config, Config):
            config = load_config(config)
        runtime = Runtime(config)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except TemplateError as exc:
        raise StartupError(f"{config.path}: {exc}") from None
    try:
        runtime.prepare_database(migrate=migrate)
    except OperationalError as exc:
        runtime.close()
        raise StartupError(database_unavailable(exc)) from None
    return runtime


def database_unavailable(exc: OperationalError) -> str:
    return f"storage.url: the database is unavailable ({storage.unavailable(exc)})"
