"""Scale-out on PostgreSQL: several receivers and worker processes, one database, no
duplicate, no loss, one rate limit. Real processes: gunicorn receivers, `txsms worker`s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest import API_TOKEN, INDEX_KEY, KEY, PG_SKIP, pg_schema, to_toml, twilio_section
from fakes import wait_until
from fakes.twilio import Delay
from test_serve import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(PG_SKIP), reason=PG_SKIP or "")]

BIN = Path(sys.executable).parent


@pytest.fixture
def pg_url():
    with pg_schema() as url:
        yield url


class Deployment:
    def __init__(self, tmp_path: Path, url: str, fake, **worker):
        self.tmp_path = tmp_path
        self.config = tmp_path / "txsms.toml"
        self.config.write_text(
            to_toml(
                {
                    "server": {"public_url": "https://sms.example.test"},
                    "storage": {"url": url, "data_dir": str(tmp_path)},
                    "security": {"keys": [KEY], "index_key": INDEX_KEY, "api_tokens": [API_TOKEN]},
                    "sender": {"name": "Test Shop", "timezone": "UTC"},
                    "provider": twilio_section(fake, rate_per_second=400),
                    "worker": {
                        "poll_seconds": 1.0,
                        "lease_seconds": 2,
                        "unknown_grace_seconds": 1,
                        **worker,
                    },
                }
            )
        )
        self.env = {**os.environ, "TXSMS_CONFIG": str(self.config)}
        self.procs: list[subprocess.Popen] = []
        self.receivers: list[str] = []
        subprocess.run(
            [BIN / "txsms", "db", "upgrade"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def spawn(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.tmp_path / log, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=out, cwd=self.tmp_path)
        self.procs.append(proc)
        return proc

    def receiver(self) -> str:
        port = free_port()
        self.spawn(
            str(BIN / "gunicorn"),
            "-w",
            "1",
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{port}",
            "txsms.webhooks:create_app()",
            log=f"receiver-{port}.log",
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url), timeout=30)
        self.receivers.append(url)
        return url

    def worker(self, n: int) -> subprocess.Popen:
        return self.spawn(str(BIN / "txsms"), "worker", "--concurrency", "2", log=f"worker-{n}.log")

    def messages(self) -> list[dict]:
        out = subprocess.run(
            [BIN / "txsms", "messages", "--json", "--limit", "100000"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _event(n: int) -> dict:
    return {
        "kind": "order.created",
        "key": f"order:{n}:created",
        "recipient": {"phone": f"+1 415 555 {n % 100:04d}"},
        "data": {"order": {"number": f"#{n}", "total": "$1.00"}},
    }


def _post_all(receivers: list[str], total: int, duplicate_every: int = 7) -> list[int]:
    """Post `total` events in batches of 100 over both receivers from 4 threads; every
    `duplicate_every`-th batch goes twice (to the other receiver)."""
    batches = [
        [_event(n) for n in range(start, min(start + 100, total))] for start in range(0, total, 100)
    ]
    statuses: list[int] = []
    failures: list[Exception] = []  # a thread's exception, told instead of a later timeout
    lock = threading.Lock()

    def post(indexes: list[int]) -> None:
        try:
            post_batches(indexes)
        except Exception as exc:  # told by the assertion below
            failures.append(exc)

    def post_batches(indexes: list[int]) -> None:
        with requests.Session() as session:
            for i in indexes:
                targets = [receivers[i % 2]] + (
                    [receivers[(i + 1) % 2]] if i % duplicate_every == 0 else []
                )
                for url in targets:
                    r = session.post(
                        f"{url}/api/v1/events",
                        json={"events": batches[i]},
                        headers={"Authorization": f"Bearer {API_TOKEN}"},
                        timeout=60,
                    )
                    with lock:
                        statuses.append(r.status_code)

    threads = [
        threading.Thread(target=post, args=(list(range(k, len(batches), 4)),)) for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"posting failed: {failures!r}"
    return statuses


@pytest.fixture
def deployment(tmp_path, pg_url, fake_twilio):
    made: list[Deployment] = []

    def build(**worker) -> Deployment:
        made.append(Deployment(tmp_path, pg_url, fake_twilio, **worker))
        return made[-1]

    yield build
    for d in made:
        d.close()


def test_two_receivers_four_workers_exactly_once_within_the_rate(deployment, fake_twilio):
    total = 5000
    d = deployment()
    receivers = [d.receiver(), d.receiver()]
    for n in range(4):
        d.worker(n)
    statuses = _post_all(receivers, total)
    assert set(statuses) == {202}

    # Sends only: a worker may also ask Twilio about a message (GET) if one ended `unknown`.
    def sends() -> list:
        return [r for r in fake_twilio.requests if r.method == "POST"]

    fake_twilio.wait_for(lambda: len(sends()) >= total, timeout=120)
    wait_until(lambda: all(m["status"] == "sent" for m in d.messages()), timeout=30)
    bodies = [r.form["Body"] for r in sends()]
    assert len(bodies) == total  # none lost, none twice
    assert len({b.split(" and will")[0] for b in bodies}) == total
    arrivals = sorted(r.at for r in sends())
    j = 0
    for i, start in enumerate(arrivals):  # the busiest one-second window
        while arrivals[j] < start - 1.0:
            j += 1
        assert i - j + 1 <= 400, f"{i - j + 1} requests within one second"


def test_killing_a_worker_mid_batch_loses_nothing_and_sends_nothing_twice(deployment, fake_twilio):
    total = 200
    d = deployment()
    receiver = d.receiver()
    fake_twilio.script(*[Delay(0.3)] * 40)  # slow answers: the victim is surely mid-request
    victim = d.worker(0)
    _post_all([receiver, receiver], total, duplicate_every=10**9)
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) >= 5, timeout=30)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for n in range(1, 4):
        d.worker(n)
    wait_until(lambda: sorted({m["status"] for m in d.messages()}) == ["sent"], timeout=90)
    bodies = [r.form["Body"] for r in fake_twilio.requests if r.method == "POST"]
    assert len(bodies) == total and len(set(bodies)) == total
    settled = [m for m in d.messages() if m["reason"] == "settled_by_lookup"]
    assert settled, "the request in flight at the kill was settled by asking the provider"
