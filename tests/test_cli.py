"""The `txsms` command line through click's CliRunner, with a real TOML file and database.

Commands read the file given by --config (the same file an operator writes); on PostgreSQL
they do not migrate by themselves, so every test starts with `txsms db upgrade`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import KEY, to_toml
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from txsms.core import storage
from txsms.core.cli import cli
from txsms.core.config import StorageConfig
from txsms.core.crypto import DecryptionError, Vault
from txsms.core.events import MESSAGE_KINDS

PHONE = "+1 415 555 0100"
E164 = "+14155550100"
REDACTED = "+1******0100"
OTHER = "+1 212 555 0199"
OTHER_REDACTED = "+1******0199"
INDEX_KEY = "test-index-key-0123456789abcdef"
CONTRACT_KEYS = {
    "id",
    "kind",
    "source",
    "status",
    "reason",
    "to",
    "provider_message_id",
    "created_at",
    "sent_at",
}


@pytest.fixture(autouse=True)
def _restore_logging():
    """`txsms` installs its own root handler on the runner's (then closed) stderr: undo it."""
    root, alembic = logging.getLogger(), logging.getLogger("alembic")
    handlers, level, alembic_level = root.handlers[:], root.level, alembic.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    alembic.setLevel(alembic_level)


class Txsms:
    """Writes config files and runs commands against them."""

    def __init__(self, tmp_path: Path, url: str):
        self.tmp_path = tmp_path
        self.url = url
        self.data_dir = tmp_path / "data"
        self._engines: list = []
        self.path = self.write()

    def write(self, name: str = "txsms.toml", *, keys=(KEY,), extra: str = "", **sections):
        data: dict[str, Any] = {
            "storage": {"url": self.url, "data_dir": str(self.data_dir)},
            "security": {"keys": list(keys), "index_key": INDEX_KEY},
            "sender": {"name": "Test Shop", "default_region": "US", "timezone": "UTC"},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        path = self.tmp_path / name
        path.write_text(to_toml(data) + extra)
        return path

    def __call__(self, *args: str, config: Path | None = None, code: int = 0, **kw) -> Result:
        argv = [*args, "--config", str(config or self.path)]
        result = CliRunner().invoke(cli, argv, **kw)
        assert result.exit_code == code, (argv, result.output, result.exception)
        return result

    def json_lines(self, *args: str, **kw) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self(*args, "--json", **kw).stdout.splitlines()]

    def consent(self, phone: str = PHONE, **kw) -> dict[str, Any]:
        return json.loads(self("consent", "show", phone, "--json", **kw).stdout)

    def engine(self):
        engine = storage.make_engine(StorageConfig(url=self.url))
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()


@pytest.fixture
def txsms(tmp_path, database_url):
    runner = Txsms(tmp_path, database_url)
    runner("db", "upgrade")
    yield runner
    runner.close()


def parse_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


def assert_recent(text: str) -> None:
    age = (datetime.now(UTC) - parse_iso(text)).total_seconds()
    assert -5 < age < 120, text


def count(engine, table, **where) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


# --- db upgrade


@pytest.mark.parametrize(
    "url, reason",
    [
        ("sqlite:///{tmp}/no/such/dir/txsms.db", "unable to open database file"),
        ("postgresql+psycopg://postgres@127.0.0.1:{port}/test", "Connection refused"),
    ],
    ids=["sqlite-missing-directory", "postgresql-nothing-listening"],
)
@pytest.mark.parametrize("command", [("db", "upgrade"), ("messages",), ("worker",)])
def test_an_unreachable_database_stops_a_command_with_one_line(tmp_path, url, reason, command):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = Txsms(tmp_path, url.format(tmp=tmp_path, port=port))
    result = runner(*command, code=1)
    assert result.stderr.splitlines()[-1].startswith(
        "Error: storage.url: the database is unavailable (OperationalError: "
    )
    assert reason in result.stderr
    assert "Traceback" not in result.output


def test_db_upgrade_on_an_empty_database_prints_the_head_revision(tmp_path, database_url):
    runner = Txsms(tmp_path, database_url)
    try:
        engine = runner.engine()
        assert storage.current_revision(engine) is None
        result = runner("db", "upgrade")
        head = storage.head_revision()
        assert result.stdout.strip() == f"database at revision {head}"
        assert storage.current_revision(engine) == head
        assert runner("db", "upgrade").stdout.strip() == f"database at revision {head}"
    finally:
        runner.close()


# --- consent


