"""Providers: the console printer and Twilio against FakeTwilio over real HTTP (no mocks)."""

from __future__ import annotations

import base64
import logging
import socket
import time
from email.utils import formatdate

import pytest
from fakes import wait_until
from fakes.twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, Delay, Drop, FakeTwilio, Reply

from txsms.core.config import ProviderConfig
from txsms.core.errors import ConfigError
from txsms.core.providers import Outcome, OutgoingMessage, make_provider
from txsms.core.providers.console import ConsoleProvider
from txsms.core.providers.twilio import TwilioLookupError, TwilioProvider
from txsms.core.redact import redact_phone, scrub

TO = "+14155550100"
MSG = OutgoingMessage(id="m1", to=TO, body="Your order #1001 has shipped.")


@pytest.fixture
def fake():
    with FakeTwilio() as server:
        yield server


@pytest.fixture
def twilio(fake):
    provider = make_provider(fake.provider_config(timeout_seconds=2.0))
    yield provider
    provider.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secrets(result) -> None:
    for text in (result.error_text or "", repr(result)):
        assert AUTH_TOKEN not in text
        assert TO not in text


# -- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+14155550100", "+1******0100"),
        ("+447700900123", "+4*******0123"),
        (None, "-"),
        ("", ""),
        ("12345", "*****"),
        ("+123456", "*******"),
        ("+1234567", "+1**4567"),
    ],
)
def test_redact_phone(value, expected):
    assert redact_phone(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("to=+14155550100, ok", "to=+1******0100, ok"),
        ("call +1 (415) 555-0100 now", f"call {redact_phone('+1 (415) 555-0100')} now"),
        ("415.555.0100", "41******0100"),
        ("a +14155550100 b +447700900123", "a +1******0100 b +4*******0123"),
        ("The 'To' number +1415555010 is not valid", "The 'To' number +1*****5010 is not valid"),
    ],
)
def test_scrub_redacts_numbers(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "order 1001 for 3 items",
        "sid SM0123456789abcdef0123456789abcdef",
        "peer 127.0.0.1:8080",
        "on 2024-01-15 at 10:00",
        "took 0.1234567 s",
        "id 6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f",
    ],
)
def test_scrub_leaves_other_numbers(text):
    assert scrub(text) == text


# -- console -----------------------------------------------------------------------------------


def test_console_prints_redacted_number_and_body(capsys):
    provider = make_provider(ProviderConfig(kind="console"))
    assert isinstance(provider, ConsoleProvider)
    result = provider.send(MSG)
    out = capsys.readouterr().out
    assert out.splitlines() == ["SMS to +1******0100 (GSM-7, 1 segment)", MSG.body]
    assert TO not in out
    assert result.outcome is Outcome.SENT
    assert result.provider_message_id.startswith("console-")
    assert len(result.provider_message_id) == len("console-") + 32
    assert result.provider_status == "sent"
    assert result.segments == 1


def test_console_show_numbers(capsys):
    provider = make_provider(ProviderConfig(kind="console"), show_numbers=True)
    msg = OutgoingMessage(id="m2", to=TO, body="Ünïcode", segments=2, encoding="UCS-2")
    result = provider.send(msg)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"SMS to {TO} (UCS-2, 2 segments)"
    assert "Ünïcode" in out
    assert result.segments == 2
    assert provider.send(msg).provider_message_id != result.provider_message_id


# -- twilio: configuration and the request sent ------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"account_sid": None}, "provider.account_sid"),
        ({"auth_token": ""}, "provider.auth_token"),
        ({"from_": None}, "provider.from"),
        ({"base_url": "ftp://example.com"}, "provider.base_url"),
    ],
)
def test_twilio_config_is_checked_eagerly(overrides, key):
    values = dict(kind="twilio", account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_=FROM_NUMBER)
    with pytest.raises(ConfigError) as info:
        TwilioProvider(ProviderConfig(**{**values, **overrides}))
    assert info.value.key == key
    assert AUTH_TOKEN not in str(info.value)


