"""The baseline: the same server as txsms's receiver serving a Flask route that reads the body.

python -m bench.bare_app --port 8081 --threads 8      # waitress, as `txsms serve`
gunicorn -w 2 'bench.bare_app:app'     # as `gunicorn 'txsms.webhooks:create_app()'`
"""

from __future__ import annotations

import argparse
import signal

from flask import Flask, request
from waitress.server import create_server

app = Flask(__name__)


@app.post("/api/v1/events")
@app.post("/webhooks/shopify")
def events():
    request.get_data()
    return "", 200


@app.get("/healthz")
def healthz():
    return "ok"


def _terminate(signum, _frame):
    raise SystemExit(0)  # as `txsms serve` does: waitress stops its loop and drains its threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    server = create_server(
        app, host="127.0.0.1", port=args.port, threads=args.threads, ident="txsms"
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.run()
    finally:
        server.close()


if __name__ == "__main__":
    main()