def test_consent_opt_out_then_show_json(txsms):
    out = txsms("consent", "opt-out", PHONE, "--note", "ticket 42").stdout
    assert out.strip() == f"{REDACTED}: transactional opted_out, marketing opted_out"

    report = txsms.consent()
    ledger = report.pop("ledger")
    assert report == {
        "phone": REDACTED,
        "transactional": "opted_out",
        "marketing": "opted_out",
        "categories_off": [],
    }
    [entry] = ledger
    assert set(entry) == {"scope", "action", "source", "evidence", "at"}
    assert entry["scope"] == "all"
    assert entry["action"] == "opt_out"
    assert entry["source"] == "cli"
    assert entry["evidence"] == {"note": "ticket 42"}
    assert_recent(entry["at"])


def test_consent_opt_in_restores_transactional_and_scopes_apply(txsms):
    txsms("consent", "opt-out", PHONE)
    out = txsms("consent", "opt-in", PHONE).stdout
    assert out.strip() == f"{REDACTED}: transactional allowed, marketing not_opted_in"
    report = txsms.consent()
    assert (report["transactional"], report["marketing"]) == ("allowed", "not_opted_in")
    assert [(e["scope"], e["action"]) for e in report["ledger"]] == [
        ("all", "opt_out"),
        ("all", "opt_in"),
    ]
    assert [e["evidence"] for e in report["ledger"]] == [{}, {}]

    txsms("consent", "opt-in", PHONE, "--scope", "marketing")
    report = txsms.consent()
    assert (report["transactional"], report["marketing"]) == ("allowed", "opted_in")

    txsms("consent", "opt-out", PHONE, "--scope", "marketing")
    report = txsms.consent()
    assert (report["transactional"], report["marketing"]) == ("allowed", "opted_out")
    assert report["ledger"][-1]["scope"] == "marketing"
    assert len(report["ledger"]) == 4

    assert txsms.consent(OTHER)["transactional"] == "allowed"  # one number's consent only
    txsms("consent", "opt-out", PHONE, "--scope", "everything", code=2)


def test_consent_show_plain_text(txsms):
    txsms("consent", "opt-out", PHONE)
    txsms("consent", "category", PHONE, "shipping", "off")
    lines = txsms("consent", "show", PHONE).stdout.splitlines()
    assert lines[0] == f"{REDACTED}: transactional opted_out, marketing opted_out"
    assert lines[1] == "categories off: shipping"
    [entry] = lines[2:]
    at, action, scope, source = entry.split()
    assert_recent(at)
    assert (action, scope, source) == ("opt_out", "all", "cli")
    assert "4155550100" not in "\n".join(lines)


INVALID = "+999 1234 5678"
INVALID_COMMANDS = [
    ("consent", "show", INVALID),
    ("consent", "opt-out", INVALID),
    ("consent", "category", INVALID, "shipping", "off"),
    ("messages", "--phone", INVALID),
    ("erase", INVALID, "--yes"),
    ("export", INVALID),
]


