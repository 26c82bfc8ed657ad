"""Mapping rules, as data: a CRM record in, zero or more canonical Events out.

A rule (one `[[crm.mapping]]` table, validated by `core.config.CrmRuleSchema`) has a condition
(`when`), the event kind, where the number, country, locale and name are in the record, and the
template context as field paths. `changed_to` and appointment schedules compare with what the
poller saw of the record last time (`previous`: name -> fingerprint), so a re-read record
produces nothing new, and the event keys make a crash's re-read collide with what was
committed.

Appointments: a rule for `appointment.reminder` keeps a *schedule* (its start, while its
condition holds). When the schedule changes the record's pending reminders are cancelled first
(`messages.cancel`, reason `appointment_moved` or `appointment_cancelled`, in the same ingest
batch), then the new reminders are queued with `send_at`; one whose time has passed is
recorded as skipped (`reminder_past`), never sent late. Every event of a record carries
`OrderRef("<record>:<id>")`, which ties the reminders to the appointment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from txsms.core.events import Consent, Event, OrderRef, Recipient

REMINDER = "appointment.reminder"


@dataclass(frozen=True)
class Record:
    id: str
    modified_ms: int  # the CRM's own last-modified time, epoch milliseconds
    fields: Mapping[str, Any] = field(default_factory=dict)  # the record as the API returned it


def rules_of(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The source's rules, each with what `[crm.defaults]` says and the rule does not."""
    defaults = dict(entry.get("defaults", {}))
    rules = []
    for rule in entry.get("mapping", ()):
        merged = {**defaults, **rule, "data": {**defaults.get("data", {}), **rule.get("data", {})}}
        if not rule["event"].startswith("appointment.") and "starts_at" not in rule:
            merged.pop("starts_at", None)
        rules.append(merged)
    return rules


def get(record: Any, path: str) -> Any:
    """The value at a dotted path (`properties.dealstage`, `items.0.name`); None if absent."""
    value = record
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part):
            value = value[int(part)] if int(part) < len(value) else None
        else:
            return None
        if value is None:
            return None
    return value


def epoch(value: Any) -> float | None:
    """Epoch seconds from epoch seconds or milliseconds (number or digits) or ISO 8601."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).isdigit():
        value = float(value)
    if isinstance(value, int | float):
        return value / 1000 if abs(value) > 1e11 else float(value)  # 1e11 s is the year 5138
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return None


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _same(a: Any, b: Any) -> bool:
    """Loose equality: the CRM says "false" or "123" where the config says false or 123."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool):
            return "true" if v else "false"
        return None if v is None else str(v).strip().lower()

    return norm(a) == norm(b)


