"""Vonage (Nexmo) legacy SMS API: one form POST per message, the answer classified into an Outcome.

Credentials: the Vonage API Dashboard (dashboard.nexmo.com) shows the API key and secret on its
front page; its settings hold the signature secret and method of signed webhooks (turn them on:
unsigned callbacks are refused). `from` is a Vonage number you rent or, where the destination
allows one, an alphanumeric sender ID. Errors come back as HTTP 200 with a non-zero `status`
per message part. There is no idempotency key: what may have reached Vonage is UNKNOWN.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    Outcome,
    OutgoingMessage,
    ProviderResult,
    StatusReport,
)
from txsms.core.providers.http import HttpProvider, http_text, positive_int

if TYPE_CHECKING:
    import requests

    from txsms.core.config import ProviderConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({"1", "5", "10"})  # throttled, internal error, too many binds
# "Partner quota violation": the message is fine, the account needs a top-up. Retried every
# 15 minutes until worker.max_attempts (about two hours by default), then failed.
NO_CREDIT, TOP_UP_WAIT = "9", 900.0
INVALID_NUMBER_STATUSES = frozenset({"33"})  # "number de-activated"
MAX_SKEW = 300  # signed webhooks more than 5 minutes from now are refused: replays
DIGESTS = {name: getattr(hashlib, name) for name in ("md5", "sha1", "sha256", "sha512")}


class VonageProvider(HttpProvider):
    name = "vonage"
    default_base_url = "https://rest.nexmo.com"
    required = ("api_key", "api_secret", "from_")
    secret_fields, min_secret = ("api_secret", "signature_secret"), 6
    ok_statuses = (200,)  # Vonage's own errors come as 200: any other status is a gateway's

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        self.sms_url = f"{self.base_url}/sms/json"
        self.callback = self.status_callback_url()
        if self.callback and len(self.callback) > 100:  # Vonage would refuse it (status 23)
            log.warning("vonage: status URL over 100 characters, the dashboard's DLR URL applies")
            self.callback = None

    def build_request(self, message: OutgoingMessage) -> tuple[str, dict]:
        form = {
            "api_key": self.config.api_key,
            "api_secret": self.config.api_secret,
            "from": self.config.from_.lstrip("+"),  # Vonage wants numbers without the +
            "to": message.to.lstrip("+"),
            "text": message.body,
            "client-ref": message.id[:40],  # our id in Vonage's records, for an operator
        }
        if message.encoding == "UCS-2":
            form["type"] = "unicode"  # Vonage does not detect it: the text would arrive mangled
        if self.callback:
            form["callback"] = self.callback
        return self.sms_url, {"data": form}

    def parse_sent(self, resp: requests.Response, data: dict, message: OutgoingMessage):
        try:
            parts = [dict(part) for part in data["messages"]]
        except (ValueError, KeyError, TypeError):
            parts = []
        # A long text is one entry per part, each with its own id and its own receipt: the
        # first part's id stands for the message.
        sent = [p for p in parts if str(p.get("status")) == "0"]
        first_id = str(sent[0].get("message-id") or "") if sent else ""
        failed = next((p for p in parts if str(p.get("status")) != "0"), None)
        if failed is None:
            if not first_id:  # accepted, but nothing to track it by: it may exist
                return ProviderResult(
                    Outcome.UNKNOWN, error_text=self._clean(http_text(resp), message)
                )
            segments = positive_int(str(data.get("message-count"))) or len(parts)
            return ProviderResult(Outcome.SENT, provider_message_id=first_id, segments=segments)
        code = str(failed.get("status"))
        text = self._clean(str(failed.get("error-text") or f"status {code}"), message)[:400]
        if sent:  # some parts are on their way: a retry would send them twice
            text = f"{len(sent)} of {len(parts)} parts sent, then: {text}"
            return ProviderResult(Outcome.FAILED, first_id, error_code=code, error_text=text)
        if code == NO_CREDIT:
            log.error("vonage account is out of credit (status 9): top it up; sends will retry")
            return ProviderResult(
                Outcome.RETRY, error_code=code, error_text=text, retry_after=TOP_UP_WAIT
            )
        outcome = Outcome.FAILED
        if code in RETRY_STATUSES:
            outcome = Outcome.RETRY
        elif code in INVALID_NUMBER_STATUSES:
            outcome = Outcome.INVALID_NUMBER
        return ProviderResult(outcome, error_code=code, error_text=text)

    # -- the return path: signed webhooks, as a GET query, a POST form or a POST JSON body --

    invalid_number_codes = frozenset()  # DLR err-codes are not in our reference: none trusted

    def verify_callback(self, request: CallbackRequest) -> bool:
        if not (secret := self.config.signature_secret):
            log.warning("vonage callback refused: set provider.signature_secret (signed webhooks)")
            return False
        try:
            params = _params(request)
        except ValueError:
            return False
        given = params.pop("sig", "").lower()  # Vonage sends it upper-case
        if not given or not _fresh(params.get("timestamp")):
            return False
        expected = vonage_signature(params, secret, self.config.signature_method)
        return hmac.compare_digest(expected, given)

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        p = _params(request)
        # msisdn is international without the +: as it stands it would read as a national number.
        sender = "+" + p["msisdn"] if p["msisdn"].isdigit() else p["msisdn"]
        return InboundMessage(sender, p.get("text", ""), p.get("to"), p.get("messageId"))

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        p = _params(request)
        if not p.get("messageId"):
            return []
        status = _STATUS.get(p.get("status", "").lower(), "queued")
        code = p.get("err-code") if p.get("err-code", "0") not in ("", "0") else None
        text = f"Vonage DLR error {code}" if code else None
        return [StatusReport(p["messageId"], status, code, text)]


_STATUS = {
    "accepted": "queued",
    "buffered": "queued",
    "unknown": "queued",
    "delivered": "delivered",
    "expired": "undelivered",
    "failed": "failed",
    "rejected": "failed",
}


def vonage_signature(params: Mapping[str, str], secret: str, method: str = "sha256") -> str:
    """Hex `sig` as vonage-http-client's `Auth.sign_params` computes it: `&key=value` for every
    parameter but `sig`, sorted by key, with `&` and `=` inside values replaced by `_`."""
    data = "".join(
        f"&{k}={str(v).replace('&', '_').replace('=', '_')}"
        for k, v in sorted(params.items())
        if k != "sig"
    )
    if method == "md5hash":  # the legacy scheme: md5 of the string followed by the secret
        return hashlib.md5((data + secret).encode()).hexdigest()
    return hmac.new(secret.encode(), data.encode(), DIGESTS[method]).hexdigest()


def _params(request: CallbackRequest) -> dict[str, str]:
    """The parameters Vonage signed: the JSON body, the POST form, or the GET query."""
    if request.headers.get("Content-Type", "").startswith("application/json"):
        data = json.loads(request.body or b"{}")
        if not isinstance(data, dict):
            raise ValueError("JSON body is not an object")
        return {k: str(v) for k, v in data.items()}
    fields = request.form if request.method == "POST" else request.query
    return {k: v[-1] for k, v in fields.items() if v}


def _fresh(timestamp: str | None) -> bool:
    try:
        return abs(time.time() - float(timestamp or "")) <= MAX_SKEW
    except ValueError:
        return False
