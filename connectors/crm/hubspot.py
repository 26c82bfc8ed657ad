"""HubSpot CRM v3 search as a poll source (`kind = "hubspot"`).

`POST /crm/v3/objects/{object}/search` filtered on the object's last-modified property
(`lastmodifieddate` for contacts, `hs_lastmodifieddate` for deals and the others, custom objects
included) >= the cursor, as epoch milliseconds; sorted ascending on it (search allows one sort);
200 per page.

Paging: after each page the query starts again from the last modification seen (keyset
paging), instead of following `paging.next.after` deep into one result set. `after` is an
offset into a live index: when a record already passed is updated mid-walk it moves to the end,
everything behind it shifts one place forward, and the record at the page boundary is never
returned — and search refuses to page past 10,000 results anyway. Restarting every page never
gets near that cap and cannot skip: a record can only move to a later modification. The records
at the boundary millisecond come again and the seen-set drops them. A page that is entirely one
millisecond (a bulk import) is walked by `hs_object_id` before moving past it.

`associations = { contacts = ["phone", "firstname"] }` adds each record's associated records
(a deal's contacts have the phone number) as `associations.contacts.0.properties.phone`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .mapping import Mapper, Record, epoch, rules_of
from .poller import Client

API = "https://api.hubapi.com"
BATCH = 100  # inputs per batch read
#: object type -> (its last-modified property, what one record is called in event keys)
OBJECTS = {
    "contacts": ("lastmodifieddate", "contact"),
    "companies": ("hs_lastmodifieddate", "company"),
    "deals": ("hs_lastmodifieddate", "deal"),
    "tickets": ("hs_lastmodifieddate", "ticket"),
}


class HubSpotSource:
    sorted = True  # ascending by modification: the cursor may advance page by page

    def __init__(self, entry: dict[str, Any], client: Client | None):
        self.client = client
        self.base = entry.get("base_url", API)
        self.object = entry.get("object", "contacts")
        modified, record = OBJECTS.get(self.object, ("hs_lastmodifieddate", self.object))
        self.modified = entry.get("modified_property", modified)
        self.record_name = entry.get("record", record)
        self.limit = min(200, entry.get("page_size", 200))
        self.headers = {"Authorization": f"Bearer {entry['token']}"}
        self.associations: dict[str, list[str]] = dict(entry.get("associations", {}))
        wanted = Mapper("", "", rules_of(entry)).paths()
        self.properties = sorted(
            {self.modified, "hs_object_id", *entry.get("properties", ())}
            | {p.split(".")[1] for p in wanted if p.startswith("properties.")}
        )

    def pages(self, since_ms: int) -> Iterator[list[Record]]:
        start, op = since_ms, "GTE"
        while True:
            records, more = self._search([self._filter(self.modified, op, start)], self.modified)
            yield records
            if not more or not records:
                return
            last = records[-1].modified_ms
            if last > start:
                start, op = last, "GTE"  # again from the last modification seen
                continue
            yield from self._one_millisecond(start)  # a full page, all at `start`
            op = "GT"

    def _one_millisecond(self, ms: int) -> Iterator[list[Record]]:
        last = 0
        while True:
            filters = [
                self._filter(self.modified, "EQ", ms),
                self._filter("hs_object_id", "GT", last),
            ]
            records, more = self._search(filters, "hs_object_id")
            yield records
            if not more or not records:
                return
            last = max(int(r.id) for r in records)

    @staticmethod
    def _filter(name: str, op: str, value: int) -> dict[str, str]:
        return {"propertyName": name, "operator": op, "value": str(value)}

    def _search(self, filters: list[dict], sort: str) -> tuple[list[Record], bool]:
        """The first page of a search, and whether there is more."""
        body: dict[str, Any] = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": sort, "direction": "ASCENDING"}],
            "properties": self.properties,
            "limit": self.limit,
        }
        url = f"{self.base}/crm/v3/objects/{self.object}/search"
        data = self.client.request("POST", url, json=body, headers=self.headers).json()
        records = [r for r in map(self.read, data.get("results") or []) if r]
        return records, bool(((data.get("paging") or {}).get("next") or {}).get("after"))

    def read(self, raw: dict[str, Any]) -> Record | None:
        props = raw.get("properties") or {}
        when = epoch(props.get(self.modified)) or epoch(raw.get("updatedAt"))
        if raw.get("id") is None or when is None:
            return None
        return Record(str(raw["id"]), round(when * 1000), raw)

    def enrich(self, records: list[Record]) -> list[Record]:
        """Add the associated records the mapping reads (two batch calls per object type)."""
        if not self.associations or not records:
            return records
        linked: dict[str, dict[str, list]] = {r.id: {} for r in records}
        for to_type, properties in self.associations.items():
            pairs = self._associated(to_type, [r.id for r in records])
            targets = sorted({t for ts in pairs.values() for t in ts})
            found = self._read(to_type, targets, properties)
            for rid, ids in pairs.items():
                linked[rid][to_type] = [found[t] for t in ids if t in found]
        return [
            Record(r.id, r.modified_ms, {**r.fields, "associations": linked[r.id]}) for r in records
        ]

    def _associated(self, to_type: str, ids: list[str]) -> dict[str, list[str]]:
        url = f"{self.base}/crm/v4/associations/{self.object}/{to_type}/batch/read"
        pairs: dict[str, list[str]] = {}
        for i in range(0, len(ids), BATCH):
            inputs = [{"id": x} for x in ids[i : i + BATCH]]
            data = self.client.request("POST", url, json={"inputs": inputs}, headers=self.headers)
            for item in data.json().get("results") or []:
                targets = [str(t["toObjectId"]) for t in item.get("to") or []]
                pairs[str(item["from"]["id"])] = targets
        return pairs

    def _read(self, to_type: str, ids: list[str], properties: list[str]) -> dict[str, dict]:
        url = f"{self.base}/crm/v3/objects/{to_type}/batch/read"
        found: dict[str, dict] = {}
        for i in range(0, len(ids), BATCH):
            body = {"properties": properties, "inputs": [{"id": x} for x in ids[i : i + BATCH]]}
            data = self.client.request("POST", url, json=body, headers=self.headers).json()
            found.update({str(r["id"]): r for r in data.get("results") or []})
        return found