def test_twilio_timeouts():
    config = ProviderConfig(
        kind="twilio", account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, from_=FROM_NUMBER
    )
    assert TwilioProvider(config).timeout == (5.0, 10.0)
    short = ProviderConfig(**{**config.__dict__, "timeout_seconds": 0.3})
    assert TwilioProvider(short).timeout == (0.3, 0.3)


def test_success_fields(fake, twilio):
    result = twilio.send(MSG)
    assert result.outcome is Outcome.SENT
    [stored] = fake.messages
    assert result.provider_message_id == stored["sid"]
    assert result.provider_message_id.startswith("SM") and len(result.provider_message_id) == 34
    assert result.provider_status == "queued"
    assert result.segments == 1
    assert result.error_code is None and result.error_text is None
    assert stored["to"] == TO and stored["from"] == FROM_NUMBER and stored["body"] == MSG.body


def test_request_form_auth_and_headers(fake, twilio):
    twilio.send(MSG)
    [req] = fake.requests
    assert req.method == "POST"
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert req.form == {"To": TO, "Body": MSG.body, "From": FROM_NUMBER}  # no StatusCallback
    token = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert req.headers["Authorization"] == f"Basic {token}"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["User-Agent"] == "txsms/0.1"


def test_messaging_service_and_status_callback(fake):
    config = fake.provider_config(from_=None, messaging_service_sid="MG" + "a" * 32)
    provider = make_provider(config, public_url="https://sms.example.com/")
    result = provider.send(MSG)
    [req] = fake.requests
    assert req.form == {
        "To": TO,
        "Body": MSG.body,
        "MessagingServiceSid": "MG" + "a" * 32,
        "StatusCallback": "https://sms.example.com/webhooks/providers/twilio/status",
    }
    # Twilio answers a Messaging Service send with "accepted" and num_segments "0".
    assert result.outcome is Outcome.SENT
    assert result.provider_status == "accepted"
    assert result.segments is None


def test_keep_alive_reuses_one_connection(fake, twilio):
    for _ in range(5):
        assert twilio.send(MSG).outcome is Outcome.SENT
    assert len({req.peer for req in fake.requests}) == 1


# -- twilio: classification of answers ---------------------------------------------------------


def test_503_is_retry(fake, twilio):
    fake.script(Reply(status=503))
    result = twilio.send(MSG)
    assert result.outcome is Outcome.RETRY
    assert result.retry_after is None
    assert twilio.send(MSG).outcome is Outcome.SENT  # the queue is empty again


def test_429_with_retry_after_seconds(fake, twilio):
    fake.script(Reply(status=429, headers={"Retry-After": "2"}))
    result = twilio.send(MSG)
    assert result.outcome is Outcome.RETRY
    assert result.retry_after == 2.0
    assert result.error_code == "20429"


def test_retry_after_as_http_date(fake, twilio):
    fake.script(
        Reply(status=503, headers={"Retry-After": formatdate(time.time() + 30, usegmt=True)})
    )
    result = twilio.send(MSG)
    assert result.outcome is Outcome.RETRY
    assert 25 <= result.retry_after <= 31


def test_code_20429_without_http_429_is_retry(fake, twilio):
    fake.script(Reply(status=400, code=20429))
    assert twilio.send(MSG).outcome is Outcome.RETRY


def test_21610_is_opted_out(fake, twilio):
    fake.script(Reply(status=400, code=21610))
    result = twilio.send(MSG)
    assert result.outcome is Outcome.OPTED_OUT
    assert result.error_code == "21610"
    assert result.error_text == "Attempt to send to unsubscribed recipient"


def test_opted_out_recipient_at_the_fake(fake, twilio):
    fake.opted_out.add(TO)
    assert twilio.send(MSG).outcome is Outcome.OPTED_OUT
    assert fake.messages == []


