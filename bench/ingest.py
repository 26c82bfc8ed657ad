"""Ingest: `POST /api/v1/events` on `txsms serve` against a bare Flask route on the same waitress.

Both servers run in a child process with the same thread count (the config's default), and the
txsms one sends what it ingests to the fake Twilio through its in-process worker, as in production.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from bench import load
from bench.common import (
    API_TOKEN,
    PYTHON,
    TXSMS,
    free_port,
    security_section,
    start,
    stop,
    toml,
    vm_hwm_mb,
    wait_http,
)
from bench.fake_provider import provider_section

PHONES = [f"+1 415 555 01{i:02d}" for i in range(20)]
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_TOKEN}"}


def event_body(tag: str, n: int) -> bytes:
    """A realistic order event; `tag` and `n` make its key distinct."""
    number = f"{tag}.{n}"
    event = {
        "kind": "order.created",
        "key": f"order:{number}:created",
        "recipient": {"phone": PHONES[n % len(PHONES)], "name": "Ada"},
        "data": {"order": {"number": f"#{number}", "total": "$25.00"}},
    }
    return json.dumps(event).encode()


def spec(port: int, status: int, pid: int, args) -> load.Spec:
    return load.Spec(
        port=port,
        path="/api/v1/events",
        headers=HEADERS,
        body=event_body,
        status=status,
        connections=args.connections,
        procs=args.procs,
        seconds=args.seconds,
        warmup=args.warmup,
        server_pid=pid,
    )


def bare(args, tmp: Path, threads: int) -> load.Result:
    port, log = free_port(), tmp / "bare.log"
    cmd = [PYTHON, "-m", "bench.bare_app", "--port", str(port), "--threads", str(threads)]
    with ExitStack() as stack:
        proc = start(cmd, log)
        stack.callback(stop, proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        return load.run(spec(port, 200, proc.pid, args))


def serve_config(tmp: Path, port: int, db_url: str, provider: dict) -> Path:
    """The config `txsms serve` runs with in the benchmarks."""
    config = tmp / f"serve-{port}.toml"
    config.write_text(
        toml(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "public_url": f"http://127.0.0.1:{port}",
                },
                "storage": {"url": db_url, "data_dir": str(tmp / "data")},
                "security": security_section(),
                "sender": {"name": "Bench Shop", "default_region": "US", "timezone": "UTC"},
                "provider": provider,
            }
        )
    )
    return config


def txsms(args, tmp: Path, db_url: str, fake_url: str) -> tuple[load.Result, float]:
    """`txsms serve` on `db_url` (fresh and migrated); checks every 202 left an event behind.
    Also the server's peak RSS (VmHWM, MB) at the end of the load."""
    port, log = free_port(), tmp / "serve.log"
    config = serve_config(tmp, port, db_url, provider_section(fake_url))
    with ExitStack() as stack:
        proc = start([TXSMS, "serve", "--config", str(config)], log)
        stack.callback(stop, proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        result = load.run(spec(port, 202, proc.pid, args))
        peak_mb = vm_hwm_mb(proc.pid)
    events, sent = stored(db_url)
    if events < result.answered or not sent:  # a 202 is a promise that the event is stored
        raise RuntimeError(f"{result.answered} answered 202, {events} events stored, {sent} sent")
    return result, peak_mb


def stored(db_url: str) -> tuple[int, int]:
    """(events stored, messages the in-process worker sent)."""
    from sqlalchemy import func, select

    from txsms.core import storage
    from txsms.core.config import StorageConfig

    count = select(func.count())
    engine = storage.make_engine(StorageConfig(url=db_url))
    try:
        with engine.connect() as conn:
            events = conn.execute(count.select_from(storage.events)).scalar_one()
            sent = conn.execute(
                count.select_from(storage.messages).where(storage.messages.c.status == "sent")
            ).scalar_one()
    finally:
        engine.dispose()
    return events, sent
