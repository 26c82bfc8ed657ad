"""The provider return path: inbound messages and delivery receipts.

    POST /webhooks/providers/<provider>/inbound     STOP, START, HELP and any other reply
    POST /webhooks/providers/<provider>/status      delivery receipts

Only the configured provider is served, and only signed requests are believed: a forged
"STOP" must not silence a customer, a forged receipt must not rewrite history (403).
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, current_app, jsonify, request

from txsms.core import returnpath
from txsms.core.providers import CallbackRequest, Provider, make_provider

log = logging.getLogger(__name__)

bp = Blueprint("providers", __name__, url_prefix="/webhooks/providers")


def _provider(name: str) -> Provider:
    runtime = current_app.extensions["txsms"]
    if name != runtime.config.provider.kind:
        abort(404, f"provider {name!r} is not configured")
    if "txsms.provider" not in current_app.extensions:
        current_app.extensions["txsms.provider"] = make_provider(
            runtime.config.provider, public_url=runtime.config.server.public_url
        )
    return current_app.extensions["txsms.provider"]


def _callback_request() -> CallbackRequest:
    """The request as the provider signed it: the public URL, not the one behind a proxy."""
    runtime = current_app.extensions["txsms"]
    public = runtime.config.server.public_url
    url = public + request.full_path.rstrip("?") if public else request.url
    # The raw body first (and cached): reading the form first would consume the stream, and
    # some providers sign the raw bytes.
    body = request.get_data(cache=True)
    form = request.form.to_dict(flat=False) if request.mimetype != "application/json" else {}
    return CallbackRequest(
        method=request.method,
        url=url,
        headers=request.headers,
        body=body,
        form=form,
        query=request.args.to_dict(flat=False),
    )


def _verified(provider: Provider) -> CallbackRequest:
    callback = _callback_request()
    if not provider.verify_callback(callback):
        log.warning(
            "%s callback to %s refused: bad or missing signature", provider.name, request.path
        )
        abort(403, "bad or missing signature")
    return callback


@bp.route("/<name>/inbound", methods=["POST", "GET"])
def inbound(name: str):
    provider = _provider(name)
    callback = _verified(provider)
    try:
        message = provider.parse_inbound(callback)
    except (KeyError, ValueError) as exc:
        abort(400, f"unreadable inbound message: {exc}")
    result = returnpath.handle_inbound(current_app.extensions["txsms"], provider, message)
    response = provider.inbound_response(result.reply)
    if response is not None:
        body, mimetype = response
        return Response(body, mimetype=mimetype)
    return jsonify(status="ok", keyword=result.keyword)


@bp.route("/<name>/status", methods=["POST", "GET"])
def status(name: str):
    provider = _provider(name)
    callback = _verified(provider)
    try:
        reports = provider.parse_status(callback)
    except (KeyError, ValueError) as exc:
        abort(400, f"unreadable delivery receipt: {exc}")
    applied = returnpath.apply_reports(current_app.extensions["txsms"], provider, reports)
    return jsonify(status="ok", received=len(reports), applied=applied)
