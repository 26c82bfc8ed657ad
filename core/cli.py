"""The `txsms` command line. Every command takes --config PATH (or TXSMS_CONFIG)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import uuid
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from txsms.core import consent as consent_mod
from txsms.core import privacy, storage
from txsms.core.cliutil import config_option, iso, load, open_runtime, parse_phone
from txsms.core.config import Config
from txsms.core.crypto import DecryptionError
from txsms.core.errors import ConfigError, TemplateError
from txsms.core.events import CATEGORIES, EVENT_KINDS, Event, Recipient
from txsms.core.logs import setup_logging
from txsms.core.redact import redact_phone
from txsms.core.runtime import Runtime, database_unavailable
from txsms.core.scheduler import Job, Scheduler

log = logging.getLogger("txsms")


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # A database that cannot be reached (down, a wrong host or port, a SQLite file in a
        # missing directory) stops any command with one line, not a traceback.
        try:
            return super().invoke(ctx)
        except OperationalError as exc:
            raise click.ClickException(database_unavailable(exc)) from None


@click.group(cls=_Commands)
@click.option("--log-level", default="INFO", envvar="TXSMS_LOG_LEVEL", show_default=True)
def cli(log_level: str) -> None:
    """Self-hosted transactional SMS for online stores and CRMs."""
    setup_logging(log_level.upper())


# -- running --------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--show-numbers", is_flag=True, help="Console provider: print full numbers.")
def serve(config_path: str | None, show_numbers: bool) -> None:
    """Run the receiver (waitress) and a worker in one process."""
    from waitress.server import create_server

    from txsms.core.providers import make_provider
    from txsms.core.worker import Worker
    from txsms.webhooks import create_app

    runtime = open_runtime(config_path)
    cfg = runtime.config
    options = {"show_numbers": show_numbers} if cfg.provider.kind == "console" else {}
    worker = Worker(
        runtime, make_provider(cfg.provider, public_url=cfg.server.public_url, **options)
    )
    app = create_app(runtime=runtime)
    scheduler = Scheduler(_background_jobs(runtime))
    server = create_server(
        app, host=cfg.server.host, port=cfg.server.port, threads=cfg.server.threads, ident="txsms"
    )
    worker.start()
    scheduler.start()

    def _terminate(signum, _frame):
        raise SystemExit(0)  # waitress's run() stops its loop and drains its threads on this

    signal.signal(signal.SIGTERM, _terminate)
    log.info(
        "txsms serving on http://%s:%s (provider %s, database %s)",
        cfg.server.host,
        server.effective_port,
        cfg.provider.kind,
        runtime.engine.url.render_as_string(),
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("shutting down")
        server.close()
        scheduler.stop()
        worker.stop()
        runtime.close()


def _background_jobs(runtime: Runtime) -> list[Job]:
    """Jobs the connectors ask `serve` to run (each module may define `background_jobs`)."""
    from txsms import connectors

    jobs: list[Job] = []
    for name in connectors.REGISTRY:
        make_jobs = getattr(connectors.module(name), "background_jobs", None)
        if make_jobs is not None:
            jobs += make_jobs(runtime)
    return jobs


@cli.command()
@config_option
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    help="Sending threads (default: worker.concurrency).",
)
def worker(config_path: str | None, concurrency: int | None) -> None:
    """Run a worker alone (scale-out: run as many as you like)."""
    from txsms.core.worker import Worker

    runtime = open_runtime(config_path)
    w = Worker(runtime, concurrency=concurrency)
    stop = w.stop_event
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    w.start()
    log.info("worker %s running with %d thread(s)", w.worker_id, w.concurrency)
    while not stop.wait(0.5):
        pass
    w.stop()
    runtime.close()


@cli.command("check-config")
@config_option
def check_config(config_path: str | None) -> None:
    """Validate the configuration and render every template with sample data."""
    from txsms.core.templates import TemplateSet

    config = load(config_path)
    try:
        rows = TemplateSet(config.templates, config.sender).check()
    except TemplateError as exc:
        raise click.ClickException(f"{config.path}: {exc}") from None
    crm_lines = _check_crm(config)
    click.echo(f"{config.path}: configuration is valid")
    click.echo(f"{'template':<34} {'locale':<8} {'encoding':<8} {'segments':>8}")
    for row in rows:
        click.echo(f"{row.key:<34} {row.locale or '-':<8} {row.encoding:<8} {row.segments:>8}")
    for line in crm_lines:
        click.echo(line)
    if not config.security.keys:
        click.echo("warning: security.keys is empty: a development key will be generated")


def _check_crm(config: Config) -> list[str]:
    """Run each CRM source's mapping over its sample record; the events it would produce."""
    if not config.crm:
        return []
    from txsms.connectors import crm

    try:
        return crm.check(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_path: str | None, revision: str) -> None:
    """Apply migrations."""
    config = load(config_path)
    engine = storage.make_engine(config.storage)
    storage.upgrade(engine, revision)
    click.echo(f"database at revision {storage.current_revision(engine)}")