def test_21211_is_invalid_number_and_the_number_is_redacted(fake, twilio):
    fake.script(Reply(status=400, code=21211))  # Twilio's text quotes the number
    result = twilio.send(MSG)
    assert result.outcome is Outcome.INVALID_NUMBER
    assert result.error_code == "21211"
    assert "+1******0100" in result.error_text
    assert_no_secrets(result)


@pytest.mark.parametrize("code", [21211, 21614, 30005, 30006, 21217, 21401, 21407])
def test_invalid_number_codes(fake, twilio, code):
    fake.script(Reply(status=400, code=code))
    assert twilio.send(MSG).outcome is Outcome.INVALID_NUMBER


@pytest.mark.parametrize("code", [30001, 30003, 30008])
def test_transient_codes_at_create_are_retry(fake, twilio, code):
    fake.script(Reply(status=400, code=code))
    assert twilio.send(MSG).outcome is Outcome.RETRY


@pytest.mark.parametrize(
    ("status", "code", "error_code"),
    [(400, 21606, "21606"), (403, 20003, "20003"), (404, None, "20404"), (400, None, "400")],
)
def test_other_4xx_are_failed(fake, twilio, status, code, error_code):
    fake.script(Reply(status=status, code=code))  # the fake fills 404 in as 20404, 400 as null
    result = twilio.send(MSG)
    assert result.outcome is Outcome.FAILED
    assert result.error_code == error_code


def test_wrong_auth_token_is_failed_20003_without_the_token(fake):
    provider = make_provider(fake.provider_config(auth_token="wrong-token-0123456789abcdef"))
    result = provider.send(MSG)
    assert result.outcome is Outcome.FAILED
    assert result.error_code == "20003"
    assert result.error_text == "Authenticate"
    assert "wrong-token" not in repr(result)


def test_error_text_never_carries_the_token(fake, twilio):
    fake.script(
        Reply(status=400, body=f"echo {AUTH_TOKEN} {TO}"), Reply(status=500, body=AUTH_TOKEN)
    )
    for _ in range(2):
        result = twilio.send(MSG)
        assert result.error_text and "[token]" in result.error_text
        assert_no_secrets(result)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(503, Outcome.RETRY), (502, Outcome.UNKNOWN), (500, Outcome.UNKNOWN), (400, Outcome.FAILED)],
)
def test_non_json_error_bodies(fake, twilio, status, outcome):
    fake.script(Reply(status=status, body="<html>" + "x" * 500 + "</html>"))
    result = twilio.send(MSG)
    assert result.outcome is outcome
    assert result.error_code == str(status)
    assert result.error_text == f"HTTP {status}: " + ("<html>" + "x" * 500)[:200]


def test_2xx_without_sid_is_unknown(fake, twilio):
    fake.script(Reply(status=201, body={"status": "queued"}))
    assert twilio.send(MSG).outcome is Outcome.UNKNOWN


# -- twilio: the network ------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True])
def test_dropped_after_send_is_unknown(fake, twilio, reset, caplog):
    fake.script(Drop(reset=reset))
    with caplog.at_level(logging.WARNING):
        result = twilio.send(MSG)
    assert result.outcome is Outcome.UNKNOWN
    assert "dropped after the request was sent" in result.error_text
    assert len(fake.messages) == 1  # Twilio got it: resending would send it twice
    assert_no_secrets(result)
    assert TO not in caplog.text and AUTH_TOKEN not in caplog.text
    assert twilio.send(MSG).outcome is Outcome.SENT  # the pool recovers


def test_read_timeout_is_unknown(fake):
    provider = make_provider(fake.provider_config(timeout_seconds=0.3))
    fake.script(Delay(1.0))
    started = time.monotonic()
    result = provider.send(MSG)
    assert time.monotonic() - started < 0.9
    assert result.outcome is Outcome.UNKNOWN
    assert "read timeout" in result.error_text
    assert len(fake.messages) == 1


