"""Twilio Programmable Messaging: one form POST per message, the answer classified into an Outcome.

Credentials: Twilio Console (console.twilio.com) -> Account Info shows the Account SID (`AC...`)
and Auth Token; a sender is a number you own (`from`, E.164) or a Messaging Service
(`messaging_service_sid`, `MG...`, under Messaging -> Services). Twilio has no idempotency key
for Messages create, so anything that may have reached it is UNKNOWN, never blindly resent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import ssl
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape as xml_escape

import requests
from urllib3.exceptions import NewConnectionError, ProtocolError

from txsms.core.errors import ConfigError, TxsmsError
from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    LookupUnavailable,
    Outcome,
    OutgoingMessage,
    Provider,
    ProviderResult,
    StatusReport,
)
from txsms.core.redact import redact_phone, scrub

if TYPE_CHECKING:
    from txsms.core.config import ProviderConfig

log = logging.getLogger(__name__)

OPTED_OUT_CODES = frozenset({21610})
INVALID_NUMBER_CODES = frozenset({21211, 21614, 30005, 30006, 21217, 21401, 21407})
RETRY_CODES = frozenset({20429, 30001, 30003, 30008})


class TwilioLookupError(LookupUnavailable, TxsmsError):
    """`find_sent` could not ask Twilio; the caller must not conclude "never sent"."""


class TwilioProvider(Provider):
    name = "twilio"

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        for key in ("account_sid", "auth_token"):
            if not getattr(config, key):
                raise ConfigError("required for the twilio provider", key=f"provider.{key}")
        if not (config.from_ or config.messaging_service_sid):
            raise ConfigError("set `from` or `messaging_service_sid`", key="provider.from")
        base = (config.base_url or "https://api.twilio.com").rstrip("/")
        if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
            raise ConfigError(f"not an http(s) URL: {base!r}", key="provider.base_url")
        self.messages_url = f"{base}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        self.base_url = base
        self.timeout = (min(5.0, config.timeout_seconds), config.timeout_seconds)
        self.session = requests.Session()
        # Proxy settings from the environment are read once here, not on every request
        # (requests would re-read them per call: a measurable share of a send).
        self.session.proxies = requests.utils.get_environ_proxies(base)
        self.session.trust_env = False
        self.session.auth = (config.account_sid, config.auth_token)
        self.session.headers.update({"User-Agent": "txsms/0.1", "Accept": "application/json"})

    def send(self, message: OutgoingMessage) -> ProviderResult:
        form = {"To": message.to, "Body": message.body}
        if self.config.from_:
            form["From"] = self.config.from_
        else:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        if callback := self.status_callback_url():
            form["StatusCallback"] = callback
        try:
            resp = self.session.post(
                self.messages_url, data=form, timeout=self.timeout, allow_redirects=False
            )
            return self._classify(resp, message)
        except Exception as exc:  # never raise: decide whether the request may have left
            outcome, text = _network_outcome(exc)
            text = self._clean(text, message)
            log.warning("twilio send %s to %s: %s", outcome, redact_phone(message.to), text)
            return ProviderResult(outcome, error_text=text)

    def _classify(self, resp: requests.Response, message: OutgoingMessage) -> ProviderResult:
        try:
            data = resp.json()
        except ValueError:
            data = None
        data = data if isinstance(data, dict) else None
        if 200 <= resp.status_code < 300:
            if data and data.get("sid"):
                return ProviderResult(
                    Outcome.SENT,
                    provider_message_id=str(data["sid"]),
                    provider_status=data.get("status"),
                    segments=_positive_int(data.get("num_segments")),  # "0" via a service
                )
            # Accepted, but no sid to track it by: it may exist at Twilio.
            text = f"HTTP {resp.status_code} without a message sid: {resp.text[:200]}"
            return ProviderResult(Outcome.UNKNOWN, error_text=self._clean(text, message))
        code = data.get("code") if data else None
        code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
        if data and data.get("message"):
            text = str(data["message"])
        else:
            text = f"HTTP {resp.status_code}: {resp.text[:200]}"
        result = dict(
            error_code=str(code if code is not None else resp.status_code),
            error_text=self._clean(text, message)[:500],
        )
        if code in OPTED_OUT_CODES:
            return ProviderResult(Outcome.OPTED_OUT, **result)
        if code in INVALID_NUMBER_CODES:
            return ProviderResult(Outcome.INVALID_NUMBER, **result)
        if resp.status_code in (429, 503) or code in RETRY_CODES:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            return ProviderResult(Outcome.RETRY, retry_after=retry_after, **result)
        if resp.status_code >= 500:
            # Twilio has no idempotency key, and a 500 or a gateway timeout can follow a
            # message that was created: ask Twilio later (lookup) instead of resending.
            return ProviderResult(Outcome.UNKNOWN, **result)
        return ProviderResult(Outcome.FAILED, **result)

    def _clean(self, text: str, message: OutgoingMessage | None = None) -> str:
        """Error texts may quote the number (21211 does) and must never carry the token."""
        if len(self.config.auth_token) >= 8:
            text = text.replace(self.config.auth_token, "[token]")
        if message is not None and message.to:
            text = text.replace(message.to, redact_phone(message.to))
        return scrub(text)

    def find_sent(self, to: str, since: float) -> list[dict]:
        """Messages to `to` sent on or after the UTC day of `since` (newest first, all pages).

        Twilio filters by `date_sent`, which is null while a message is still queued: settle an
        `unknown` message only after a grace period. Raises TwilioLookupError if it cannot ask.
        """
        day = datetime.fromtimestamp(since, UTC).date().isoformat()
        url, params = self.messages_url, {"To": to, "DateSent>": day}
        found: list[dict] = []
        for _ in range(20):  # at most 20 pages: far more than one number ever gets in a day
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout)
                resp.raise_for_status()
                page = resp.json()
                messages, next_uri = list(page.get("messages") or []), page.get("next_page_uri")
            except Exception as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                what = f"HTTP {status}" if status else type(exc).__name__
                raise TwilioLookupError(f"listing messages to {redact_phone(to)}: {what}") from None
            found.extend(messages)
            if not next_uri:
                break
            url, params = self.base_url + next_uri, None
        return found

    def close(self) -> None:
        self.session.close()

    # -- the return path ------------------------------------------------------------------

    invalid_number_codes = frozenset({"30005", "30006", "21614"})
    can_lookup = True

    def verify_callback(self, request: CallbackRequest) -> bool:
        """X-Twilio-Signature, as twilio's request_validator computes it (see providers.md)."""
        given = request.headers.get("X-Twilio-Signature", "")
        if not given:
            return False
        parts = urlsplit(request.url)
        params: dict[str, list[str]] = {}
        if "bodySHA256" in dict(parse_qsl(parts.query)):
            # JSON bodies: the URL carries the body's hash and is signed alone.
            expected = hashlib.sha256(request.body).hexdigest()
            if not hmac.compare_digest(expected, dict(parse_qsl(parts.query))["bodySHA256"]):
                return False
        else:
            params = {k: list(v) for k, v in request.form.items()}
        # Twilio is inconsistent about ports: accept the URL without its port and with the
        # scheme's default port.
        default = {"https": 443, "http": 80}.get(parts.scheme, 443)
        bare = parts._replace(netloc=parts.hostname or "")
        ported = parts._replace(netloc=f"{parts.hostname}:{default}")
        return any(
            hmac.compare_digest(twilio_signature(self.config.auth_token, u.geturl(), params), given)
            for u in (bare, ported)
        )

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        p = request.params()
        return InboundMessage(
            sender=p.get("From", ""),
            text=p.get("Body", ""),
            recipient=p.get("To"),
            provider_message_id=p.get("MessageSid") or p.get("SmsSid"),
            handled_keyword=(p.get("OptOutType") or "").upper() or None,
        )

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        p = request.params()
        sid = p.get("MessageSid") or p.get("SmsSid")
        if not sid:
            return []
        status = _STATUS.get((p.get("MessageStatus") or p.get("SmsStatus") or "").lower(), "queued")
        code = p.get("ErrorCode") or None
        return [StatusReport(sid, status, code, f"Twilio error {code}" if code else None)]

    def inbound_response(self, reply: str | None) -> tuple[bytes, str]:
        inner = f"<Message>{xml_escape(reply)}</Message>" if reply else ""
        body = f'<?xml version="1.0" encoding="UTF-8"?><Response>{inner}</Response>'
        return body.encode(), "application/xml"

    def lookup(self, to: str, body: str, since: float) -> ProviderResult | None:
        for found in self.find_sent(to, since):
            if found.get("body") != body:
                continue
            created = _rfc2822(found.get("date_created"))
            if created is not None and created < since - 120:  # an earlier, separate message
                continue
            status = _STATUS.get(str(found.get("status", "")).lower(), "queued")
            outcome = Outcome.FAILED if status in ("failed", "undelivered") else Outcome.SENT
            return ProviderResult(
                outcome,
                provider_message_id=found.get("sid"),
                provider_status=found.get("status"),
                error_code=str(found["error_code"]) if found.get("error_code") else None,
                segments=_positive_int(found.get("num_segments")),
            )
        return None


