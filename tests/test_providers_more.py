"""Vonage, Plivo and MessageBird: signature vectors, sends against fakes over real HTTP, the
worker end to end, and signed webhooks through the Flask app (SQLite and PostgreSQL).

No opt-out-at-send test here: the reference gives none of the three an error code that means
"the recipient opted out" (Twilio's 21610 is tested in test_worker.py), so they classify such
answers as plain failures.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes import wait_until
from fakes.providers import (
    MESSAGEBIRD_ACCESS_KEY,
    PLIVO_AUTH_TOKEN,
    VONAGE_SECRET,
    Delay,
    Drop,
    FakeMessageBird,
    FakePlivo,
    FakeVonage,
    Reply,
    Webhook,
    mint_jwt,
    plivo_v3_sign,
    vonage_sign,
)
from fakes.twilio import FakeTwilio
from fakes.twilio import Reply as TwilioReply
from sqlalchemy import select

from txsms.core import consent
from txsms.core.errors import ConfigError
from txsms.core.events import Event, Recipient
from txsms.core.pipeline import ingest
from txsms.core.providers import CallbackRequest, Outcome, OutgoingMessage, make_provider
from txsms.core.providers.messagebird import verify_jwt
from txsms.core.providers.plivo import plivo_signature_v2, plivo_signature_v3, plivo_v3_base
from txsms.core.providers.vonage import vonage_signature
from txsms.core.returnpath import REPLY_KIND
from txsms.core.storage import messages, provider_callbacks
from txsms.core.worker import Worker
from txsms.webhooks import create_app

PUBLIC = "https://sms.example.test"  # server.public_url in conftest.make_config
PHONE = "+14155550100"
FAKES = {"vonage": FakeVonage, "plivo": FakePlivo, "messagebird": FakeMessageBird}


def hook_url(kind: str, route: str) -> str:
    return f"{PUBLIC}/webhooks/providers/{kind}/{route}"


def callback(hook: Webhook) -> CallbackRequest:
    """The CallbackRequest webhooks/providers.py would build from this webhook."""
    form = hook.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded")
    return CallbackRequest(
        hook.method,
        hook.url,
        hook.headers,
        hook.body,
        form=parse_qs(hook.body.decode(), keep_blank_values=True) if form else {},
        query=parse_qs(urlsplit(hook.url).query, keep_blank_values=True),
    )


def provider_of(fake, **overrides):
    return make_provider(fake.provider_config(**overrides), public_url=PUBLIC)


def ids_at(fake) -> list[str]:
    """The provider's ids of the messages it holds."""
    return [m.get("message-id") or m.get("message_uuid") or m.get("id") for m in fake.messages]


# -- Vonage signatures ---------------------------------------------------------------------------

# The example delivery receipt of Vonage's API spec (Nexmo/api-specification sms.yml 1.0.10).
VONAGE_DLR = {
    "msisdn": "447700900000",
    "to": "AcmeInc",
    "network-code": "12345",
    "messageId": "0A0000001234567B",
    "price": "0.03330000",
    "status": "delivered",
    "scts": "2001011400",
    "err-code": "0",
    "api-key": "abcd1234",
    "client-ref": "my-personal-reference",
    "message-timestamp": "2020-01-01 12:00:00",
    "timestamp": "1582650446",
    "nonce": "ec11dd3e-1e7f-4db5-9467-82b02cd223b9",
}
# Computed with vonage-http-client 1.5.2, Auth(signature_secret="my_signature_secret",
# signature_method=m).sign_params(VONAGE_DLR), and for md5hash with nexmo 2.5.2's
# Client(signature_secret=...).signature(...). The reference's two digests (cdac8f38…, 13081079…)
# are left out: their parameter set cannot be rebuilt from what the reference names.
VONAGE_VECTORS = {
    "md5": "b0574d4e9d28eb4475e35e973387c501",
    "sha1": "918a4407c44eead9a617b94902e99fa0f60700d4",
    "sha256": "81956ed1ddf7ac0b2490adf75d9e5e36e942ea373371dfe05c2f3e9b7e333ccb",
    "sha512": "b86baacccb24cf05b24bc15a3825201ccb49c135e2dd6f73fe8b07fa8cd66548"
    "4feb725369868a0c7afbe099233f28430e2e48478b5eb50e79f8e0deeba267e6",
    "md5hash": "63dfe582f42be336d322ff620e5f2cd9",
}


@pytest.mark.parametrize("method", sorted(VONAGE_VECTORS))
def test_vonage_signature_matches_the_sdks(method):
    expected = VONAGE_VECTORS[method]
    assert vonage_signature(VONAGE_DLR, "my_signature_secret", method) == expected
    assert vonage_sign(VONAGE_DLR, "my_signature_secret", method) == expected  # the fake's own
    assert vonage_signature({**VONAGE_DLR, "sig": "x"}, "my_signature_secret", method) == expected


