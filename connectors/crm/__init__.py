"""The CRM poller: `[[crm]]` sources polled for changed records, mapped into canonical Events.

    txsms poll [--once] [--name NAME] [--since ISO]      # `txsms serve` runs enabled sources too

Sources: `hubspot.py` (CRM v3 search) and `http.py` (any JSON API). Cursors, the seen-set,
rate limits: `poller.py`. Rules that turn a record into events: `mapping.py`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import click
import requests

from txsms.core.cliutil import config_option, open_runtime
from txsms.core.config import Config
from txsms.core.errors import ConfigError, TemplateError
from txsms.core.events import Event
from txsms.core.phones import PhoneError, normalize
from txsms.core.redact import redact_phone
from txsms.core.runtime import Runtime
from txsms.core.scheduler import Job
from txsms.core.storage import log_failure
from txsms.core.templates import TemplateSet, build_context

from .http import HttpSource
from .hubspot import API, HubSpotSource
from .mapping import Mapper, epoch, get, iso, rules_of
from .poller import Client, CrmError, Poller, PollResult, setting

log = logging.getLogger(__name__)

__all__ = ["Poller", "background_jobs", "check", "commands", "make_poller", "poll_command"]


def make_poller(
    runtime: Runtime,
    entry: dict[str, Any],
    *,
    session: requests.Session | None = None,
    stop: threading.Event | None = None,
) -> Poller:
    kind = HubSpotSource if entry["kind"] == "hubspot" else HttpSource
    # The account whose rate limit the requests count against: API host and credential.
    if kind is HubSpotSource:
        account = f"{entry.get('base_url', API)}|{entry['token']}"
    else:
        account = f"{urlsplit(entry['url']).netloc}|{json.dumps(entry.get('auth'), sort_keys=True)}"
    client = Client(runtime, entry, account, session=session, stop=stop)
    return Poller(runtime, entry, kind(entry, client))


def enabled(config: Config) -> list[dict[str, Any]]:
    return [e for e in config.crm if setting(e, "enabled")]


def background_jobs(runtime: Runtime) -> list[Job]:
    """One job per enabled source; each cursor is armed now, so `serve` starts without backfill."""
    jobs = []
    for entry in enabled(runtime.config):
        poller = make_poller(runtime, entry)
        if poller.arm():
            log.info("crm %s: cursor armed at now (no backfill)", poller.name)
        jobs.append(Job(f"crm-{poller.name}", setting(entry, "interval_seconds"), poller.run_once))
    return jobs


def _summary(r: PollResult) -> str:
    if r.armed:
        return f"{r.source}: first run: cursor armed at {iso(r.cursor_ms / 1000)} (no backfill)"
    return (
        f"{r.source}: {r.records} record(s) read, {r.handled} new or changed, "
        f"{r.accepted} new event(s), {r.queued} message(s) queued; "
        f"cursor {iso(r.cursor_ms / 1000)}"
    )


@click.command("poll")
@config_option
@click.option("--once", is_flag=True, help="Poll each source once and exit.")
@click.option("--name", "names", multiple=True, help="Only this [[crm]] source (repeatable).")
@click.option("--since", help="Read records modified since this ISO time (UTC if no offset).")
def poll_command(config_path: str | None, once: bool, names: tuple[str, ...], since: str | None):
    """Poll the [[crm]] sources and send what their records call for."""
    try:
        start = datetime.fromisoformat(since.replace("Z", "+00:00")) if since else None
    except ValueError:
        raise click.BadParameter(f"not an ISO time: {since!r}", param_hint="--since") from None
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    runtime = open_runtime(config_path)
    known = {e["name"]: e for e in runtime.config.crm}
    for name in names:
        if name not in known:
            raise click.UsageError(f"no [[crm]] source named {name!r} (have: {', '.join(known)})")
    entries = [known[n] for n in names] if names else enabled(runtime.config)
    if not entries:
        raise click.ClickException("no enabled [[crm]] sources in the configuration")
    stop = threading.Event()
    pollers = [make_poller(runtime, e, stop=stop) for e in entries]
    try:
        if once:
            failed = [p.name for p in pollers if not _run(p, start, echo=True)]
            if failed:
                raise click.ClickException(f"failed: {', '.join(failed)}")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        threads = [
            threading.Thread(target=_loop, args=(p, start, stop), name=f"txsms-crm-{p.name}")
            for p in pollers
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            stop.wait(0.5)
        for t in threads:
            t.join()
    finally:
        runtime.close()


def _run(poller: Poller, since: datetime | None, echo: bool = False) -> bool:
    try:
        result = poller.run_once(since)
    except CrmError as exc:
        log.error("crm %s: %s", poller.name, exc)
        if echo:
            click.echo(f"crm:{poller.name}: error: {exc}", err=True)
        return False
    if echo:
        click.echo(_summary(result))
    return True


def _loop(poller: Poller, since: datetime | None, stop: threading.Event) -> None:
    interval = setting(poller.entry, "interval_seconds")
    while not stop.is_set():
        began = time.monotonic()
        try:
            _run(poller, since)
        except Exception:
            log_failure(log, "crm %s: poll failed; next try in %ss", poller.name, interval)
        since = None
        stop.wait(max(0.0, interval - (time.monotonic() - began)))


commands = [poll_command]


# -- check-config -------------------------------------------------------------------------------


def check(config: Config) -> list[str]:
    """Run every source's mapping over its `sample` record; the lines say what it would send.

    Raises ConfigError (with the dotted key) when a rule cannot work on the sample: a field
    path that is not in it, a start time that is not a time, a template that fails to render.
    """
    templates = TemplateSet(config.templates, config.sender)
    file = str(config.path) if config.path else None
    lines: list[str] = []
    for i, entry in enumerate(config.crm):
        name = f"crm:{entry['name']}"
        if "sample" not in entry:
            lines.append(f"{name}: no sample record (add `sample` to see what it would send)")
            continue
        source = (HubSpotSource if entry["kind"] == "hubspot" else HttpSource)(entry, None)
        record = source.read(entry["sample"])  # as the source reads what it fetches
        if record is None:
            problem = "no id or no last-modified time where this source reads them"
            raise ConfigError(problem, key=f"crm.{i}.sample", file=file)
        for j, rule in enumerate(rules_of(entry)):
            if problems := _rule_problems(rule, record.fields):
                key, problem = problems[0]
                raise ConfigError(problem, key=f"crm.{i}.mapping.{j}.{key}", file=file)
        mapper = Mapper(name, source.record_name, rules_of(entry))
        events, _ = mapper.events(record, None, time.time())
        lines.append(f"{name}: the sample record {record.id} makes {len(events)} event(s)")
        lines += [_describe(event, templates, config) for event in events]
    return lines


def _has(record: Any, path: str) -> bool:
    """Is the path there at all (a null value counts: HubSpot sends empty properties so)."""
    *parents, last = path.split(".")
    holder = get(record, ".".join(parents)) if parents else record
    if isinstance(holder, list):
        return last.isdigit() and int(last) < len(holder)
    return isinstance(holder, dict) and last in holder


def _rule_problems(rule: dict[str, Any], sample: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for n, cond in enumerate(rule.get("when", ())):
        if "present" not in cond and not _has(sample, cond["field"]):
            problems.append((f"when.{n}.field", f"'{cond['field']}' is not in the sample"))
    for key in ("phone", "country", "locale", "name", "timezone", "customer_id"):
        paths = rule.get(key, ())
        if paths and not any(_has(sample, p) for p in paths):
            problems.append((key, f"{' or '.join(map(repr, paths))} not in the sample"))
    for target, path in rule.get("data", {}).items():
        if not _has(sample, path):
            problems.append((f"data.{target}", f"'{path}' is not in the sample"))
    if "starts_at" in rule and epoch(get(sample, rule["starts_at"])) is None:
        problems.append(("starts_at", f"'{rule['starts_at']}' in the sample is not a time"))
    return problems


def _describe(event: Event, templates: TemplateSet, config: Config) -> str:
    """One event as check-config shows it: kind, key, number, time, and the text it sends."""
    when = f" at {iso(event.send_at)}" if event.send_at else ""
    zone = event.recipient.timezone or config.sender.timezone
    try:
        region = config.sender.default_region
        phone = normalize(event.recipient.phone, region, event.recipient.country)
        to, zone = redact_phone(phone.e164), event.recipient.timezone or (phone.zones or [zone])[0]
    except PhoneError as exc:
        to = f"- ({exc.reason})"
    line = f"  {event.kind:<22} {event.key}  to {to}{when}"
    if event.skip:
        return f"{line}  (skipped: {event.skip})"
    if event.kind == "messages.cancel":
        return f"{line}  (cancels pending {', '.join(event.data['kinds'])})"
    if event.consent is not None:
        return f"{line}  ({event.consent.action}, scope {event.consent.scope})"
    context = build_context(
        event.data,
        shop_name=config.sender.name,
        recipient_name=event.recipient.name,
        timezone=zone,  # as the pipeline picks it: the person's, else the number's
        locale=event.recipient.locale,
    )
    try:
        body = templates.render(event.kind, event.recipient.locale, context).body
    except TemplateError as exc:
        raise ConfigError(exc.problem, key=f"templates.{event.kind}") from None
    return f"{line}\n    {body}"
