"""`POST /webhooks/<platform>`: store deliveries, verified and translated by their connector."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, jsonify, request

from txsms import connectors
from txsms.connectors.base import Connector
from txsms.core.errors import PayloadError, SignatureError
from txsms.core.pipeline import ingest

log = logging.getLogger(__name__)

bp = Blueprint("platforms", __name__)


def _connector(platform: str) -> Connector:
    cache = current_app.extensions.setdefault("txsms.connectors", {})
    if platform not in cache:
        runtime = current_app.extensions["txsms"]
        cache[platform] = connectors.module(platform).Connector(runtime.config)
    return cache[platform]


@bp.post("/webhooks/<platform>")
def receive(platform: str):
    if platform not in connectors.REGISTRY or not hasattr(connectors.module(platform), "Connector"):
        abort(404, f"no webhook receiver named {platform!r}")
    connector = _connector(platform)
    body = request.get_data(cache=False)  # the raw bytes: signatures are over these
    try:
        delivery = connector.verify(request.headers, body)
    except SignatureError as exc:
        log.warning("%s delivery refused: %s", platform, exc)
        return jsonify(error=str(exc)), 401
    except PayloadError as exc:
        return jsonify(error=str(exc)), 400
    if delivery is None:
        return jsonify(status="ok"), 200
    try:
        events = connector.events(delivery, body)
    except PayloadError as exc:
        return jsonify(error=str(exc)), 400
    dedupe = (delivery.source, delivery.delivery_id) if delivery.delivery_id else None
    results = ingest(current_app.extensions["txsms"], events, delivery=dedupe)
    if results is None:
        return jsonify(status="duplicate delivery"), 200
    return jsonify(status="ok", topic=delivery.topic, events=[r.as_json() for r in results]), 200