def plain_fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Mapper:
    """The rules of one source."""

    def __init__(
        self,
        source: str,
        record_name: str,
        rules: list[dict[str, Any]],
        fingerprint: Callable[[Any], str] = plain_fingerprint,
    ):
        self.source = source
        self.record_name = record_name
        self.rules = rules
        self.fingerprint = fingerprint

    @property
    def stateful(self) -> bool:
        """True when a rule needs what was seen of a record last time."""
        return any(r["event"] == REMINDER or self._changes(r) for r in self.rules)

    def paths(self) -> set[str]:
        """Every field path the rules read (HubSpot asks for exactly those properties)."""
        found: set[str] = set()
        for rule in self.rules:
            found.update(c["field"] for c in rule.get("when", ()))
            for key in ("phone", "country", "locale", "name", "timezone", "customer_id"):
                found.update(rule.get(key, ()))
            found.update(rule.get("data", {}).values())
            found.update([rule["starts_at"]] if "starts_at" in rule else [])
        return found

    @staticmethod
    def _changes(rule: dict[str, Any]) -> list[str]:
        return [c["field"] for c in rule.get("when", ()) if "changed_to" in c or "changed" in c]

    def events(
        self, record: Record, previous: Mapping[str, str] | None, now: float
    ) -> tuple[list[Event], dict[str, str]]:
        """The events `record` makes, and what to remember of it for next time.

        `previous` is None the first time a record is seen: every `changed_to` then counts.
        """
        memory = {
            f"field:{path}": self.fingerprint(get(record.fields, path))
            for rule in self.rules
            for path in self._changes(rule)
        }
        out: list[Event] = []
        cancelled = False  # an appointment.cancelled rule fired
        schedules = []  # (rule, start or None, changed, had reminders queued)
        for rule in self.rules:
            holds = all(self._holds(c, record, previous) for c in rule.get("when", ()))
            if rule["event"] == REMINDER:
                starts = epoch(get(record.fields, rule["starts_at"])) if holds else None
                name = f"schedule:{rule.get('key', REMINDER)}"
                memory[name] = self.fingerprint(starts)
                before = None if previous is None else previous.get(name)
                had = before not in (None, self.fingerprint(None))
                schedules.append((rule, starts, before != memory[name], had))
            elif holds:
                cancelled = cancelled or rule["event"] == "appointment.cancelled"
                out.append(self._event(rule, record, self._key(rule, record)))
        changed = [s for s in schedules if s[2]]
        reason = None
        if cancelled:
            reason, schedules = "appointment_cancelled", []
        elif any(s[3] for s in changed):  # moved, or no longer booked
            moved = any(s[1] is not None for s in schedules)
            reason = "appointment_moved" if moved else "appointment_cancelled"
        else:
            schedules = changed  # newly booked: nothing queued to take back
        for rule, starts, *_ in schedules:
            if starts is not None:  # the cancel takes every reminder: queue all again
                out += self._reminders(rule, record, starts, now)
        if reason is not None:  # first in the batch: it must not cancel what follows it
            out.insert(0, self._cancel(record, reason))
        return out, memory

    def _holds(self, cond: dict[str, Any], record: Record, previous: Mapping | None) -> bool:
        value = get(record.fields, cond["field"])
        if "equals" in cond:
            return _same(value, cond["equals"])
        if "not_equals" in cond:
            return not _same(value, cond["not_equals"])
        if "in" in cond:
            return any(_same(value, v) for v in cond["in"])
        if "present" in cond:
            return (value not in (None, "")) == cond["present"]
        before = None if previous is None else previous.get(f"field:{cond['field']}")
        changed = before != self.fingerprint(value)
        if "changed" in cond:
            return changed == cond["changed"]
        return changed and _same(value, cond["changed_to"])

    # -- building events -------------------------------------------------------------------

    def _key(self, rule: dict[str, Any], record: Record, *extra: Any) -> str:
        repeat = rule.get("repeat", rule["event"] == "customer.consent")
        template = rule.get("key") or "{record}:{id}:{event}" + (":{modified}" if repeat else "")
        key = template.format(
            record=self.record_name,
            id=_id(record),
            event=rule["event"],
            modified=record.modified_ms,
        )
        return ":".join([key, *map(str, extra)])

    def _first(self, rule: dict[str, Any], record: Record, key: str) -> str | None:
        for path in rule.get(key, ()):
            value = get(record.fields, path)
            if value not in (None, ""):
                return str(value)
        return None

    def _event(self, rule: dict[str, Any], record: Record, key: str, **extra: Any) -> Event:
        data: dict[str, Any] = {}
        for target, path in rule.get("data", {}).items():
            value = get(record.fields, path)
            if value is not None:
                _put(data, target, value)
        if "starts_at" in rule and (starts := epoch(get(record.fields, rule["starts_at"]))):
            _put(data, "appointment.starts_at", iso(starts))
        consent = None
        if rule["event"] == "customer.consent":
            evidence = {
                "crm": self.source,
                "record": f"{self.record_name}:{record.id}",
                "modified_at": iso(record.modified_ms / 1000),
                "fields": {
                    c["field"]: get(record.fields, c["field"]) for c in rule.get("when", [])
                },
            }
            consent = Consent(rule.get("scope", "all"), rule["consent"], evidence)
        recipient = Recipient(
            phone=self._first(rule, record, "phone"),
            name=self._first(rule, record, "name"),
            locale=self._first(rule, record, "locale"),
            country=(self._first(rule, record, "country") or "").upper() or None,
            customer_id=self._first(rule, record, "customer_id") or record.id,
            timezone=self._first(rule, record, "timezone"),
        )
        return Event(
            source=self.source,
            kind=rule["event"],
            key=key,
            recipient=recipient,
            data=data,
            occurred_at=record.modified_ms / 1000,
            consent=consent,
            order=self._ref(record),
            **extra,
        )

    def _ref(self, record: Record) -> OrderRef:
        ref = f"{self.record_name}:{_id(record)}"
        return OrderRef(ref=ref, modified_at=record.modified_ms / 1000)

    def _reminders(
        self, rule: dict[str, Any], record: Record, starts: float, now: float
    ) -> list[Event]:
        events = []
        for offset in rule["reminders"]:
            send_at = starts - offset
            # The start and the modification are in the key: a moved appointment (even one
            # moved back) gets new reminders, and a re-read of the same version collides.
            key = self._key(rule, record, f"{offset}s", round(starts), record.modified_ms)
            skip = "reminder_past" if send_at <= now else None
            events.append(
                self._event(rule, record, key, send_at=send_at, skip=skip, expires_at=starts)
            )
        return events

    def _cancel(self, record: Record, reason: str) -> Event:
        return Event(
            source=self.source,
            kind="messages.cancel",
            key=f"{self.record_name}:{_id(record)}:messages.cancel:{record.modified_ms}",
            data={"kinds": [REMINDER], "reason": reason},
            occurred_at=record.modified_ms / 1000,
            order=self._ref(record),
        )


def _id(record: Record) -> str:
    """The record's id as it goes into keys and references (their columns hold 300 and 200)."""
    if len(record.id) <= 100:
        return record.id
    return "#" + hashlib.sha256(record.id.encode()).hexdigest()[:32]


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value