def test_global_delay_within_timeout_is_sent(fake, twilio):
    fake.delay = 0.1
    assert twilio.send(MSG).outcome is Outcome.SENT
    assert fake.requests[-1].at <= time.monotonic() - 0.09


def test_connection_refused_is_retry():
    config = ProviderConfig(
        kind="twilio",
        base_url=f"http://127.0.0.1:{closed_port()}",
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_=FROM_NUMBER,
    )
    result = make_provider(config).send(MSG)
    assert result.outcome is Outcome.RETRY
    assert "could not connect" in result.error_text
    assert "ConnectionRefusedError" in result.error_text
    assert_no_secrets(result)


def test_dns_failure_is_retry():
    config = ProviderConfig(
        kind="twilio",
        base_url="http://txsms-test.invalid",
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_=FROM_NUMBER,
        timeout_seconds=2.0,
    )
    result = make_provider(config).send(MSG)
    assert result.outcome is Outcome.RETRY


def test_connect_timeout_is_retry():
    # A listening socket whose backlog is full and never accepts: further SYNs go unanswered.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip("this platform completes connections beyond the backlog")
        config = ProviderConfig(
            kind="twilio",
            base_url=f"http://127.0.0.1:{port}",
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_=FROM_NUMBER,
            timeout_seconds=0.3,
        )
        result = make_provider(config).send(MSG)
        assert result.outcome is Outcome.RETRY
        assert "connect timeout" in result.error_text
    finally:
        for s in fillers:
            s.close()
        server.close()


def test_send_never_raises(twilio, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(f"bug with {AUTH_TOKEN} and {TO}")

    monkeypatch.setattr(twilio.session, "send", broken)
    result = twilio.send(MSG)
    assert result.outcome is Outcome.UNKNOWN
    assert_no_secrets(result)


# -- twilio: find_sent --------------------------------------------------------------------------


def test_find_sent_lists_messages_to_the_number(fake, twilio):
    since = time.time()
    twilio.send(MSG)
    twilio.send(OutgoingMessage(id="m2", to="+14155550199", body="other"))
    fake.script(Drop())
    twilio.send(MSG)  # unknown to us, but Twilio has it
    found = twilio.find_sent(TO, since)
    assert [m["to"] for m in found] == [TO, TO]
    assert {m["sid"] for m in found} == {m["sid"] for m in fake.messages if m["to"] == TO}
    req = fake.requests[-1]
    assert req.method == "GET"
    assert req.query == {"To": TO, "DateSent>": time.strftime("%Y-%m-%d", time.gmtime(since))}


def test_find_sent_follows_pages(fake, twilio):
    for i in range(60):
        twilio.send(OutgoingMessage(id=f"m{i}", to=TO, body=f"n{i}"))
    found = twilio.find_sent(TO, time.time() - 60)
    assert len(found) == 60
    assert len({m["sid"] for m in found}) == 60
    assert sum(r.method == "GET" for r in fake.requests) == 2


def test_find_sent_raises_when_it_cannot_ask(fake, twilio):
    fake.script(Reply(status=500), method="GET")
    with pytest.raises(TwilioLookupError) as info:
        twilio.find_sent(TO, time.time())
    assert TO not in str(info.value) and "HTTP 500" in str(info.value)


# -- the fake itself ----------------------------------------------------------------------------


def test_fake_wait_for_and_wait_until(fake, twilio):
    twilio.send(MSG)
    assert fake.wait_for(lambda: fake.messages)[0]["to"] == TO
    with pytest.raises(AssertionError):
        wait_until(lambda: False, timeout=0.05)


def test_fake_stop_is_prompt_and_idempotent():
    server = FakeTwilio().start()
    provider = make_provider(server.provider_config())
    assert provider.send(MSG).outcome is Outcome.SENT  # leaves a keep-alive connection open
    started = time.monotonic()
    server.stop()
    server.stop()
    assert time.monotonic() - started < 1.0