def test_vonage_signature_replaces_ampersand_and_equals_inside_values():
    tricky = {**VONAGE_DLR, "client-ref": "a&b=c"}
    expected = "e02bb65eb17886947081376604d93f6a06a89c046fae1cd2d2d6019e48487a5b"  # the SDK's
    assert vonage_signature(tricky, "my_signature_secret") == expected
    assert vonage_signature({**tricky, "client-ref": "a_b_c"}, "my_signature_secret") == expected


@pytest.mark.parametrize("form", ["POST", "GET", "JSON"])
@pytest.mark.parametrize("signature_method", ["sha256", "md5", "md5hash"])
def test_vonage_accepts_fresh_signed_webhooks_in_every_form(form, signature_method):
    fake = FakeVonage(signature_method=signature_method)
    provider = provider_of(fake)
    method, as_json = ("GET", False) if form == "GET" else ("POST", form == "JSON")
    hook = fake.receipt(
        hook_url("vonage", "status"), "0A01", "delivered", method=method, as_json=as_json
    )
    request = callback(hook)
    assert provider.verify_callback(request)
    assert provider.parse_status(request)[0].status == "delivered"


@pytest.mark.parametrize(
    ("age", "secret", "accepted"),
    [
        (290, None, True),
        (310, None, False),  # a replay: older than 5 minutes
        (-310, None, False),
        (0, "not-the-signature-secret", False),
    ],
)
def test_vonage_refuses_stale_or_forged_webhooks(age, secret, accepted):
    fake = FakeVonage()
    params = {"msisdn": "14155550100", "text": "STOP"}
    hook = fake.signed(
        hook_url("vonage", "inbound"), params, timestamp=time.time() - age, secret=secret
    )
    assert provider_of(fake).verify_callback(callback(hook)) is accepted


def test_vonage_refuses_tampered_unsigned_and_unconfigured():
    fake = FakeVonage()
    hook = fake.inbound(hook_url("vonage", "inbound"), "HELP")
    provider = provider_of(fake)
    assert provider.verify_callback(callback(hook))
    tampered = replace(hook, body=hook.body.replace(b"HELP", b"STOP"))
    assert not provider.verify_callback(callback(tampered))
    params = {k: v for k, v in parse_qs(hook.body.decode()).items() if k != "sig"}
    unsigned = CallbackRequest("POST", hook.url, hook.headers, b"", form=params)
    assert not provider.verify_callback(unsigned)
    assert not provider_of(fake, signature_secret=None).verify_callback(callback(hook))


# -- Plivo signatures ----------------------------------------------------------------------------

NONCE = "05429567804466091622"


def test_plivo_reference_v3_vectors():
    params = {
        "From": "14155550100",
        "To": "14155550199",
        "MessageUUID": "abc-123",
        "Status": "delivered",
    }
    base = plivo_v3_base(
        "POST", "https://example.com/plivo/status", {k: [v] for k, v in params.items()}
    )
    assert base == (
        "https://example.com/plivo/status?From14155550100MessageUUIDabc-123StatusdeliveredTo14155550199"
    )
    assert (
        plivo_signature_v3("MY_AUTH_TOKEN", base, NONCE)
        == "3LwE6Wt8EcYNUoyHVM1b+j2xGz1I0M0ccAuJVKZPT3A="
    )
    url = "https://example.com/plivo/status?x=1&a=2"
    base = plivo_v3_base("POST", url, {"Status": ["sent"], "MessageUUID": ["abc-123"]})
    assert base == "https://example.com/plivo/status?a=2&x=1.MessageUUIDabc-123Statussent"
    assert (
        plivo_signature_v3("MY_AUTH_TOKEN", base, NONCE)
        == "1hhjsSsAQkXut6qWXYfgYyYgOt7vEWt+ZtJB7hdWUkk="
    )
    # The fake signs with its own implementation and agrees.
    signed = plivo_v3_sign(
        "MY_AUTH_TOKEN", "POST", "https://example.com/plivo/status", params, NONCE
    )
    assert signed == "3LwE6Wt8EcYNUoyHVM1b+j2xGz1I0M0ccAuJVKZPT3A="


def test_plivo_reference_v2_vector():
    expected = "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc="
    assert plivo_signature_v2("my_auth_token", "https://answer.url", "12345") == expected


