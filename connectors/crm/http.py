"""Any JSON API as a poll source (`kind = "http"`).

    GET {url}?{params}&{cursor_param}={cursor - overlap}     (iso | epoch | epoch_ms)

The records are at `items_path` in the body ("" when the body is the list); each has its id at
`id_path` and its last modification at `modified_path` (ISO 8601, epoch seconds or
milliseconds). The next page is the `Link: <…>; rel="next"` header, or the value at `next_path`
in the body: a URL, or a token sent back as `next_param`. Auth: bearer, basic or any header.
Without `sorted = true` the records may come in any order, so the cursor moves only once every
page was read (the seen-set keeps a crash's re-read cheap).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urljoin

from .mapping import Record, epoch, get
from .poller import Client, CrmError

log = logging.getLogger(__name__)

MAX_PAGES = 100_000  # a next link that never ends is a bug at the other end


def auth_of(entry: dict[str, Any]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """(headers, basic auth) from the `auth` table."""
    auth = entry.get("auth") or {}
    kind = auth.get("type")
    if kind == "bearer":
        return {"Authorization": f"Bearer {auth['token']}"}, None
    if kind == "header":
        return {auth["name"]: auth["value"]}, None
    if kind == "basic":
        return {}, (auth["username"], auth["password"])
    return {}, None


class HttpSource:
    def __init__(self, entry: dict[str, Any], client: Client | None):
        self.client = client
        self.url = entry["url"]
        self.record_name = entry.get("record", "record")
        self.sorted = entry.get("sorted", False)
        self.params = dict(entry.get("params", {}))
        self.items_path = entry.get("items_path", "")
        self.id_path = entry.get("id_path", "id")
        self.modified_path = entry.get("modified_path", "updated_at")
        self.cursor_param = entry.get("cursor_param")
        self.cursor_format = entry.get("cursor_format", "iso")
        self.next_path = entry.get("next_path")
        self.next_param = entry.get("next_param")
        self.headers, self.auth = auth_of(entry)

    def _cursor(self, ms: int) -> str:
        if self.cursor_format == "epoch_ms":
            return str(ms)
        if self.cursor_format == "epoch":
            return str(ms // 1000)  # whole seconds, rounded down: inclusive stays inclusive
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")

    def pages(self, since_ms: int) -> Iterator[list[Record]]:
        url: str | None = self.url
        params = dict(self.params)
        if self.cursor_param:
            params[self.cursor_param] = self._cursor(since_ms)
        seen_urls: set[str] = set()
        for _ in range(MAX_PAGES):
            resp = self.client.request(
                "GET", url, params=params, headers=self.headers, auth=self.auth
            )
            if resp.url in seen_urls:
                raise CrmError(f"{self.url}: the next page repeats {resp.url}")
            seen_urls.add(resp.url)
            try:
                body = resp.json()
            except ValueError:
                raise CrmError(f"{self.url}: the answer is not JSON") from None
            items = get(body, self.items_path) if self.items_path else body
            if not isinstance(items, list):
                raise CrmError(f"{self.url}: no list at items_path '{self.items_path}'")
            yield [r for r in map(self.read, items) if r]
            url, params = self._next(resp, body, url, params)
            if url is None:
                return
        raise CrmError(f"{self.url}: more than {MAX_PAGES} pages")

    def _next(self, resp, body, url: str, params: dict) -> tuple[str | None, dict]:
        if self.next_path:
            value = get(body, self.next_path)
            if value in (None, ""):
                return None, params
            if self.next_param:  # a token: same request, one more parameter
                return url, {**params, self.next_param: str(value)}
            return urljoin(resp.url, str(value)), {}  # a URL: it carries its own query
        link = resp.links.get("next", {}).get("url")
        return (urljoin(resp.url, link), {}) if link else (None, params)

    def read(self, item: Any) -> Record | None:
        rid, when = get(item, self.id_path), epoch(get(item, self.modified_path))
        if rid in (None, "") or when is None:
            log.warning(
                "%s: an item without %s or %s skipped", self.url, self.id_path, self.modified_path
            )
            return None
        return Record(str(rid), round(when * 1000), item)

    def enrich(self, records: list[Record]) -> list[Record]:
        return records
