"""Ingest through gunicorn, as the README's scale-out runs it: signed Shopify orders/create
deliveries (the real fixture, a distinct order each) into `gunicorn -w 2
'txsms.webhooks:create_app()'` with a `txsms worker` process beside it, against the same gunicorn
serving the bare Flask route (`bench/bare_app.py`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import load
from bench.common import (
    ROOT,
    TXSMS,
    database,
    gunicorn,
    security_section,
    start,
    stop,
    toml,
    wait_log,
)
from bench.fake_provider import provider_section
from bench.ingest import stored

FIXTURE = ROOT / "tests" / "fixtures" / "shopify" / "orders_create.json"
SHOP = "bench-shop.myshopify.com"
SECRET = "bench-shopify-client-secret-0123456789"
# Fictional numbers (555-01xx) in ten US area codes: a thousand distinct customers.
AREAS = ("415", "212", "312", "617", "206", "303", "512", "702", "404", "503")
PHONES = [f"+1 {a} 555 01{i:02d}" for a in AREAS for i in range(100)]
TXSMS_APP = "txsms.webhooks:create_app()"
BARE_APP = "bench.bare_app:app"

_order: dict | None = None


def shopify_delivery(tag: str, n: int) -> tuple[bytes, dict[str, str]]:
    """The fixture as a new order (id, name, order_number, phone), serialised and signed.

    `tag` is "<generator process>.<connection>": with `n` it makes every order distinct."""
    global _order
    if _order is None:
        _order = json.loads(FIXTURE.read_bytes())
    proc, conn = (int(x) for x in tag.split("."))
    seq = (proc * 1000 + conn) * 10_000_000 + n
    number = 1001 + seq
    # Each connection starts at a customer of its own: connections in step would all order
    # for the same customer at the same moment, which real traffic does not, and on a fresh
    # database the two receivers would race to record every customer's first contact.
    customer = (n + conn * 163 + proc * 577) % len(PHONES)
    order = {
        **_order,
        "id": 5_000_000_000_000_000 + seq,
        "name": f"#{number}",
        "order_number": number,
        "phone": PHONES[customer],
    }
    body = json.dumps(order).encode()
    signature = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest())
    return body, {
        "Content-Type": "application/json",
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-Hmac-Sha256": signature.decode(),
        "X-Shopify-Event-Id": f"bench-event-{seq}",
        "X-Shopify-Webhook-Id": f"bench-webhook-{seq}",
        "X-Shopify-API-Version": "2026-07",
    }


def spec(port: int, server_pids: tuple[int, ...], args) -> load.Spec:
    return load.Spec(
        port=port,
        path="/webhooks/shopify",
        headers={},
        body=shopify_delivery,
        status=200,
        connections=args.gunicorn_connections,
        procs=args.procs,
        seconds=args.seconds,
        warmup=args.warmup,
        server_pid=server_pids,
    )


@contextmanager
def serving(app: str, log: Path, args, env: dict[str, str] | None = None) -> Iterator[load.Spec]:
    """`app` under `gunicorn -w 2` (both workers loaded): the load's spec; stopped after."""
    proc, port, workers = gunicorn(app, log, args.worker_class, args.gthreads, env)
    try:
        yield spec(port, workers, args)
    finally:
        stop(proc)


def serve(app: str, log: Path, args, env: dict[str, str] | None = None) -> load.Result:
    with serving(app, log, args, env) as measured:
        return load.run(measured)


def compare(args, tmp: Path, kind: str, fake_url: str) -> tuple[load.Result, load.Result]:
    """The bare route and the txsms receiver (a fresh database, `txsms db upgrade` first, a
    `txsms worker` beside it sending to `fake_url`), both served at once and loaded in turns
    (`load.alternate`): (bare, txsms). Afterwards every 200 must have its event stored, and
    some must have been sent."""
    with database(kind, tmp, migrate=False) as url:
        config = tmp / f"gunicorn-{kind}.toml"
        config.write_text(
            toml(
                {
                    "server": {"public_url": "http://127.0.0.1:8080"},
                    "storage": {"url": url, "data_dir": str(tmp / "data")},
                    "security": security_section(),
                    "sender": {"name": "Bench Shop", "default_region": "US", "timezone": "UTC"},
                    "provider": provider_section(fake_url),
                    "shopify.shops": [
                        # The doc example is a test order: sent like a real one here.
                        {"domain": SHOP, "secret": SECRET, "send_test_orders": True}
                    ],
                }
            )
        )
        env = {**os.environ, "TXSMS_CONFIG": str(config)}
        subprocess.run(
            [TXSMS, "db", "upgrade"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
        with ExitStack() as stack:
            worker_log = tmp / f"gunicorn-{kind}-worker.log"
            worker = start([TXSMS, "worker"], worker_log, env=env)
            stack.callback(stop, worker)
            wait_log(worker_log, "running with", worker)
            receiver = stack.enter_context(
                serving(TXSMS_APP, tmp / f"gunicorn-{kind}.log", args, env)
            )
            bare = stack.enter_context(serving(BARE_APP, tmp / f"gunicorn-bare-{kind}.log", args))
            base, result = load.alternate([bare, receiver], args.rounds)
        events, sent = stored(url)
    if events < result.answered or not sent:  # a 200 is a promise that the event is stored
        raise RuntimeError(f"{result.answered} answered 200, {events} events stored, {sent} sent")
    return base, result
