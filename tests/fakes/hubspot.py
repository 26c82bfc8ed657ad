"""A fake HubSpot CRM v3 search API over real HTTP.

    with FakeHubSpot(index_delay=0.0) as hub:
        deal = hub.upsert("deals", dealstage="closedwon", amount="120")   # returns the id
        hub.upsert("deals", deal, visible_after=2.0, dealstage="closedlost")  # seen 2 s later
        hub.script(Reply(429, headers={"Retry-After": "1"}))   # the next search
        POST {hub.url}/crm/v3/objects/deals/search  Authorization: Bearer <hub.token>

What it holds to, as HubSpot documents search (developers.hubspot.com, "CRM search"):
filterGroups (OR) of filters (AND) with EQ, NEQ, GT, GTE, LT, LTE, BETWEEN, IN, NOT_IN,
HAS_PROPERTY, NOT_HAS_PROPERTY, at most 5 groups, 6 filters a group and 18 in all; dates compare
as epoch milliseconds (strings); one sort at most (none: creation order); `limit` at most 200;
`after` paging with `paging.next.after`; no paging past 10,000 results (400); bodies up to
3,000 characters; a private-app bearer token (401 otherwise); property values as strings;
updates reach search only after the index catches up (`visible_after`, default `index_delay`).
Contacts keep their last modification in `lastmodifieddate`, other objects in
`hs_lastmodifieddate`. Also: v4 batch association reads and v3 batch object reads.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
from datetime import datetime
from typing import Any

from fakes.jsonapi import JsonServer, Reply, Request, Versioned, iso_ms

TOKEN = "pat-na1-" + "0123abcd-" * 3 + "fake"
MAX_RESULTS = 10_000
DATES = {"createdate", "lastmodifieddate", "hs_lastmodifieddate"}


def modified_property(object_type: str) -> str:
    return "lastmodifieddate" if object_type == "contacts" else "hs_lastmodifieddate"


def _error(status: int, category: str, message: str) -> tuple[int, dict, dict]:
    body = {
        "status": "error",
        "message": message,
        "correlationId": secrets.token_hex(8),
        "category": category,
    }
    return status, body, {}


class FakeHubSpot(JsonServer):
    def __init__(
        self, token: str = TOKEN, *, index_delay: float = 0.0, max_results: int = MAX_RESULTS
    ):
        super().__init__()
        self.token = token
        self.index_delay = index_delay
        self.max_results = max_results  # HubSpot's 10,000; smaller makes tests quicker
        self.objects: dict[str, Versioned] = {}
        self.links: dict[tuple[str, str], dict[str, list[str]]] = {}  # (from, to) -> id -> ids
        self._ids = itertools.count(1001)

    # -- data --------------------------------------------------------------------------------

    def upsert(
        self,
        object_type: str,
        record_id: str | None = None,
        *,
        modified: float | None = None,
        visible_after: float | None = None,
        **properties: Any,
    ) -> str:
        """Create (no id) or update a record; properties merge over its last version."""
        with self.lock:
            store = self.objects.setdefault(object_type, Versioned())
            rid = record_id or str(next(self._ids))
            last = store.latest(rid)
            now = modified if modified is not None else time.time()
            props = dict(last["properties"]) if last else {"createdate": iso_ms(now)}
            props.update({k: None if v is None else str(v) for k, v in properties.items()})
            props.update(hs_object_id=rid, **{modified_property(object_type): iso_ms(now)})
            version = {
                "id": rid,
                "properties": props,
                "createdAt": props["createdate"],
                "updatedAt": iso_ms(now),
                "archived": False,
            }
            delay = self.index_delay if visible_after is None else visible_after
            store.add(rid, version, delay)
            return rid

    def associate(self, from_type: str, from_id: str, to_type: str, to_id: str) -> None:
        with self.lock:
            self.links.setdefault((from_type, to_type), {}).setdefault(from_id, []).append(to_id)

    @property
    def searches(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/search")]

    # -- HTTP --------------------------------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        if req.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports OAuth 2.0 "
                "authentication and you can find more details at https://developers.hubspot.com",
            )
        if (reply := self.scripted()) is not None:
            if reply.body is None and reply.status == 429:
                body = {
                    "status": "error",
                    "message": "You have reached your secondly limit.",
                    "errorType": "RATE_LIMIT",
                    "correlationId": secrets.token_hex(8),
                    "policyName": "SECONDLY",
                }
                return 429, body, reply.headers
            return reply.status, reply.body or {}, reply.headers
        parts = req.path.strip("/").split("/")
        if req.method != "POST":
            return _error(405, "METHOD_NOT_ALLOWED", "Method not allowed")
        if parts[:3] == ["crm", "v3", "objects"] and len(parts) == 5 and parts[4] == "search":
            return self._search(parts[3], req)
        if parts[:3] == ["crm", "v3", "objects"] and parts[4:] == ["batch", "read"]:
            return self._batch_read(parts[3], req.json or {})
        if parts[:3] == ["crm", "v4", "associations"] and parts[5:] == ["batch", "read"]:
            return self._associations(parts[3], parts[4], req.json or {})
        return _error(404, "OBJECT_NOT_FOUND", f"Unable to infer object type from: {req.path}")

    def _search(self, object_type: str, req: Request) -> tuple[int, Any, dict[str, str]]:
        if len(req.body) > 3000:
            return _error(400, "VALIDATION_ERROR", "Request body exceeds 3000 characters")
        body = req.json or {}
        groups = body.get("filterGroups") or []
        count = sum(len(g.get("filters") or []) for g in groups)
        if len(groups) > 5 or count > 18 or any(len(g.get("filters") or []) > 6 for g in groups):
            return _error(400, "VALIDATION_ERROR", "Too many filters or filter groups")
        sorts = body.get("sorts") or []
        if len(sorts) > 1:
            return _error(400, "VALIDATION_ERROR", "Only one sort is supported")
        limit = int(body.get("limit", 10))
        if not 0 < limit <= 200:
            return _error(400, "VALIDATION_ERROR", f"limit must be between 1 and 200: {limit}")
        after = int(body.get("after") or 0)
        if after + limit > self.max_results:
            problem = f"Paging beyond {self.max_results:,} results is not supported"
            return _error(400, "VALIDATION_ERROR", problem)
        with self.lock:
            store = self.objects.get(object_type) or Versioned()
            records = store.visible()
        found = [r for r in records if not groups or any(_group(r, g) for g in groups)]
        if sorts:
            name = sorts[0].get("propertyName") if isinstance(sorts[0], dict) else sorts[0]
            backwards = isinstance(sorts[0], dict) and sorts[0].get("direction") == "DESCENDING"
            found.sort(key=lambda r: _sort_key(r["properties"].get(name), name), reverse=backwards)
        else:
            found.sort(key=lambda r: int(r["id"]))  # creation order
        wanted = set(body.get("properties") or []) | {
            "hs_object_id",
            "createdate",
            modified_property(object_type),
        }
        page = [_shown(r, wanted) for r in found[after : after + limit]]
        answer: dict[str, Any] = {"total": len(found), "results": page}
        if after + limit < len(found):
            nxt = str(after + limit)
            answer["paging"] = {"next": {"after": nxt, "link": f"?after={nxt}"}}
        return 200, answer, {}

    def _batch_read(self, object_type: str, body: dict) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            store = self.objects.get(object_type) or Versioned()
            latest = [store.latest(str(i.get("id"))) for i in body.get("inputs") or []]
        wanted = set(body.get("properties") or []) | {"hs_object_id"}
        results = [_shown(r, wanted) for r in latest if r]
        return 200, {"status": "COMPLETE", "results": results}, {}

    def _associations(self, from_type: str, to_type: str, body: dict) -> tuple[int, Any, dict]:
        with self.lock:
            links = self.links.get((from_type, to_type), {})
            results = [
                {
                    "from": {"id": str(i["id"])},
                    "to": [
                        {
                            "toObjectId": int(t),
                            "associationTypes": [
                                {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}
                            ],
                        }
                        for t in links.get(str(i["id"]), [])
                    ],
                }
                for i in body.get("inputs") or []
                if links.get(str(i["id"]))
            ]
        return 200, {"status": "COMPLETE", "results": results}, {}


def _shown(record: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    props = record["properties"]
    return {**record, "properties": {k: props.get(k) for k in sorted(wanted)}}


@functools.lru_cache(maxsize=100_000)  # tests search 10,000 records many times over
def _value(raw: Any, name: str) -> Any:
    """What a property compares as: dates as epoch ms, numbers as numbers, else text."""
    if raw is None:
        return None
    text = str(raw)
    if name in DATES and not text.lstrip("-").isdigit():
        return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    try:
        return float(text)
    except ValueError:
        return text.lower()


def _sort_key(raw: Any, name: str) -> tuple[int, Any]:
    value = _value(raw, name)
    return (
        (0, "") if value is None else (1, value) if isinstance(value, float | int) else (2, value)
    )


def _group(record: dict[str, Any], group: dict[str, Any]) -> bool:
    return all(_matches(record["properties"], f) for f in group.get("filters") or [])


def _matches(props: dict[str, Any], flt: dict[str, Any]) -> bool:
    name, op = flt.get("propertyName"), flt.get("operator", "EQ")
    have = _value(props.get(name), name)
    if op == "HAS_PROPERTY":
        return have not in (None, "")
    if op == "NOT_HAS_PROPERTY":
        return have in (None, "")
    if have is None:
        return op in ("NEQ", "NOT_IN")
    if op in ("IN", "NOT_IN"):
        inside = have in [_value(v, name) for v in flt.get("values") or []]
        return inside == (op == "IN")
    value = _value(flt.get("value"), name)
    if type(have) is not type(value) and not (
        isinstance(have, float | int) and isinstance(value, float | int)
    ):
        have, value = str(have), str(value)
    if op == "BETWEEN":
        high = _value(flt.get("highValue"), name)
        return value <= have <= high
    return {
        "EQ": have == value,
        "NEQ": have != value,
        "GT": have > value,
        "GTE": have >= value,
        "LT": have < value,
        "LTE": have <= value,
    }.get(op, False)


__all__ = ["TOKEN", "FakeHubSpot", "Reply", "modified_property"]