@pytest.mark.parametrize(
    ("method", "url", "params", "expected"),
    [  # computed with plivo 4.63.0's signature_v3 (construct_get_url / construct_post_url)
        (
            "GET",
            "https://example.com/plivo/status?Status=delivered&MessageUUID=abc-123&To=14155550199",
            {},
            "EqNDt/R38TLmtLpQ/tuf2kstolJG4dRDOAvEm0AvyCo=",
        ),
        (
            "POST",
            "https://example.com/plivo/in?b=2&a=1&a=0",
            {"Text": ["STOP now"], "From": ["447700900123"], "Media": ["z", "y"]},
            "FtFIbAIYOZ4vQ1zZgPmizb8TlTiwIeW7YDf1WpW0VV4=",
        ),
    ],
)
def test_plivo_v3_matches_the_sdk_for_get_and_repeated_keys(method, url, params, expected):
    assert (
        plivo_signature_v3("MY_AUTH_TOKEN", plivo_v3_base(method, url, params), NONCE) == expected
    )


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_plivo_verify_takes_any_of_several_signatures_and_nothing_forged(method):
    fake = FakePlivo()
    provider = provider_of(fake)
    hook = fake.inbound(hook_url("plivo", "inbound") + "?k=v", "HELP", method=method)
    assert provider.verify_callback(callback(hook))
    sig = hook.headers["X-Plivo-Signature-V3"]
    rotated = replace(hook, headers={**hook.headers, "X-Plivo-Signature-V3": f"{'A' * 43}=, {sig}"})
    assert provider.verify_callback(callback(rotated))
    tampered = replace(
        hook, url=hook.url.replace("HELP", "STOP"), body=hook.body.replace(b"HELP", b"STOP")
    )
    assert not provider.verify_callback(callback(tampered))
    v2_only = {k: v for k, v in hook.headers.items() if "V3" not in k}  # V2 does not sign the body
    assert not provider.verify_callback(callback(replace(hook, headers=v2_only)))
    forged = fake.inbound(
        hook_url("plivo", "inbound"), "STOP", method=method, token="not-the-token"
    )
    assert not provider.verify_callback(callback(forged))


# -- MessageBird signatures ----------------------------------------------------------------------

MB_KEY = "messagebird-signing-key-0123456789"
# Minted with PyJWT 2.15.1 and accepted by messagebird 2.2.0's RequestValidator (exp: 2100).
MB_GET_URL = (
    f"{PUBLIC}/webhooks/providers/messagebird/status"
    "?id=e8077d803532c0b5937c639b60216938&status=delivered"
)
MB_GET_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJNZXNzYWdlQmlyZCIsIm5iZiI6MTcwMDAwMDAwMCwiZXhwIjo0"
    "MTAyNDQ0ODAwLCJqdGkiOiIzYjhlM2M1Yy01ZjBlLTRkNmMtOWQ0ZS0yZjZhOWMxZTdiMTAiLCJ1cmxfaGFzaCI6Ijk5NmYw"
    "MzZmY2NmMGFjM2YzOTI4ZWJkM2VlYTQ2YTA1ZTdmMzEwYzYwMmY1ZWU2MmZjYTk1OGQzMjBjNjJjZjMifQ.AAyjzTNKchYcYQ"
    "G09WUTIh198fKwRPIv5elE7JbIyek"
)
MB_POST_URL = f"{PUBLIC}/webhooks/providers/messagebird/inbound"
MB_POST_BODY = b'{"originator": "31612345678", "body": "STOP"}'
MB_POST_TOKEN = (  # HS512, with payload_hash
    "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJNZXNzYWdlQmlyZCIsIm5iZiI6MTcwMDAwMDAwMCwiZXhwIjo0"
    "MTAyNDQ0ODAwLCJqdGkiOiIzYjhlM2M1Yy01ZjBlLTRkNmMtOWQ0ZS0yZjZhOWMxZTdiMTAiLCJ1cmxfaGFzaCI6IjMzMDU3"
    "MzgxMzdmYzE0ODQ1YjI5NWQzNDM0YmQ5NzEzMWVkMGZmYjdlYTkyOWM0Yzk3MmRiODNlZmI5NTQyOTgiLCJwYXlsb2FkX2hh"
    "c2giOiI2ZmJkNzNhNDZmNmY1NTNkZTIyYzM3ZTBkNzViZjk5ZTQzZDFkNzM3MDYzNTM1ZjRjMTAyZGUwMDgyZmEwZGIxIn0."
    "vhXop1OFK6pL1CEQpeW_0QmH2U9du4ewJIBhHAC8ILfGhg3HLS7oHtt-W8bCUqc_d5H3HjWyd8ux4kjUZPJ2oA"
)


def mb_request(url: str, token: str, body: bytes = b"", method: str = "GET") -> CallbackRequest:
    headers = {"MessageBird-Signature-JWT": token}
    if body:
        headers["Content-Type"] = "application/json"
    query = parse_qs(urlsplit(url).query)
    return CallbackRequest(method, url, headers, body, query=query)