# -- messages -------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--to", "phone", required=True, help="Recipient number.")
@click.option("--kind", required=True, type=click.Choice(EVENT_KINDS))
@click.option("--data", default="{}", help="Template data as JSON.")
@click.option("--key", default=None, help="Idempotency key (default: a new one).")
@click.option("--locale", default=None)
def send(config_path, phone, kind, data, key, locale) -> None:
    """Queue a manual message through the same pipeline as any event."""
    from txsms.core.pipeline import ingest

    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    if not isinstance(payload, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--data")
    runtime = open_runtime(config_path)
    event = Event(
        source="cli",
        kind=kind,
        key=key or f"manual:{uuid.uuid4().hex}",
        recipient=Recipient(phone=phone, locale=locale),
        data=payload,
    )
    [result] = ingest(runtime, [event])
    for d in result.messages:
        click.echo(
            f"{result.status}: message {d.id} {d.status}" + (f" ({d.reason})" if d.reason else "")
        )
    if not result.messages:
        click.echo(f"{result.status}: event {result.id}")


def _message_json(runtime: Runtime, row) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "source": row.source,
        "status": row.status,
        "reason": row.reason,
        "to": redact_phone(runtime.vault.decrypt(row.to_enc)) if row.to_enc else None,
        "provider_message_id": row.provider_message_id,
        "error_code": row.error_code,
        "error_text": row.error_text,
        "provider_status": row.provider_status,
        "attempts": row.attempts,
        "updated_at": iso(row.updated_at),
        "created_at": iso(row.created_at),
        "sent_at": iso(row.sent_at),
        "send_at": iso(row.send_at),
    }


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--phone", default=None, help="Only this recipient.")
@click.option("--status", default=None, help="Only this status, e.g. unknown.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
def messages(config_path, as_json, phone, status, limit) -> None:
    """List messages, newest first."""
    runtime = open_runtime(config_path)
    table = storage.messages
    query = select(table).order_by(table.c.created_at.desc()).limit(limit)
    if phone:
        query = query.where(
            table.c.phone_index == runtime.vault.index(parse_phone(runtime, phone).e164)
        )
    if status:
        query = query.where(table.c.status == status)
    with runtime.engine.connect() as conn:
        rows = conn.execute(query).all()
    for row in rows:
        item = _message_json(runtime, row)
        if as_json:
            click.echo(json.dumps(item))
        else:
            why = f" ({item['reason']})" if item["reason"] else ""
            click.echo(
                f"{item['created_at']}  {row.id}  {row.kind:<22} {item['to'] or '-':<14} "
                f"{row.status}{why}"
            )


@cli.command()
@config_option
@click.argument("message_id")
def resend(config_path, message_id) -> None:
    """Send an `unknown` or `failed` message once more (you checked it did not arrive)."""
    runtime = open_runtime(config_path)
    table = storage.messages
    with runtime.engine.begin() as conn:
        row = conn.execute(
            table.update()
            .where(table.c.id == message_id, table.c.status.in_(("unknown", "failed")))
            .values(
                status="pending",
                reason="resend",
                in_flight=False,
                send_at=time.time(),
                updated_at=time.time(),
                finished_at=None,
            )
            .returning(table.c.id)
        ).first()
    if row is None:
        raise click.ClickException(f"no unknown or failed message with id {message_id}")
    click.echo(f"message {message_id} queued again")


# -- consent and preferences --------------------------------------------------------------


@cli.group()
def consent() -> None:
    """Show or change a number's consent."""


def _consent_report(runtime: Runtime, e164: str) -> dict[str, Any]:
    index = runtime.vault.index(e164)
    with runtime.engine.connect() as conn:
        state = consent_mod.state(conn, index)
        entries = consent_mod.ledger(conn, runtime.vault, index)
        off = sorted(consent_mod.disabled_categories(conn, index))
    for entry in entries:
        entry["at"] = iso(entry["at"])
    return {
        "phone": redact_phone(e164),
        "transactional": state.transactional,
        "marketing": state.marketing,
        "categories_off": off,
        "ledger": entries,
    }


@consent.command("show")
@config_option
@click.argument("phone")
@click.option("--json", "as_json", is_flag=True)
def consent_show(config_path, phone, as_json) -> None:
    runtime = open_runtime(config_path)
    report = _consent_report(runtime, parse_phone(runtime, phone).e164)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"{report['phone']}: transactional {report['transactional']}, "
        f"marketing {report['marketing']}"
    )
    if report["categories_off"]:
        click.echo(f"categories off: {', '.join(report['categories_off'])}")
    for e in report["ledger"]:
        click.echo(f"  {e['at']}  {e['action']:<8} {e['scope']:<10} {e['source']}")


