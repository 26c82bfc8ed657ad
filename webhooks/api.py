"""`POST /api/v1/events`: the generic event API for any system."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC

from flask import Blueprint, abort, current_app, jsonify, request
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from txsms.core.events import EVENT_KINDS, Consent, Event, OrderRef, Recipient
from txsms.core.pipeline import ingest

bp = Blueprint("api", __name__, url_prefix="/api/v1")

MAX_BATCH = 100


class RecipientSchema(Schema):
    class Meta:
        unknown = RAISE

    phone = fields.String(load_default=None, validate=validate.Length(max=64))
    name = fields.String(load_default=None, validate=validate.Length(max=200))
    locale = fields.String(
        load_default=None, validate=validate.Regexp(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    )
    country = fields.String(load_default=None, validate=validate.Regexp(r"^[A-Za-z]{2}$"))
    customer_id = fields.String(load_default=None, validate=validate.Length(max=200))
    timezone = fields.String(load_default=None, validate=validate.Length(max=64))


class ConsentSchema(Schema):
    scope = fields.String(required=True, validate=validate.OneOf(("all", "marketing")))
    action = fields.String(required=True, validate=validate.OneOf(("opt_in", "opt_out")))
    evidence = fields.Dict(load_default=dict)


class OrderSchema(Schema):
    class Meta:
        unknown = RAISE

    ref = fields.String(required=True, validate=validate.Length(min=1, max=200))
    status = fields.String(load_default=None, validate=validate.Length(max=40))
    modified_at = fields.AwareDateTime(load_default=None, default_timezone=UTC)


#: `source.disabled` is for platform connectors (an uninstalled shop), not for API callers.
API_KINDS = tuple(k for k in EVENT_KINDS if k != "source.disabled")


class EventSchema(Schema):
    class Meta:
        unknown = RAISE

    kind = fields.String(required=True, validate=validate.OneOf(API_KINDS))
    key = fields.String(required=True, validate=validate.Length(min=1, max=300))
    recipient = fields.Nested(RecipientSchema, load_default=dict)
    data = fields.Dict(keys=fields.String(), load_default=dict)
    occurred_at = fields.AwareDateTime(load_default=None, default_timezone=UTC)
    send_at = fields.AwareDateTime(load_default=None, allow_none=True, default_timezone=UTC)
    expires_at = fields.AwareDateTime(load_default=None, allow_none=True, default_timezone=UTC)
    consent = fields.Nested(ConsentSchema, load_default=None, allow_none=True)
    # Ties the event to an order or appointment: later events without a number are addressed
    # from it, older updates are ignored, and `messages.cancel` cancels what it still has queued.
    order = fields.Nested(OrderSchema, load_default=None, allow_none=True)


class BatchSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    events = fields.List(
        fields.Nested(EventSchema), required=True, validate=validate.Length(min=1, max=MAX_BATCH)
    )


BATCH_SCHEMA = BatchSchema()  # schemas are reusable; building one per request costs more


def _flatten(errors, prefix: str = "") -> dict[str, list[str]]:
    flat: dict[str, list[str]] = {}
    for key, value in errors.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value if isinstance(value, list) else [str(value)]
    return flat


def _authorized(tokens) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    # Compare digests so the comparison time does not depend on a token's length either.
    digest = hashlib.sha256(given.strip().encode()).digest()
    return any(hmac.compare_digest(digest, hashlib.sha256(t.encode()).digest()) for t in tokens)


def _to_event(item: dict) -> Event:
    consent, order = item.get("consent"), item.get("order")
    return Event(
        source="api",
        kind=item["kind"],
        key=item["key"],
        recipient=Recipient(**item["recipient"]),
        data=item["data"],
        consent=Consent(**consent) if consent else None,
        order=OrderRef(
            ref=order["ref"],
            status=order["status"],
            modified_at=order["modified_at"].timestamp() if order["modified_at"] else None,
        )
        if order
        else None,
        send_at=item["send_at"].timestamp() if item.get("send_at") else None,
        expires_at=item["expires_at"].timestamp() if item.get("expires_at") else None,
        **({"occurred_at": item["occurred_at"].timestamp()} if item.get("occurred_at") else {}),
    )


@bp.post("/events")
def post_events():
    runtime = current_app.extensions["txsms"]
    if not _authorized(runtime.config.security.api_tokens):
        return jsonify(error="missing or invalid bearer token"), 401
    if request.content_length and request.content_length > runtime.config.server.max_body_bytes:
        abort(413, "request body too large")
    body = request.get_json(silent=True)
    if body is None:
        return jsonify(error="body must be JSON"), 400
    if isinstance(body, dict) and "events" not in body:
        body = {"events": [body]}
    if not isinstance(body, dict):
        return jsonify(error='expected an event object or {"events": [...]}'), 400
    try:
        items = BATCH_SCHEMA.load(body)["events"]
    except ValidationError as exc:
        return jsonify(errors=_flatten(exc.messages)), 400
    results = ingest(runtime, [_to_event(item) for item in items])
    return jsonify(events=[r.as_json() for r in results]), 202