def test_messagebird_accepts_tokens_minted_by_pyjwt():
    provider = provider_of(FakeMessageBird())
    assert provider.verify_callback(mb_request(MB_GET_URL, MB_GET_TOKEN))
    assert provider.verify_callback(mb_request(MB_POST_URL, MB_POST_TOKEN, MB_POST_BODY, "POST"))
    assert provider.parse_inbound(
        mb_request(MB_POST_URL, MB_POST_TOKEN, MB_POST_BODY, "POST")
    ).sender == ("+31612345678")
    assert not provider.verify_callback(mb_request(MB_GET_URL + "&x=1", MB_GET_TOKEN))  # url_hash
    assert not provider.verify_callback(
        mb_request(MB_POST_URL, MB_POST_TOKEN, MB_POST_BODY + b" ", "POST")
    )
    assert not provider.verify_callback(mb_request(MB_POST_URL, MB_POST_TOKEN))  # hash but no body
    assert not provider_of(FakeMessageBird(), signing_key="another-key").verify_callback(
        mb_request(MB_GET_URL, MB_GET_TOKEN)
    )


@pytest.mark.parametrize(
    ("claims", "valid"),
    [
        ({"nbf": 1000, "exp": 1060}, True),
        ({"nbf": 1001, "exp": 1060}, True),  # 1 s leeway
        ({"nbf": 1002, "exp": 1060}, False),  # not yet
        ({"nbf": 900, "exp": 1000}, True),  # 1 s leeway
        ({"nbf": 900, "exp": 999}, False),  # expired
        ({"exp": 1060}, False),  # nbf is required
        ({"nbf": 1000}, False),  # exp is required
        ({"nbf": "1000", "exp": 1060}, False),
        ({"nbf": True, "exp": 1060}, False),
    ],
)
def test_jwt_time_claims(claims, valid):
    token = mint_jwt(MB_KEY, {"iss": "MessageBird", **claims})
    assert (verify_jwt(token, MB_KEY, now=1000) is not None) is valid


@pytest.mark.parametrize(
    "token",
    [
        mint_jwt(MB_KEY, {"iss": "MessageBird", "nbf": 1000, "exp": 1060}, alg="none"),
        mint_jwt("wrong-key", {"iss": "MessageBird", "nbf": 1000, "exp": 1060}),
        mint_jwt(MB_KEY, {"iss": "MessageBird", "nbf": 1000, "exp": 1060})[:-2],
        "not.a.jwt",
        "a.b",
        "",
        "é.é.é",
    ],
)
def test_jwt_refuses_unsigned_forged_and_garbled_tokens(token):
    assert verify_jwt(token, MB_KEY, now=1000) is None


def test_messagebird_refuses_other_issuers_and_bodies_without_a_hash():
    fake = FakeMessageBird()
    provider = provider_of(fake)
    good = fake.inbound(hook_url("messagebird", "inbound"), "STOP", method="POST", as_json=True)
    assert provider.verify_callback(callback(good))
    for claims in ({"iss": "Mallory"}, {"payload_hash": None}, {"url_hash": "0" * 64}):
        hook = fake.inbound(
            hook_url("messagebird", "inbound"), "STOP", method="POST", claims=claims
        )
        assert not provider.verify_callback(callback(hook)), claims


# -- sends against the fakes, classified ---------------------------------------------------------


@pytest.fixture(params=sorted(FAKES))
def fake(request):
    with FAKES[request.param]() as server:
        yield server


def test_vonage_request_shape_parts_and_unicode():
    with FakeVonage() as fake:
        provider = provider_of(fake)
        result = provider.send(OutgoingMessage("m1", PHONE, "a" * 200, 2, "GSM-7"))
        assert (result.outcome, result.segments) == (Outcome.SENT, 2)
        assert result.provider_message_id == fake.messages[0]["message-ids"][0]
        form = fake.requests[0].form
        assert (form["to"], form["from"], form["text"]) == ("14155550100", "14155550999", "a" * 200)
        assert (form["api_key"], form["api_secret"]) == ("abcd1234", VONAGE_SECRET)
        assert form["callback"] == hook_url("vonage", "status") and form["client-ref"] == "m1"
        assert "type" not in form
        provider.send(OutgoingMessage("m2", PHONE, "Shipped ✓", 1, "UCS-2"))
        assert fake.requests[1].form["type"] == "unicode"