def _consent_change(config_path, phone, scope, action, note) -> None:
    runtime = open_runtime(config_path)
    e164 = parse_phone(runtime, phone).e164
    with runtime.engine.begin() as conn:
        consent_mod.record(
            conn,
            runtime.vault,
            runtime.vault.index(e164),
            scope=scope,
            action=action,
            source="cli",
            evidence={"note": note} if note else {},
        )
    report = _consent_report(runtime, e164)
    click.echo(
        f"{report['phone']}: transactional {report['transactional']}, "
        f"marketing {report['marketing']}"
    )


_scope = click.option(
    "--scope", type=click.Choice(["all", "marketing"]), default="all", show_default=True
)
_note = click.option("--note", default=None, help="Evidence to keep, e.g. a ticket number.")


@consent.command("opt-out")
@config_option
@click.argument("phone")
@_scope
@_note
def consent_opt_out(config_path, phone, scope, note) -> None:
    _consent_change(config_path, phone, scope, "opt_out", note)


@consent.command("opt-in")
@config_option
@click.argument("phone")
@_scope
@_note
def consent_opt_in(config_path, phone, scope, note) -> None:
    _consent_change(config_path, phone, scope, "opt_in", note)


@consent.command("category")
@config_option
@click.argument("phone")
@click.argument("category", type=click.Choice([c for c in CATEGORIES if c != "marketing"]))
@click.argument("setting", type=click.Choice(["on", "off"]))
def consent_category(config_path, phone, category, setting) -> None:
    """Switch one category of messages on or off for a number."""
    runtime = open_runtime(config_path)
    e164 = parse_phone(runtime, phone).e164
    with runtime.engine.begin() as conn:
        consent_mod.set_preference(conn, runtime.vault.index(e164), category, setting == "on")
    click.echo(f"{redact_phone(e164)}: {category} {setting}")


# -- data protection ------------------------------------------------------------------------


@cli.command()
@config_option
@click.argument("phone")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase(config_path, phone, yes) -> None:
    """Erase a person's numbers, messages and order context (opt-outs are kept)."""
    runtime = open_runtime(config_path)
    e164 = parse_phone(runtime, phone).e164
    if not yes:
        click.confirm(f"Erase everything held about {redact_phone(e164)}?", abort=True)
    with runtime.engine.begin() as conn:
        counts = privacy.erase(conn, runtime.vault.index(e164))
    click.echo(
        f"erased {redact_phone(e164)}: " + ", ".join(f"{n} {what}" for what, n in counts.items())
    )


@cli.command()
@config_option
@click.argument("phone")
def export(config_path, phone) -> None:
    """Write everything held about a person to a JSON file in the data directory."""
    runtime = open_runtime(config_path)
    e164 = parse_phone(runtime, phone).e164
    with runtime.engine.connect() as conn:
        path = privacy.export(
            conn, runtime.vault, runtime.vault.index(e164), runtime.config.storage.data_dir
        )
    click.echo(str(path))


@cli.command()
def keygen() -> None:
    """Print a new Fernet key for security.keys (put it first to rotate)."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@cli.command("rotate-keys")
@config_option
def rotate_keys(config_path) -> None:
    """Re-encrypt every stored value with the newest key in security.keys."""
    runtime = open_runtime(config_path)
    total = 0
    with runtime.engine.begin() as conn:
        for table in storage.metadata.sorted_tables:
            columns = [c for c in table.c if c.name.endswith("_enc")]
            if not columns:
                continue
            keys = list(table.primary_key.columns)
            for row in conn.execute(select(*keys, *columns)).all():
                values = {
                    c.name: runtime.vault.rotate(getattr(row, c.name))
                    for c in columns
                    if getattr(row, c.name) is not None
                }
                if values:
                    conn.execute(
                        table.update()
                        .where(*[k == getattr(row, k.name) for k in keys])
                        .values(**values)
                    )
                    total += 1
    click.echo(f"re-encrypted {total} row(s) with the newest key")


@cli.group()
def install() -> None:
    """Register this receiver's webhooks with a platform."""


@cli.group()
def simulate() -> None:
    """Post a correctly signed sample delivery to a running receiver."""


@cli.group()
def reconcile() -> None:
    """Fetch what a platform may not have delivered and feed it through the pipeline."""


def _add_connector_commands() -> None:
    from txsms import connectors

    for name in connectors.REGISTRY:
        module = connectors.module(name)
        for group, attr in (
            (install, "install_command"),
            (simulate, "simulate_command"),
            (reconcile, "reconcile_command"),
        ):
            command = getattr(module, attr, None)
            if command is not None:
                group.add_command(command, name)
        for command in getattr(module, "commands", ()):  # e.g. the CRM poller's `txsms poll`
            cli.add_command(command)


_add_connector_commands()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:  # pragma: no cover - load errors are turned into ClickException
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except DecryptionError:
        click.echo(
            "Error: stored data cannot be decrypted with security.keys: add the key it was "
            "written with (keys are newest first; keep old ones until 'txsms rotate-keys')",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
