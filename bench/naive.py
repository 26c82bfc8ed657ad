"""The naive receiver (`bench/naive_app.py`: verify the HMAC, POST to the provider, answer)
under the same gunicorn and the same signed Shopify deliveries as txsms's receiver, with the
fake provider answering in 200 ms."""

from __future__ import annotations

import os
from pathlib import Path

from bench import gunicorn_ingest, load

APP = "bench.naive_app:app"


def run(args, tmp: Path, slow_fake_url: str) -> load.Result:
    env = {
        **os.environ,
        "BENCH_SHOPIFY_SECRET": gunicorn_ingest.SECRET,
        "BENCH_FAKE_URL": slow_fake_url,
    }
    return gunicorn_ingest.serve(APP, tmp / "gunicorn-naive.log", args, env)
