"""A reusable security battery for signed webhook receivers.

A connector's test module subclasses `WebhookBattery`, fills in the hooks, and provides two
fixtures: `client` (a Flask test client on a fresh database) and `runtime` (its Runtime).
Every test checks that bad input gets a clear answer and *changes nothing*.
"""

from __future__ import annotations

from sqlalchemy import func, select

from txsms.core.storage import deliveries, events, messages


def stored(runtime) -> tuple[int, int, int]:
    with runtime.engine.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (events, messages, deliveries)
        )


class WebhookBattery:
    path: str = ""  # e.g. "/webhooks/shopify"
    signature_headers: tuple[str, ...] = ()  # every header that carries the signature
    content_type: str = "application/json"

    # -- hooks ----------------------------------------------------------------------------
    def valid_body(self, n: int = 0) -> bytes:
        """A delivery body that produces at least one message; `n` makes it distinct."""
        raise NotImplementedError

    def headers(self, body: bytes, *, secret: str | None = None) -> dict[str, str]:
        """Headers of a correctly signed delivery (with the current secret by default)."""
        raise NotImplementedError

    old_secret: str = ""  # a rotated-out secret that is still configured
    unknown_secret: str = "not-the-secret-at-all"

    def unknown_account_headers(self, body: bytes) -> dict[str, str]:
        """Correctly formed headers naming a shop/store that is not configured."""
        raise NotImplementedError

    max_body_bytes: int = 4096  # the test config's server.max_body_bytes

    # -- the battery ------------------------------------------------------------------------
    def post(self, client, body: bytes, headers: dict[str, str], content_type=None):
        return client.post(
            self.path, data=body, headers=headers, content_type=content_type or self.content_type
        )

    def test_valid_delivery_is_accepted(self, client, runtime):
        body = self.valid_body()
        response = self.post(client, body, self.headers(body))
        assert response.status_code == 200, response.get_data(as_text=True)
        assert stored(runtime)[1] >= 1

    def test_missing_signature_is_401_and_changes_nothing(self, client, runtime):
        body = self.valid_body()
        headers = {
            k: v
            for k, v in self.headers(body).items()
            if k.lower() not in {h.lower() for h in self.signature_headers}
        }
        response = self.post(client, body, headers)
        assert response.status_code == 401 and response.is_json
        assert stored(runtime) == (0, 0, 0)

    def test_bad_signature_is_401_and_changes_nothing(self, client, runtime):
        body = self.valid_body()
        response = self.post(client, body, self.headers(body, secret=self.unknown_secret))
        assert response.status_code == 401
        assert stored(runtime) == (0, 0, 0)

    def test_signature_over_other_bytes_is_401(self, client, runtime):
        body = self.valid_body()
        headers = self.headers(body)
        tampered = body.replace(b"}", b" }", 1)  # same JSON meaning, other bytes
        assert self.post(client, tampered, headers).status_code == 401
        assert stored(runtime) == (0, 0, 0)

    def test_rotated_secret_still_verifies(self, client, runtime):
        body = self.valid_body()
        response = self.post(client, body, self.headers(body, secret=self.old_secret))
        assert response.status_code == 200
        assert stored(runtime)[1] >= 1

    def test_unknown_account_is_401_and_changes_nothing(self, client, runtime):
        body = self.valid_body()
        response = self.post(client, body, self.unknown_account_headers(body))
        assert response.status_code == 401
        assert stored(runtime) == (0, 0, 0)

    def test_replayed_delivery_sends_nothing_new(self, client, runtime):
        body = self.valid_body()
        headers = self.headers(body)
        assert self.post(client, body, headers).status_code == 200
        after_first = stored(runtime)
        assert self.post(client, body, headers).status_code == 200
        assert stored(runtime)[:2] == after_first[:2]

    def test_oversized_body_is_413_and_changes_nothing(self, client, runtime):
        body = b'{"padding": "' + b"x" * (self.max_body_bytes + 10) + b'"}'
        response = self.post(client, body, self.headers(body))
        assert response.status_code == 413
        assert stored(runtime) == (0, 0, 0)

    def test_malformed_body_with_valid_signature_is_400(self, client, runtime):
        for body in (b"{not json", b"[]", b'"text"'):
            response = self.post(client, body, self.headers(body))
            assert response.status_code == 400, body
            assert response.is_json
        assert stored(runtime)[:2] == (0, 0)

    def test_wrong_content_type_is_refused_and_changes_nothing(self, client, runtime):
        body = self.valid_body()
        response = self.post(client, body, self.headers(body), content_type="text/plain")
        assert 400 <= response.status_code < 500
        assert stored(runtime)[:2] == (0, 0)