@pytest.mark.parametrize("args", INVALID_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_invalid_phone_is_a_one_line_error_without_the_number(txsms, args):
    result = txsms("--log-level", "WARNING", *args, code=1)
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and "invalid_phone" in line
    assert result.stdout == ""
    for form in ("1234 5678", "12345678", INVALID):
        assert form not in result.output
    engine = txsms.engine()
    assert count(engine, storage.consent_ledger) == 0
    assert count(engine, storage.preferences) == 0


def test_an_invalid_phone_at_the_default_log_level_is_one_line(tmp_path, sqlite_url):
    # On SQLite every command migrates first: Alembic's INFO chatter must not bury the error.
    runner = Txsms(tmp_path, sqlite_url)
    result = runner("consent", "show", INVALID, code=1)
    assert result.stderr.splitlines() == ["Error: +9********5678: invalid_phone"]


# --- send and messages


def test_send_queues_a_message_and_messages_lists_it(txsms):
    data = json.dumps({"order": {"number": "#7"}})
    out = txsms("send", "--to", PHONE, "--kind", "order.created", "--data", data).stdout
    match = re.fullmatch(r"accepted: message ([0-9a-f]{32}) pending\n", out)
    assert match, out
    message_id = match.group(1)

    [item] = txsms.json_lines("messages")
    assert CONTRACT_KEYS - set(item) == set()  # every contract key is there
    assert item["id"] == message_id
    assert item["kind"] == "order.created"
    assert item["source"] == "cli"
    assert item["status"] == "pending"
    assert item["reason"] is None
    assert item["to"] == REDACTED
    assert item["provider_message_id"] is None
    assert item["sent_at"] is None
    assert_recent(item["created_at"])

    # The body was rendered with the data and stored encrypted.
    engine = txsms.engine()
    with engine.connect() as conn:
        row = conn.execute(select(storage.messages)).one()
    body = Vault([KEY], INDEX_KEY).decrypt(row.body_enc)
    assert body.startswith("Test Shop: ") and "#7" in body
    assert b"#7" not in bytes(row.body_enc)


def test_messages_filters_by_phone_and_status(txsms):
    txsms("consent", "opt-out", OTHER)
    first = txsms("send", "--to", PHONE, "--kind", "order.created").stdout
    second = txsms("send", "--to", OTHER, "--kind", "order.paid").stdout
    third = txsms("send", "--to", PHONE, "--kind", "order.paid").stdout
    assert "pending" in first and "pending" in third
    assert second.strip().endswith("skipped (opted_out)")

    everything = txsms.json_lines("messages")
    assert [(m["kind"], m["status"]) for m in everything] == [  # newest first
        ("order.paid", "pending"),
        ("order.paid", "skipped"),
        ("order.created", "pending"),
    ]
    for line in txsms("messages", "--json").stdout.splitlines():
        assert line.startswith("{") and line.endswith("}")  # exactly one object per line

    mine = txsms.json_lines("messages", "--phone", PHONE)
    assert [m["kind"] for m in mine] == ["order.paid", "order.created"]
    assert {m["to"] for m in mine} == {REDACTED}
    # The same number written another way finds the same person (the blind index is of E.164).
    assert txsms.json_lines("messages", "--phone", "(415) 555-0100") == mine

    [skipped] = txsms.json_lines("messages", "--phone", OTHER)
    assert (skipped["status"], skipped["reason"], skipped["to"]) == (
        "skipped",
        "opted_out",
        OTHER_REDACTED,
    )
    assert txsms.json_lines("messages", "--status", "skipped") == [skipped]
    assert len(txsms.json_lines("messages", "--status", "pending")) == 2
    assert txsms.json_lines("messages", "--status", "sent") == []
    assert txsms.json_lines("messages", "--phone", PHONE, "--status", "skipped") == []
    assert txsms.json_lines("messages", "--phone", "+1 415 555 0199") == []


def test_messages_plain_text_redacts_numbers(txsms):
    txsms("send", "--to", PHONE, "--kind", "order.created")
    [line] = txsms("messages").stdout.splitlines()
    assert "order.created" in line and REDACTED in line and "pending" in line
    assert "4155550100" not in line


@pytest.mark.parametrize(
    ("data", "problem"),
    [("{bad", "not JSON"), ("[1, 2]", "must be a JSON object"), ('"text"', "JSON object")],
)
def test_send_with_bad_data_is_a_usage_error_and_queues_nothing(txsms, data, problem):
    result = txsms("send", "--to", PHONE, "--kind", "order.created", "--data", data, code=2)
    assert "--data" in result.stderr and problem in result.stderr
    assert count(txsms.engine(), storage.messages) == 0
    assert count(txsms.engine(), storage.events) == 0


def test_send_with_an_unknown_kind_is_a_usage_error(txsms):
    result = txsms("send", "--to", PHONE, "--kind", "order.shipped", code=2)
    assert "--kind" in result.stderr
    assert count(txsms.engine(), storage.events) == 0


def test_a_category_switched_off_skips_its_messages(txsms):
    out = txsms("consent", "category", PHONE, "shipping", "off").stdout
    assert out.strip() == f"{REDACTED}: shipping off"
    assert txsms.consent()["categories_off"] == ["shipping"]

    shipment = json.dumps({"order": {"number": "#7"}, "shipment": {"status": "in_transit"}})
    args = ("send", "--to", PHONE, "--kind", "shipment.updated", "--data", shipment)
    assert txsms(*args).stdout.strip().endswith("skipped (category_off)")
    assert "pending" in txsms("send", "--to", PHONE, "--kind", "order.created").stdout
    assert [(m["kind"], m["status"], m["reason"]) for m in txsms.json_lines("messages")] == [
        ("order.created", "pending", None),
        ("shipment.updated", "skipped", "category_off"),
    ]
    assert "pending" in txsms("send", "--to", OTHER, "--kind", "shipment.updated").stdout

    txsms("consent", "category", PHONE, "shipping", "on")
    assert txsms.consent()["categories_off"] == []
    assert "pending" in txsms(*args).stdout


# --- erase and export


def test_erase_removes_the_person_but_keeps_the_opt_out(txsms):
    txsms("send", "--to", PHONE, "--kind", "order.created", "--data", '{"order": {"number": "#7"}}')
    txsms("send", "--to", OTHER, "--kind", "order.created")
    txsms("consent", "opt-out", PHONE, "--note", "asked by phone")
    index = Vault([KEY], INDEX_KEY).index(E164)
    engine = txsms.engine()
    assert count(engine, storage.recipients, phone_index=index) == 1

    out = txsms("erase", PHONE, "--yes").stdout
    assert out.startswith(f"erased {REDACTED}: ") and "1 messages" in out and "1 recipients" in out

    assert txsms.json_lines("messages", "--phone", PHONE) == []
    assert count(engine, storage.messages, phone_index=index) == 0
    assert count(engine, storage.recipients, phone_index=index) == 0
    with engine.connect() as conn:
        payloads = conn.execute(
            select(storage.events.c.payload_enc).where(storage.events.c.source == "cli")
        ).scalars()
        assert sum(p is None for p in payloads) == 1  # the event row stays, without its payload

    report = txsms.consent()
    assert (report["transactional"], report["marketing"]) == ("opted_out", "opted_out")
    [entry] = report["ledger"]
    assert (entry["action"], entry["scope"], entry["source"]) == ("opt_out", "all", "cli")
    assert entry["evidence"] is None  # the fact stays, the evidence goes

    # Still never texted again, and someone else's data is untouched.
    assert (
        txsms("send", "--to", PHONE, "--kind", "order.paid")
        .stdout.strip()
        .endswith("skipped (opted_out)")
    )
    assert [m["status"] for m in txsms.json_lines("messages", "--phone", OTHER)] == ["pending"]


def test_erase_asks_first_without_yes(txsms):
    txsms("send", "--to", PHONE, "--kind", "order.created")
    result = txsms("erase", PHONE, input="n\n", code=1)
    assert "Aborted" in result.output
    assert REDACTED in result.output and "4155550100" not in result.output
    assert len(txsms.json_lines("messages", "--phone", PHONE)) == 1
    txsms("erase", PHONE, input="y\n")
    assert txsms.json_lines("messages", "--phone", PHONE) == []


def test_export_writes_a_private_json_file(txsms):
    txsms("send", "--to", PHONE, "--kind", "order.created", "--data", '{"order": {"number": "#7"}}')
    txsms("consent", "opt-out", PHONE, "--note", "ticket 42")
    txsms("send", "--to", OTHER, "--kind", "order.paid")

    path = Path(txsms("export", PHONE).stdout.strip())
    assert path.parent == txsms.data_dir / "exports"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["phone"] == E164
    [message] = data["messages"]
    assert message["kind"] == "order.created"
    assert "#7" in message["body"]
    [entry] = data["consent"]
    assert (entry["scope"], entry["action"], entry["evidence"]) == (
        "all",
        "opt_out",
        {"note": "ticket 42"},
    )
    [event] = data["events"]
    assert event["payload"]["data"] == {"order": {"number": "#7"}}
    assert "2125550199" not in path.read_text()  # nobody else's data


# --- keys


def test_keygen_prints_a_new_fernet_key():
    keys = {CliRunner().invoke(cli, ["keygen"]).stdout.strip() for _ in range(2)}
    assert len(keys) == 2
    for key in keys:
        fernet = Fernet(key)  # raises if not a valid key
        assert fernet.decrypt(fernet.encrypt(b"x")) == b"x"


def test_rotate_keys_lets_the_old_key_go(txsms):
    old, new = KEY, Fernet.generate_key().decode()
    # security.index_key is set on purpose: without it the blind index is derived from the
    # *oldest* key, so dropping the old key at the end would change every index and
    # `messages --phone` (and every opt-out) would no longer find the person.
    sections = {"security": {"index_key": INDEX_KEY}}
    before = txsms.write("old.toml", keys=[old], **sections)
    during = txsms.write("during.toml", keys=[new, old], **sections)
    after = txsms.write("after.toml", keys=[new], **sections)

    data = '{"order": {"number": "#7"}}'
    txsms("send", "--to", PHONE, "--kind", "order.created", "--data", data, config=before)
    txsms("consent", "opt-out", PHONE, "--scope", "marketing", "--note", "t-1", config=before)
    [listed] = txsms.json_lines("messages", "--phone", PHONE, config=before)

    # Without the rotation, the new key alone cannot read what the old one wrote.
    failed = txsms("messages", "--json", config=after, code=1)
    assert "cannot be decrypted" in failed.output + str(failed.exception)

    out = txsms("rotate-keys", config=during).stdout
    rows = int(re.fullmatch(r"re-encrypted (\d+) row\(s\) with the newest key\n", out).group(1))
    assert rows >= 4  # the event, the message, the recipient, the ledger entry

    assert txsms.json_lines("messages", "--phone", PHONE, config=after) == [listed]
    report = txsms.consent(config=after)
    assert report["marketing"] == "opted_out"
    assert report["ledger"][0]["evidence"] == {"note": "t-1"}
    exported = json.loads(Path(txsms("export", PHONE, config=after).stdout.strip()).read_text())
    assert exported["phone"] == E164
    assert "#7" in exported["messages"][0]["body"]

    # Every stored token is now the new key's alone.
    only_new, only_old = Vault([new], INDEX_KEY), Vault([old], INDEX_KEY)
    engine = txsms.engine()
    with engine.connect() as conn:
        row = conn.execute(select(storage.messages)).one()
        phone_enc = conn.execute(select(storage.recipients.c.phone_enc)).scalar_one()
    assert only_new.decrypt(row.to_enc) == E164
    assert "#7" in only_new.decrypt(row.body_enc)
    assert only_new.decrypt(phone_enc) == E164
    assert row.phone_index == only_new.index(E164)
    with pytest.raises(DecryptionError):
        only_old.decrypt(row.body_enc)


def test_finishing_a_rotation_keeps_opt_outs(txsms):
    # The index key never rotates, so the blind index outlives every Fernet key.
    old, new = KEY, Fernet.generate_key().decode()
    during = txsms.write("during.toml", keys=[new, old])
    after = txsms.write("after.toml", keys=[new])
    txsms("consent", "opt-out", PHONE)  # with keys [old]
    txsms("rotate-keys", config=during)
    out = txsms("send", "--to", PHONE, "--kind", "order.created", config=after).stdout
    assert out.strip().endswith("skipped (opted_out)")


def test_keys_without_an_index_key_are_refused(txsms):
    path = txsms.tmp_path / "noindex.toml"
    path.write_text(to_toml({"storage": {"url": txsms.url}, "security": {"keys": [KEY]}}))
    result = txsms("check-config", config=path, code=1)
    assert "security.index_key: required with security.keys" in result.stderr


# --- check-config


def test_check_config_prints_a_row_per_template(txsms):
    path = txsms.write(
        "templates.toml",
        extra='[templates."order.paid"]\n'
        'body = "{{ shop.name }}: ' + "paid " * 40 + '"\n'
        'locales = { fr = "{{ shop.name }}: commande {{ order.number }} payée ✓" }\n',
    )
    result = txsms("check-config", config=path)
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: configuration is valid"
    assert lines[1].split() == ["template", "locale", "encoding", "segments"]
    rows = [line.split() for line in lines[2:]]
    assert all(len(r) == 4 for r in rows), rows
    assert {r[0].split(":")[0] for r in rows} == set(MESSAGE_KINDS)
    assert "shipment.updated:out_for_delivery" in {r[0] for r in rows}
    assert [r[1:] for r in rows if r[0] == "order.created"] == [["-", "GSM-7", "1"]]
    assert [r[1:] for r in rows if r[0] == "order.paid"] == [
        ["-", "GSM-7", "2"],  # 11 + 200 characters: two concatenated GSM-7 parts
        ["fr", "UCS-2", "1"],  # the check mark makes it UCS-2
    ]
    assert result.stderr == ""


def check_config_error(txsms, extra: str, **sections) -> str:
    path = txsms.write("bad.toml", extra=extra, **sections)
    result = txsms("check-config", config=path, code=1)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "bad.toml" in line
    return line


def test_check_config_names_a_misspelt_key(txsms):
    line = check_config_error(txsms, "", provider={"rate_per_secnd": 3})
    assert "provider.rate_per_secnd" in line
    assert "did you mean 'rate_per_second'" in line


def test_check_config_refuses_an_unsafe_template(txsms):
    line = check_config_error(
        txsms, '[templates."order.created"]\nbody = "{{ \'\'.__class__.__mro__ }}"\n'
    )
    assert "templates.order.created" in line
    assert "unsafe" in line


def test_check_config_refuses_a_template_syntax_error(txsms):
    line = check_config_error(txsms, '[templates."order.created"]\nbody = "{% if x %}oops"\n')
    assert "templates.order.created" in line
    assert "line 1" in line


def test_a_bad_template_stops_every_command_at_start_up(txsms):
    path = txsms.write(
        "bad.toml", extra='[templates."order.created"]\nbody = "{{ order.numbr }}"\n'
    )
    result = txsms("send", "--to", PHONE, "--kind", "order.created", config=path, code=1)
    assert "templates.order.created" in result.stderr and "numbr" in result.stderr
    assert count(txsms.engine(), storage.events) == 0