def test_plivo_request_shape():
    with FakePlivo() as fake:
        result = provider_of(fake).send(OutgoingMessage("m1", PHONE, "Shipped ✓", 1, "UCS-2"))
        assert (result.outcome, result.provider_message_id) == (Outcome.SENT, ids_at(fake)[0])
        [request] = fake.requests
        assert request.path == "/v1/Account/MAODUMMY0123456789AB/Message/"
        assert request.json == {
            "src": "14155550999",
            "dst": PHONE,
            "text": "Shipped ✓",
            "type": "sms",
            "url": hook_url("plivo", "status"),
            "method": "POST",
        }


def test_messagebird_request_shape():
    with FakeMessageBird() as fake:
        provider = provider_of(fake)
        result = provider.send(OutgoingMessage("m1", PHONE, "Shipped ✓", 1, "UCS-2"))
        assert (result.outcome, result.provider_status) == (Outcome.SENT, "sent")
        assert result.provider_message_id == ids_at(fake)[0]
        [request] = fake.requests
        assert request.headers["Authorization"] == f"AccessKey {MESSAGEBIRD_ACCESS_KEY}"
        assert request.json == {
            "originator": "14155550999",
            "recipients": "14155550100",
            "body": "Shipped ✓",
            "datacoding": "unicode",
            "reference": "m1",
            "reportUrl": hook_url("messagebird", "status"),
        }
        provider.send(OutgoingMessage("m2", PHONE, "Shipped", 1, "GSM-7"))
        assert fake.requests[1].json["datacoding"] == "plain"


def parts(*statuses: str) -> dict:
    """A Vonage answer with one entry per part."""
    return {
        "message-count": str(len(statuses)),
        "messages": [
            {"to": "14155550100", "message-id": f"P{n}", "status": s, "error-text": "Throttled"}
            for n, s in enumerate(statuses, 1)
        ],
    }


@pytest.mark.parametrize(
    ("kind", "reply", "outcome", "code"),
    [
        ("vonage", Reply(status=200, code=1), Outcome.RETRY, "1"),
        ("vonage", Reply(status=200, code=5), Outcome.RETRY, "5"),
        ("vonage", Reply(status=200, code=10), Outcome.RETRY, "10"),
        ("vonage", Reply(status=200, code=9), Outcome.RETRY, "9"),
        ("vonage", Reply(status=200, code=4), Outcome.FAILED, "4"),
        ("vonage", Reply(status=200, code=7), Outcome.FAILED, "7"),
        ("vonage", Reply(status=200, code=15), Outcome.FAILED, "15"),
        ("vonage", Reply(status=200, code=33), Outcome.INVALID_NUMBER, "33"),
        ("vonage", Reply(status=200, body=parts("0", "1")), Outcome.FAILED, "1"),
        ("vonage", Reply(status=200, body={"message-count": "0"}), Outcome.UNKNOWN, None),
        ("vonage", Reply(status=429), Outcome.RETRY, "429"),
        ("vonage", Reply(status=503), Outcome.RETRY, "503"),
        ("vonage", Reply(status=504), Outcome.UNKNOWN, "504"),
        ("plivo", Reply(status=400, message="invalid dst"), Outcome.FAILED, "400"),
        ("plivo", Reply(status=401), Outcome.FAILED, "401"),
        ("plivo", Reply(status=429), Outcome.RETRY, "429"),
        ("plivo", Reply(status=503), Outcome.RETRY, "503"),
        ("plivo", Reply(status=500), Outcome.UNKNOWN, "500"),
        (
            "plivo",
            Reply(status=202, body={"invalid_number": ["14155550100"]}),
            Outcome.FAILED,
            "202",
        ),
        ("plivo", Reply(status=202, body={"api_id": "x"}), Outcome.UNKNOWN, None),
        ("messagebird", Reply(status=422, code=9), Outcome.FAILED, "9"),
        ("messagebird", Reply(status=401), Outcome.FAILED, "2"),
        ("messagebird", Reply(status=429), Outcome.RETRY, "99"),
        ("messagebird", Reply(status=503), Outcome.RETRY, "99"),
        ("messagebird", Reply(status=502), Outcome.UNKNOWN, "99"),
        ("messagebird", Reply(status=201, body={"recipients": {}}), Outcome.UNKNOWN, None),
    ],
)
def test_answers_are_classified(kind, reply, outcome, code):
    with FAKES[kind]() as fake:
        fake.script(reply)
        result = provider_of(fake).send(OutgoingMessage("m1", PHONE, "Hello"))
    assert (result.outcome, result.error_code) == (outcome, code)
    assert result.error_text


def test_vonage_partial_send_is_failed_never_retried_and_out_of_credit_waits():
    with FakeVonage() as fake:
        fake.script(Reply(status=200, body=parts("0", "1")), Reply(status=200, code=9))
        provider = provider_of(fake)
        partial = provider.send(OutgoingMessage("m1", PHONE, "a" * 200, 2))
        assert partial.provider_message_id == "P1"
        assert partial.error_text.startswith("1 of 2 parts sent, then: Throttled")
        assert provider.send(OutgoingMessage("m2", PHONE, "Hi")).retry_after == 900


