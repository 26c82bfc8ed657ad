"""The half every HTTP provider shares: one session, one POST per message, and what a failed
request or an error answer means. A provider file adds its settings, the request it builds, how
it reads the answer, and its webhooks; `send` itself is fixed here (a template method).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from abc import abstractmethod
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlencode, urlsplit

import requests
from urllib3.exceptions import NewConnectionError, ProtocolError

from txsms.core.errors import ConfigError
from txsms.core.providers.base import Outcome, OutgoingMessage, Provider, ProviderResult
from txsms.core.redact import redact_phone, scrub

if TYPE_CHECKING:
    from collections.abc import Collection

    from txsms.core.config import ProviderConfig


class HttpProvider(Provider):
    default_base_url: ClassVar[str]
    required: ClassVar[tuple[str, ...]]  # config attributes; `from_` is reported as `from`
    #: Config attributes never to appear in an error text: each, if at least `min_secret`
    #: characters long (shorter ones would match innocent text), becomes `secret_mark`.
    secret_fields: ClassVar[tuple[str, ...]] = ()
    secret_mark: ClassVar[str] = "[secret]"
    min_secret: ClassVar[int] = 8
    ok_statuses: ClassVar[Collection[int]] = range(200, 300)  # answers for `parse_sent`
    id_name: ClassVar[str] = "message id"  # what an accepted answer without one lacks

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        for key in self.required:
            if not getattr(config, key):
                raise ConfigError(f"required by {self.name}", key=f"provider.{key.rstrip('_')}")
        base = (config.base_url or self.default_base_url).rstrip("/")
        if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
            raise ConfigError(f"not an http(s) URL: {base!r}", key="provider.base_url")
        self.base_url = base
        self.timeout = (min(5.0, config.timeout_seconds), config.timeout_seconds)
        self.session = requests.Session()
        # The environment (proxies, CA bundle) is read once here, not on every request:
        # requests would re-read it per call, a measurable share of a send.
        self.session.proxies = requests.utils.get_environ_proxies(base)
        env_ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self.session.verify = env_ca or True
        self.session.trust_env = False
        self.session.headers.update({"User-Agent": "txsms/0.1", "Accept": "application/json"})
        self._templates: dict[str, requests.PreparedRequest] = {}  # see `_prepare`

    @abstractmethod
    def build_request(self, message: OutgoingMessage) -> tuple[str, dict[str, Any]]:
        """The URL to POST to and the body, as `{"data": form}` or `{"json": body}`."""

    @abstractmethod
    def parse_sent(
        self, resp: requests.Response, data: dict, message: OutgoingMessage
    ) -> ProviderResult | None:
        """The result of an answer in `ok_statuses` (`data`: its JSON object, else {}); None
        if it names no message to track, which is UNKNOWN: the message may exist."""

    def parse_error(
        self, resp: requests.Response, data: dict
    ) -> tuple[object, str | None, Outcome | None]:
        """An error answer's code, text and outcome. None means: the HTTP status, the status
        and the start of the body, and the outcome the HTTP status implies."""
        return None, None, None

    def send(self, message: OutgoingMessage) -> ProviderResult:
        url, body = self.build_request(message)
        try:
            request = self._prepare(url, body)
            resp = self.session.send(request, timeout=self.timeout, allow_redirects=False)
            return self._classify(resp, message)
        except Exception as exc:  # never raise: decide whether the request may have left
            outcome, text = _network_outcome(exc)
            text = self._clean(text, message)
            log = logging.getLogger(type(self).__module__)
            log.warning("%s send %s to %s: %s", self.name, outcome, redact_phone(message.to), text)
            return ProviderResult(outcome, error_text=text)

    def _prepare(self, url: str, body: dict[str, Any]) -> requests.PreparedRequest:
        """The request `session.post(url, **body)` sends, prepared for a fifth of the CPU.

        requests prepares everything anew for every call (the URL parsed and quoted, the
        session's headers and auth merged in, the form encoded by its general encoder): 112 µs
        for a Twilio send, against 21 µs here, where a whole message cost a worker 0.8 ms.
        What every message to `url` shares is prepared once, by requests itself; a form of
        text values is encoded directly (as requests encodes it: None values left out). Any
        other body (JSON, lists) goes through requests' own `prepare_body`, and once the
        provider has set a cookie, which requests would send back, everything does."""
        template = self._template(url)
        if template is None:
            return self.session.prepare_request(requests.Request("POST", url, **body))
        request = template.copy()
        form = body.get("data")
        if form and isinstance(form, dict) and all(_text_or_none(v) for v in form.values()):
            encoded = urlencode([(k, v) for k, v in form.items() if v is not None])
            request.body = encoded
            request.headers["Content-Length"] = str(len(encoded))  # quoted: ASCII only
            request.headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            request.prepare_body(form, None, body.get("json"))
        return request

    def _template(self, url: str) -> requests.PreparedRequest | None:
        """What every request to `url` shares, prepared once by requests; None once the
        provider has set a cookie, or for a URL beyond the first `MAX_TEMPLATES`."""
        if self.session.cookies:
            return None
        template = self._templates.get(url)
        if template is None and len(self._templates) < MAX_TEMPLATES:
            template = self._templates[url] = self.session.prepare_request(
                requests.Request("POST", url)
            )
        return template

    def _classify(self, resp: requests.Response, message: OutgoingMessage) -> ProviderResult:
        try:
            data = resp.json()
        except ValueError:
            data = None
        data = data if isinstance(data, dict) else {}
        if resp.status_code in self.ok_statuses:
            if result := self.parse_sent(resp, data, message):
                return result
            text = f"HTTP {resp.status_code} without a {self.id_name}: {resp.text[:200]}"
            return ProviderResult(Outcome.UNKNOWN, error_text=self._clean(text, message))
        code, text, outcome = self.parse_error(resp, data)
        code = str(code if code is not None else resp.status_code)
        text = self._clean(http_text(resp) if text is None else text, message)[:500]
        if outcome is None and resp.status_code in (429, 503):  # refused before any processing
            outcome = Outcome.RETRY
        elif outcome is None:
            # Other 5xx (a gateway timeout) can follow an accepted message, and without an
            # idempotency key a resend could deliver it twice.
            outcome = Outcome.UNKNOWN if resp.status_code >= 500 else Outcome.FAILED
        wait = _retry_after(resp.headers.get("Retry-After")) if outcome is Outcome.RETRY else None
        return ProviderResult(outcome, error_code=code, error_text=text, retry_after=wait)

    def _clean(self, text: str, message: OutgoingMessage | None = None) -> str:
        """Error texts may quote the number, with or without its +, and must carry no secret."""
        for field in self.secret_fields:
            secret = getattr(self.config, field)
            if secret and len(secret) >= self.min_secret:
                text = text.replace(secret, self.secret_mark)
        if message is not None and message.to:
            for form in (message.to, message.to.lstrip("+")):
                text = text.replace(form, redact_phone(message.to))
        return scrub(text)

    def close(self) -> None:
        self.session.close()


#: URLs whose shared part `HttpProvider._prepare` keeps (a provider posts to one or two).
MAX_TEMPLATES = 8


def _text_or_none(value: object) -> bool:
    return value is None or isinstance(value, str)


def http_text(resp: requests.Response) -> str:
    return f"HTTP {resp.status_code}: {resp.text[:200]}"


def positive_int(value: object) -> int | None:
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
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
    """RETRY only when the request provably never left; anything else may have reached it."""
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
