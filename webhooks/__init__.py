"""The Flask receiver: `create_app()` is the WSGI entry point.

    gunicorn 'txsms.webhooks:create_app()'      # reads TXSMS_CONFIG

Views read the raw body, hand it to a connector or the event API's schema, pass the resulting
Events to the core, and answer once the core has committed them.
"""

from __future__ import annotations

import logging
import os
import sys

from flask import Flask, jsonify
from flask.json.provider import DefaultJSONProvider
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from txsms.core import jsoncodec
from txsms.core.config import Config
from txsms.core.metrics import WEBHOOKS
from txsms.core.runtime import Runtime, StartupError, start
from txsms.core.storage import unavailable

log = logging.getLogger(__name__)

#: What a 503 asks a client to wait while the database is unavailable.
RETRY_AFTER_SECONDS = 5


def create_app(
    config: Config | str | os.PathLike | None = None, *, runtime: Runtime | None = None
) -> Flask:
    if runtime is None and config is None:
        runtime = _runtime_for_server()
    elif runtime is None:
        runtime = start(config)
    # Paths are explicit: "txsms" is a namespace package, which Flask cannot locate.
    app = Flask(
        __name__,
        root_path=os.path.dirname(__file__),
        instance_path=os.path.abspath(runtime.config.storage.data_dir),
    )
    app.json = _JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = runtime.config.server.max_body_bytes
    app.extensions["txsms"] = runtime

    from txsms.webhooks import api, health, platforms, providers

    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(platforms.bp)
    app.register_blueprint(providers.bp)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(OperationalError)
    def _database_unavailable(exc: OperationalError):
        # Down, unreachable, or SQLite locked for longer than its busy timeout: no 2xx, so the
        # platform or client sends it again (a commit that did land is then a duplicate).
        log.warning("database unavailable: %s", unavailable(exc))
        response = jsonify(error="database unavailable, try again later")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, 503

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Never a traceback to the caller; the log has it (without payloads).
        log.exception("unhandled error")
        return jsonify(error="internal error"), 500

    @app.after_request
    def _count(response):
        from flask import request

        if request.url_rule is not None:
            WEBHOOKS.labels(request.url_rule.rule, str(response.status_code)).inc()
        return response

    return app


class _JSONProvider(DefaultJSONProvider):
    """Flask's, reading request bodies as the connectors do (`txsms.core.jsoncodec`)."""

    def loads(self, s: str | bytes, **kwargs):
        return jsoncodec.loads(s) if not kwargs else super().loads(s, **kwargs)


#: gunicorn's exit status for an app that cannot load: its master stops ("App failed to
#: load") instead of starting new workers that fail the same way.
APP_LOAD_ERROR = 4


def _runtime_for_server() -> Runtime:
    """The WSGI entry point's runtime (`$TXSMS_CONFIG`). What stops it is one line on stderr
    and exit status 4, not a traceback per worker: gunicorn then prints "App failed to load",
    or the line itself with `--preload`."""
    try:
        return start()
    except StartupError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(APP_LOAD_ERROR) from None