def test_retry_after_header_is_kept(fake):
    fake.script(Reply(status=429, headers={"Retry-After": "7"}))
    assert provider_of(fake).send(OutgoingMessage("m1", PHONE, "Hello")).retry_after == 7.0


@pytest.mark.parametrize(
    ("script", "outcome"),
    [(Drop(), Outcome.UNKNOWN), (Drop(reset=True), Outcome.UNKNOWN), (Delay(1.0), Outcome.UNKNOWN)],
)
def test_network_trouble_after_sending_is_unknown(fake, script, outcome):
    fake.script(script)
    result = provider_of(fake, timeout_seconds=0.3).send(OutgoingMessage("m1", PHONE, "Hello"))
    assert result.outcome is outcome and result.error_text
    wait_until(lambda: len(fake.messages) == 1)  # it did reach the provider


def test_connection_refused_is_retry(fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = provider_of(fake, base_url=f"http://127.0.0.1:{port}").send(
        OutgoingMessage("m1", PHONE, "Hi")
    )
    assert result.outcome is Outcome.RETRY


@pytest.mark.parametrize(
    ("kind", "reply"),
    [
        (
            "vonage",
            Reply(status=200, code=3, message=f"Invalid to 14155550100 for {VONAGE_SECRET}"),
        ),
        ("plivo", Reply(status=400, message=f"{PHONE} is not valid (token {PLIVO_AUTH_TOKEN})")),
        ("messagebird", Reply(status=422, code=9, message=f"14155550100 {MESSAGEBIRD_ACCESS_KEY}")),
    ],
)
def test_error_texts_never_carry_the_number_or_secrets(kind, reply):
    with FAKES[kind]() as fake:
        fake.script(reply)
        result = provider_of(fake).send(OutgoingMessage("m1", PHONE, "Hello"))
    for secret in ("14155550100", VONAGE_SECRET, PLIVO_AUTH_TOKEN, MESSAGEBIRD_ACCESS_KEY):
        assert secret not in (result.error_text or "") and secret not in repr(result)
    assert "0100" in result.error_text  # redacted, still recognisable


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        ("vonage", "api_secret"),
        ("vonage", "from_"),
        ("plivo", "auth_id"),
        ("plivo", "auth_token"),
        ("messagebird", "access_key"),
        ("messagebird", "from_"),
    ],
)
def test_missing_credentials_stop_start_up(kind, missing):
    with pytest.raises(ConfigError, match=f"provider.{missing.rstrip('_')}"):
        make_provider(FAKES[kind]().provider_config(**{missing: None}))


# -- the worker, end to end ----------------------------------------------------------------------


@pytest.fixture
def runtime(runtime_factory, fake):
    return runtime_factory(provider=fake.provider_section(), worker={"unknown_grace_seconds": 0})


def send_one(runtime, key="k1"):
    data = {"order": {"number": "#1", "total": "$5.00"}}
    ingest(
        runtime,
        [
            Event(
                source="api",
                kind="order.created",
                key=key,
                recipient=Recipient(phone=PHONE),
                data=data,
            )
        ],
    )
    worker = Worker(runtime)
    wait_until(
        lambda: worker.run_once() is not None and row(runtime, key).status not in ("pending",)
    )
    return row(runtime, key)


def row(runtime, key="k1"):
    with runtime.engine.connect() as conn:
        return conn.execute(
            select(messages).where(messages.c.idempotency_key == f"api|{key}|order.created")
        ).one()


def test_worker_sends_with_the_providers_id(runtime, fake):
    sent = send_one(runtime)
    assert sent.status == "sent" and sent.provider == fake.kind
    assert ids_at(fake) == [sent.provider_message_id]


RETRYABLE = {
    "vonage": Reply(status=200, code=1),
    "plivo": Reply(status=503),
    "messagebird": Reply(status=429),
}


def test_retryable_error_then_success_sends_one_message(runtime, fake):
    fake.script(RETRYABLE[fake.kind])
    ingest(
        runtime,
        [Event(source="api", kind="order.created", key="k1", recipient=Recipient(phone=PHONE))],
    )
    worker = Worker(runtime)
    wait_until(lambda: worker.run_once() is not None and row(runtime).status == "sent", timeout=10)
    assert len(fake.requests) == 2 and len(fake.messages) == 1
    assert row(runtime).attempts == 2 and row(runtime).provider_message_id == ids_at(fake)[0]


