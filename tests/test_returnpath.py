"""The return path with Twilio: signed inbound keywords, delivery receipts, settling unknown."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from conftest import twilio_section
from fakes.twilio import Drop, Reply
from sqlalchemy import select

from txsms.core import consent
from txsms.core.cli import cli
from txsms.core.events import Event, Recipient
from txsms.core.pipeline import ingest
from txsms.core.providers.twilio import twilio_signature
from txsms.core.returnpath import keyword
from txsms.core.storage import messages, provider_callbacks
from txsms.core.worker import Worker
from txsms.webhooks import create_app

PUBLIC = "https://sms.example.test"
PHONE = "+14155550100"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stop", "opt_out"),
        ("STOP.", "opt_out"),
        (" Stop ", "opt_out"),
        ("opt out", "opt_out"),
        ("OPTOUT", "opt_out"),
        ("Revoke", "opt_out"),
        ("unsubscribe!", "opt_out"),
        ("STOPALL", "opt_out"),
        ("quit", "opt_out"),
        ("End", "opt_out"),
        ("cancel", "opt_out"),
        ("START", "opt_in"),
        ("unstop", "opt_in"),
        ("Yes", "opt_in"),
        ("HELP", "help"),
        ("info?", "help"),
        ("Stop please", None),
        ("please cancel", None),
        ("Where is my order?", None),
        ("", None),
        ("STOP STOP", None),
        ("opt  out", "opt_out"),
    ],
)
def test_keywords_match_the_whole_message(text, expected):
    assert keyword(text) == expected


@pytest.fixture
def twilio_runtime(runtime_factory, fake_twilio):
    return runtime_factory(
        provider=twilio_section(fake_twilio), worker={"unknown_grace_seconds": 0}
    )


@pytest.fixture
def client(twilio_runtime):
    return create_app(runtime=twilio_runtime).test_client()


def signed_post(client, fake, path, form, *, sign=True, token=None):
    url = PUBLIC + path
    headers = {}
    if sign:
        params = {k: [v] for k, v in form.items()}
        headers["X-Twilio-Signature"] = twilio_signature(token or fake.auth_token, url, params)
    return client.post(
        path,
        data=urlencode(form),
        headers=headers,
        content_type="application/x-www-form-urlencoded",
    )


def inbound(client, fake, body, sender=PHONE, **extra):
    form = {
        "MessageSid": "SM" + "1" * 32,
        "AccountSid": fake.account_sid,
        "From": sender,
        "To": "+15005550006",
        "Body": body,
        "NumMedia": "0",
        **extra,
    }
    return signed_post(
        client,
        fake,
        "/webhooks/providers/twilio/inbound",
        form,
    )


def state(runtime, phone=PHONE):
    with runtime.engine.connect() as conn:
        return consent.state(conn, runtime.vault.index(phone))


@pytest.mark.parametrize("text", ["stop", "STOP.", " Stop ", "opt out", "Revoke"])
def test_inbound_opt_out_words(client, twilio_runtime, fake_twilio, text):
    response = inbound(client, fake_twilio, text)
    assert response.status_code == 200
    assert response.mimetype == "application/xml"
    assert b"you are unsubscribed" in response.data
    assert state(twilio_runtime).opted_out
    with twilio_runtime.engine.connect() as conn:
        [entry] = consent.ledger(conn, twilio_runtime.vault, twilio_runtime.vault.index(PHONE))
    assert entry["source"] == "inbound:twilio"
    assert entry["evidence"]["text"] == text and entry["evidence"]["message_id"].startswith("SM")


def test_start_resubscribes_and_help_answers(client, twilio_runtime, fake_twilio):
    inbound(client, fake_twilio, "STOP")
    response = inbound(client, fake_twilio, "START")
    assert b"subscribed again" in response.data
    assert not state(twilio_runtime).opted_out
    response = inbound(client, fake_twilio, "HELP")
    assert b"Reply STOP to opt out" in response.data and b"Test Shop" in response.data
    assert not state(twilio_runtime).opted_out


def test_other_text_changes_nothing_and_is_stored_encrypted(client, twilio_runtime, fake_twilio):
    response = inbound(client, fake_twilio, "Where is my order?")
    assert response.status_code == 200
    assert b"<Message>" not in response.data
    assert state(twilio_runtime).transactional == "allowed"
    with twilio_runtime.engine.connect() as conn:
        [row] = conn.execute(select(provider_callbacks)).all()
    assert b"Where is my order" not in row.payload_enc
    assert twilio_runtime.vault.decrypt_json(row.payload_enc)["text"] == "Where is my order?"


@pytest.mark.parametrize("how", ["unsigned", "wrong token", "tampered"])
def test_unsigned_or_forged_stop_is_403_and_changes_nothing(
    client, twilio_runtime, fake_twilio, how
):
    form = {"MessageSid": "SM1", "From": PHONE, "To": "+15005550006", "Body": "STOP"}
    path = "/webhooks/providers/twilio/inbound"
    if how == "unsigned":
        response = signed_post(client, fake_twilio, path, form, sign=False)
    elif how == "wrong token":
        response = signed_post(client, fake_twilio, path, form, token="not-the-token")
    else:
        url = PUBLIC + path
        sig = twilio_signature(fake_twilio.auth_token, url, {k: [v] for k, v in form.items()})
        form["Body"] = "STOP ALL OF IT"
        response = client.post(
            path,
            data=urlencode({**form, "Body": "stop"}),
            headers={"X-Twilio-Signature": sig},
            content_type="application/x-www-form-urlencoded",
        )
    assert response.status_code == 403
    assert state(twilio_runtime).transactional == "allowed"
    with twilio_runtime.engine.connect() as conn:
        assert conn.execute(select(provider_callbacks)).all() == []


def test_advanced_opt_out_is_recorded_without_a_second_confirmation(
    client, twilio_runtime, fake_twilio
):
    response = inbound(client, fake_twilio, "STOP", OptOutType="STOP")
    assert response.status_code == 200
    assert b"<Message>" not in response.data
    assert state(twilio_runtime).opted_out


def send_one(runtime, fake, key="k1"):
    ingest(
        runtime,
        [
            Event(
                source="api",
                kind="order.created",
                key=key,
                recipient=Recipient(phone=PHONE),
                data={"order": {"number": "#1"}},
            )
        ],
    )
    Worker(runtime).run_once()
    with runtime.engine.connect() as conn:
        return conn.execute(
            select(messages)
            .where(messages.c.event_id.is_not(None))
            .order_by(messages.c.created_at.desc())
        ).first()


def receipt(client, fake, sid, status, **extra):
    form = {
        "MessageSid": sid,
        "SmsSid": sid,
        "MessageStatus": status,
        "SmsStatus": status,
        "AccountSid": fake.account_sid,
        "From": "+15005550006",
        "To": PHONE,
        "ApiVersion": "2010-04-01",
        **extra,
    }
    return signed_post(client, fake, "/webhooks/providers/twilio/status", form)


def messages_json(runtime, tmp_path):
    from conftest import to_toml

    cfg = runtime.config
    path = tmp_path / "cli.toml"
    path.write_text(
        to_toml(
            {
                "storage": {"url": cfg.storage.url, "data_dir": cfg.storage.data_dir},
                "security": {"keys": list(cfg.security.keys), "index_key": cfg.security.index_key},
            }
        )
    )
    out = CliRunner().invoke(cli, ["messages", "--json", "--config", str(path)])
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.output.splitlines()]


def test_receipts_only_move_forward(client, twilio_runtime, fake_twilio, tmp_path):
    row = send_one(twilio_runtime, fake_twilio)
    sid = row.provider_message_id
    for status in ("sent", "delivered", "sent"):
        assert receipt(client, fake_twilio, sid, status).status_code == 200
    [listed] = messages_json(twilio_runtime, tmp_path)
    assert listed["status"] == "delivered" and listed["provider_message_id"] == sid


def test_undelivered_receipt_keeps_the_code_and_invalidates_the_number(
    client, twilio_runtime, fake_twilio
):
    row = send_one(twilio_runtime, fake_twilio)
    receipt(client, fake_twilio, row.provider_message_id, "undelivered", ErrorCode="30005")
    with twilio_runtime.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == row.id)).one()
    assert (row.status, row.error_code) == ("undelivered", "30005")
    ingest(
        twilio_runtime,
        [Event(source="api", kind="order.paid", key="later", recipient=Recipient(phone=PHONE))],
    )
    with twilio_runtime.engine.connect() as conn:
        later = conn.execute(select(messages).where(messages.c.kind == "order.paid")).one()
    assert (later.status, later.reason) == ("skipped", "invalid_phone")


def test_receipt_before_the_send_is_recorded_is_applied_later(client, twilio_runtime, fake_twilio):
    sid = "SM" + "a" * 32
    fake_twilio.script(
        Reply(status=201, body={"sid": sid, "status": "queued", "num_segments": "1"})
    )
    assert receipt(client, fake_twilio, sid, "delivered").json["applied"] == 0
    row = send_one(twilio_runtime, fake_twilio)
    assert (row.provider_message_id, row.status) == (sid, "sent")
    Worker(twilio_runtime).maintain(force=True)  # housekeeping applies the early receipt
    with twilio_runtime.engine.connect() as conn:
        assert conn.execute(select(messages.c.status).where(messages.c.id == row.id)).scalar() == (
            "delivered"
        )


def test_unsigned_receipt_is_403(client, twilio_runtime, fake_twilio):
    row = send_one(twilio_runtime, fake_twilio)
    form = {"MessageSid": row.provider_message_id, "MessageStatus": "failed"}
    response = signed_post(
        client, fake_twilio, "/webhooks/providers/twilio/status", form, sign=False
    )
    assert response.status_code == 403
    with twilio_runtime.engine.connect() as conn:
        assert conn.execute(select(messages.c.status)).scalar_one() == "sent"


def test_unknown_is_settled_by_asking_twilio(twilio_runtime, fake_twilio):
    fake_twilio.script(Drop())  # Twilio got it, the answer was lost
    row = send_one(twilio_runtime, fake_twilio)
    assert row.status == "unknown"
    worker = Worker(twilio_runtime)
    worker.maintain(force=True)
    with twilio_runtime.engine.connect() as conn:
        settled = conn.execute(select(messages).where(messages.c.id == row.id)).one()
    assert settled.status == "sent" and settled.reason == "settled_by_lookup"
    assert settled.provider_message_id == fake_twilio.messages[0]["sid"]
    worker.run_once()
    assert len([r for r in fake_twilio.requests if r.method == "POST"]) == 1  # never resent


def test_unknown_that_never_arrived_is_sent_once_more(twilio_runtime, fake_twilio):
    ingest(
        twilio_runtime,
        [Event(source="api", kind="order.created", key="k", recipient=Recipient(phone=PHONE))],
    )
    with twilio_runtime.engine.begin() as conn:  # a crash before the request left
        conn.execute(messages.update().values(status="unknown", reason="interrupted"))
    worker = Worker(twilio_runtime)
    worker.maintain(force=True)
    worker.run_once()
    posts = [r for r in fake_twilio.requests if r.method == "POST"]
    assert len(posts) == 1
    with twilio_runtime.engine.connect() as conn:
        assert conn.execute(select(messages.c.status)).scalar_one() == "sent"