# Twilio's statuses, in ours. "accepted", "scheduled", "sending" are all still on the way.
_STATUS = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "canceled": "failed",
}


def twilio_signature(auth_token: str, url: str, params: dict[str, list[str]]) -> str:
    """base64(HMAC-SHA1(token, url + sorted name+value pairs)); values sorted, de-duplicated."""
    data = url + "".join(
        name + value for name in sorted(params) for value in sorted(set(params[name]))
    )
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _rfc2822(value: object) -> float | None:
    try:
        return parsedate_to_datetime(str(value)).timestamp() if value else None
    except (TypeError, ValueError):
        return None


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and all it wraps, outermost first: requests -> MaxRetryError.reason -> OS."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < 20:
        e = todo.pop(0)
        if any(e is f for f in found):
            continue
        found.append(e)
        more = [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
        todo.extend(m for m in more if isinstance(m, BaseException))
    return found


def _network_outcome(exc: Exception) -> tuple[Outcome, str]:
    """RETRY only when the request provably never left; anything else may have reached Twilio."""
    causes = _causes(exc)
    # Name what happened by the innermost standard-library error (type only: urllib3's messages
    # carry URLs), e.g. "(RemoteDisconnected)", "(ConnectionRefusedError)".
    std = [type(e).__name__ for e in causes if type(e).__module__ in ("builtins", "http.client")]
    detail = f" ({std[-1] if std else type(exc).__name__})"
    if isinstance(exc, requests.ReadTimeout):
        return Outcome.UNKNOWN, "read timeout after the request was sent" + detail
    if any(isinstance(e, ProtocolError) for e in causes):
        return Outcome.UNKNOWN, "connection dropped after the request was sent" + detail
    if isinstance(exc, requests.ConnectTimeout):
        return Outcome.RETRY, "connect timeout, nothing sent" + detail
    if isinstance(exc, requests.ConnectionError):
        if any(isinstance(e, NewConnectionError) for e in causes):  # refused, DNS, unreachable
            return Outcome.RETRY, "could not connect, nothing sent" + detail
        if any(isinstance(e, ssl.SSLCertVerificationError) for e in causes):
            return Outcome.RETRY, "TLS certificate verification failed, nothing sent" + detail
        return Outcome.UNKNOWN, "connection error after connecting" + detail
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return Outcome.UNKNOWN, "response cut off" + detail
    return Outcome.UNKNOWN, "unexpected error while sending" + detail


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _positive_int(value: object) -> int | None:
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return None