PERMANENT = {
    "vonage": (Reply(status=200, code=4), "4", "Bad Credentials"),
    "plivo": (Reply(status=400, message="invalid dst number"), "400", "invalid dst number"),
    "messagebird": (Reply(status=422, code=9, message="no (correct) recipients found"), "9", None),
}


def test_permanent_error_fails_with_code_and_text(runtime, fake):
    reply, code, text = PERMANENT[fake.kind]
    fake.script(reply)
    failed = send_one(runtime)
    assert (failed.status, failed.reason, failed.error_code) == ("failed", "provider_error", code)
    assert failed.error_text == (text or reply.message)
    assert len(fake.requests) == 1


def test_unicode_text_is_sent_as_unicode(runtime_factory, fake):
    runtime = runtime_factory(
        provider=fake.provider_section(), templates={"order.created": {"body": "{{ shop.name }} ✓"}}
    )
    send_one(runtime)
    [request] = fake.requests
    if fake.kind == "vonage":
        assert request.form["type"] == "unicode" and request.form["text"].startswith("Test Shop ✓")
    elif fake.kind == "messagebird":
        assert request.json["datacoding"] == "unicode" and request.json["body"].startswith(
            "Test Shop ✓"
        )
    else:  # Plivo chooses the encoding itself
        assert request.json["text"].startswith("Test Shop ✓")


def test_vonage_keeps_its_own_part_count(runtime_factory):
    with FakeVonage() as fake:
        runtime = runtime_factory(provider=fake.provider_section())
        fake.script(Reply(status=200, body=parts("0", "0", "0")))
        sent = send_one(runtime)
    assert (sent.status, sent.segments, sent.provider_message_id) == ("sent", 3, "P1")


# -- the return path through the Flask app -------------------------------------------------------


@pytest.fixture
def client(runtime):
    return create_app(runtime=runtime).test_client()


def opted_out(runtime, phone=PHONE) -> bool:
    with runtime.engine.connect() as conn:
        return consent.state(conn, runtime.vault.index(phone)).opted_out


def replies(runtime):
    with runtime.engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.kind == REPLY_KIND)).all()


# Each provider's usual way of calling first, then the others it may be configured to use.
CALLS = [
    ("vonage", "GET", False),
    ("vonage", "POST", False),
    ("vonage", "POST", True),
    ("plivo", "POST", False),
    ("plivo", "GET", False),
    ("messagebird", "GET", False),
    ("messagebird", "POST", True),
    ("messagebird", "POST", False),  # a form POST: its payload_hash is over the raw body
]


@pytest.mark.parametrize(("fake", "method", "as_json"), CALLS, indirect=["fake"])
def test_signed_stop_opts_out_and_the_confirmation_is_sent(runtime, client, fake, method, as_json):
    json_body = {"as_json": True} if as_json else {}  # Plivo never posts JSON
    hook = fake.inbound(hook_url(fake.kind, "inbound"), "STOP", method=method, **json_body)
    response = hook.send(client)
    assert response.status_code == 200 and response.json["keyword"] == "opt_out"
    assert opted_out(runtime)
    with runtime.engine.connect() as conn:
        [entry] = consent.ledger(conn, runtime.vault, runtime.vault.index(PHONE))
    assert entry["source"] == f"inbound:{fake.kind}" and entry["evidence"]["text"] == "STOP"
    [reply] = replies(runtime)
    assert reply.status == "pending"
    Worker(runtime).run_once()  # the one message an opted-out number still gets
    [reply] = replies(runtime)
    assert reply.status == "sent" and reply.provider_message_id == ids_at(fake)[0]
    [request] = fake.requests
    body = request.form.get("text") or request.json.get("text") or request.json.get("body")
    assert "unsubscribed" in body


@pytest.mark.parametrize("how", ["unsigned", "wrong key", "tampered"])
def test_unsigned_or_forged_stop_is_403_and_changes_nothing(runtime, client, fake, how):
    url = hook_url(fake.kind, "inbound")
    if how == "unsigned":
        hook = fake.inbound(url, "STOP")
        signature = ("sig", "X-Plivo-Signature", "MessageBird-Signature-JWT")
        headers = {k: v for k, v in hook.headers.items() if not k.startswith(signature)}
        stripped = hook.url.split("&sig=")[0] if "&sig=" in hook.url else hook.url
        hook = replace(hook, url=stripped, headers=headers, body=hook.body.split(b"&sig=")[0])
    elif how == "wrong key":
        hook = fake.inbound(
            url, "STOP", **{{"vonage": "secret", "plivo": "token"}.get(fake.kind, "key"): "nope"}
        )
    else:
        hook = fake.inbound(url, "HELP")
        hook = replace(
            hook, url=hook.url.replace("HELP", "STOP"), body=hook.body.replace(b"HELP", b"STOP")
        )
    assert hook.send(client).status_code == 403
    assert not opted_out(runtime) and replies(runtime) == []
    with runtime.engine.connect() as conn:
        assert conn.execute(select(provider_callbacks)).all() == []


def test_international_sender_is_read_as_international(runtime, client, fake):
    """Providers send 447911123456 without the +; read as a US number it would be nonsense."""
    fake.inbound(hook_url(fake.kind, "inbound"), "STOP", sender="447911123456").send(client)
    assert opted_out(runtime, "+447911123456") and not opted_out(runtime)


SENT_WORD = {"vonage": "accepted", "plivo": "sent", "messagebird": "sent"}  # Vonage has no "sent"


def test_receipts_only_move_forward(runtime, client, fake):
    sent = send_one(runtime)
    url = hook_url(fake.kind, "status")
    for status in (SENT_WORD[fake.kind], "delivered", SENT_WORD[fake.kind]):
        response = fake.receipt(url, sent.provider_message_id, status).send(client)
        assert response.status_code == 200 and response.json["applied"] == 1
    assert row(runtime).status == "delivered"


FAILED_RECEIPT = {
    "vonage": ({"status": "expired", "err_code": "6"}, "undelivered", "6"),
    "plivo": ({"status": "undelivered", "error_code": "70", "units": "2"}, "undelivered", "70"),
    "messagebird": ({"status": "delivery_failed", "error_code": "104"}, "failed", "104"),
}


def test_failed_receipt_keeps_its_code(runtime, client, fake):
    sent = send_one(runtime)
    extra, status, code = FAILED_RECEIPT[fake.kind]
    fake.receipt(hook_url(fake.kind, "status"), sent.provider_message_id, **extra).send(client)
    after = row(runtime)
    assert (after.status, after.error_code, after.reason) == (status, code, "provider_error")
    if fake.kind == "plivo":
        assert after.segments == 2  # Plivo's Units


def test_unsigned_receipt_is_403(runtime, client, fake):
    sent = send_one(runtime)
    hook = fake.receipt(hook_url(fake.kind, "status"), sent.provider_message_id, "delivered")
    if fake.kind == "vonage":
        hook = fake.receipt(
            hook.url, sent.provider_message_id, "delivered", timestamp=time.time() - 600
        )
    else:
        hook = replace(hook, headers={k: v for k, v in hook.headers.items() if k == "Content-Type"})
    assert hook.send(client).status_code == 403
    assert row(runtime).status == "sent"


# -- the request on the wire: what requests itself would send -----------------------------------

WIRE_MESSAGES = [
    OutgoingMessage("m1", PHONE, "Your order #1001 has shipped.", 1, "GSM-7"),
    OutgoingMessage("m2", PHONE, "Zoë & Co: 50% off = £5 + a ✓? /path?a=b#c", 1, "UCS-2"),
    OutgoingMessage("m3", PHONE, "a" * 400, 3, "GSM-7"),
]


@pytest.mark.parametrize("kind", ["twilio", *sorted(FAKES)])
def test_each_send_is_byte_for_byte_what_session_post_sends(kind):
    """The provider prepares a send's request itself (`HttpProvider._prepare`): its method,
    path, headers and body, as the provider's fake receives them, are those of
    `session.post` with the same arguments."""
    with (FakeTwilio if kind == "twilio" else FAKES[kind])() as fake:
        provider = provider_of(fake)
        for message in WIRE_MESSAGES:
            assert provider.send(message).outcome is Outcome.SENT
            url, body = provider.build_request(message)
            provider.session.post(url, **body, timeout=5, allow_redirects=False)
        requests_ = fake.requests
        assert len(requests_) == 2 * len(WIRE_MESSAGES)
        for ours, theirs in zip(requests_[::2], requests_[1::2], strict=True):
            assert (ours.method, ours.path, ours.body) == (theirs.method, theirs.path, theirs.body)
            assert {k.lower(): v for k, v in ours.headers.items()} == {
                k.lower(): v for k, v in theirs.headers.items()
            }
        provider.close()


def test_a_cookie_the_provider_sets_is_sent_back_as_requests_would():
    with FakeTwilio() as fake:
        provider = provider_of(fake)
        fake.script(TwilioReply(201, headers={"Set-Cookie": "lb=node-7; Path=/"}))
        assert provider.send(WIRE_MESSAGES[0]).outcome is Outcome.SENT
        assert "Cookie" not in fake.requests[0].headers
        assert provider.send(WIRE_MESSAGES[1]).outcome is Outcome.SENT
        assert fake.requests[1].headers["Cookie"] == "lb=node-7"
        assert fake.requests[1].form["Body"] == WIRE_MESSAGES[1].body
        provider.close()
