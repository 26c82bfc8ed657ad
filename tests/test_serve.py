"""`txsms serve` as a user runs it: a real process, real HTTP, a fake Twilio, a SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import API_TOKEN, INDEX_KEY, KEY, PG_SKIP, pg_schema, to_toml, twilio_section
from fakes import wait_until
from fakes.proxy import TcpProxy
from fakes.twilio import Delay
from sqlalchemy.engine import make_url

TXSMS = str(Path(sys.executable).parent / "txsms")
REPO = Path(__file__).resolve().parent.parent
SAMPLE = {  # the README's sample event
    "kind": "order.created",
    "key": "order:1001:created",
    "recipient": {"phone": "+1 415 555 0100", "name": "Ada", "locale": "en"},
    "data": {"order": {"number": "#1001", "total": "$25.00"}},
    "send_at": None,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, config: dict, arrays: dict[str, list[dict]] | None = None) -> Path:
    """`config` as TOML, then `arrays` as arrays of tables, which to_toml does not write:
    {"shopify.shops": [shop, ...]} gives one [[shopify.shops]] table per shop."""
    text = to_toml(config)
    for name, tables in (arrays or {}).items():
        text += "".join(to_toml({"_": t}).replace("[_]\n", f"[[{name}]]\n", 1) for t in tables)
    path.write_text(text)
    return path


class Server:
    """A `txsms serve` child process with its output in files."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict | None = None,
        *,
        path: Path | None = None,
        env: dict | None = None,
        arrays: dict[str, list[dict]] | None = None,
    ):
        self.tmp_path = tmp_path
        self.port = free_port()
        if path is None:
            config = config or {}
            config.setdefault("server", {}).update(port=self.port, host="127.0.0.1")
            path = write_config(tmp_path / "txsms.toml", config, arrays)
        self.path = path
        self.env = {**os.environ, "TXSMS_PORT": str(self.port), **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = tmp_path / "stdout.log"
        self.err = tmp_path / "stderr.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Server:
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(
                [TXSMS, "serve", "--config", str(self.path)],
                cwd=self.tmp_path,
                env=self.env,
                stdout=out,
                stderr=err,
            )
        if wait:
            wait_until(self.healthy, timeout=20)
        return self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}: {self.err.read_text()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def post(self, body, token=API_TOKEN) -> requests.Response:
        return requests.post(
            f"{self.url}/api/v1/events",
            json=body,
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            return self.proc.wait(timeout=20)
        return self.proc.returncode if self.proc else 0

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [TXSMS, *args, "--config", str(self.path)],
            cwd=self.tmp_path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.cli("messages", "--json").splitlines()]


def base_config(tmp_path: Path, **sections) -> dict:
    config = {
        "storage": {"url": f"sqlite:///{tmp_path / 'txsms.db'}", "data_dir": str(tmp_path)},
        "security": {"keys": [KEY], "index_key": INDEX_KEY, "api_tokens": [API_TOKEN]},
        "sender": {"name": "Test Shop", "timezone": "UTC"},
        "worker": {"poll_seconds": 0.2, "lease_seconds": 1, "backoff_base_seconds": 0.2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture
def server_factory(tmp_path):
    made: list[Server] = []

    def build(*args, **kwargs) -> Server:
        made.append(Server(*args, **kwargs))
        return made[-1]

    yield build
    for server in made:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_example_config_prints_the_readme_sample_within_a_second(tmp_path, server_factory):
    server = server_factory(tmp_path, path=REPO / "examples" / "txsms.toml").start()
    response = server.post(SAMPLE, token="dev-token-change-me-0123456789")
    assert response.status_code == 202
    accepted = time.monotonic()
    wait_until(lambda: "Thanks Ada" in server.out.read_text(), timeout=5)
    printed = time.monotonic() - accepted
    out = server.out.read_text()
    assert "SMS to +1******0100" in out and "4155550100" not in out
    assert "generated a development key" in server.err.read_text()
    assert server.stop() == 0
    assert "shutting down" in server.err.read_text()
    print(f"event accepted -> console print: {printed * 1000:.0f} ms")


def test_posted_three_times_one_sms(tmp_path, server_factory, fake_twilio):
    server = server_factory(tmp_path, base_config(tmp_path, provider=twilio_section(fake_twilio)))
    server.start()
    answers = [server.post(SAMPLE).json()["events"][0]["status"] for _ in range(3)]
    assert answers == ["accepted", "duplicate", "duplicate"]
    fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 1)
    wait_until(lambda: server.messages()[0]["status"] == "sent")
    assert len(server.messages()) == 1
    assert len(fake_twilio.requests) == 1


@pytest.mark.skipif(bool(PG_SKIP), reason=PG_SKIP or "")
def test_a_database_outage_answers_503_and_both_sides_carry_on_once_it_is_back(
    tmp_path, server_factory, fake_twilio
):
    """PostgreSQL behind a proxy the test cuts: events are refused with a 503 to retry (not
    acknowledged, not a 500), the worker waits, and both recover by themselves; the log says
    so in a line each time, without tracebacks."""

    def event(n: int) -> dict:
        return {**SAMPLE, "key": f"order:{n}:created"}

    with pg_schema() as url, TcpProxy(_pg_address(url)) as proxy:
        storage = {"url": _through(url, proxy.port)}
        config = base_config(tmp_path, storage=storage, provider=twilio_section(fake_twilio))
        server = server_factory(tmp_path, config)
        server.cli("db", "upgrade")
        server.start()
        assert server.post({"events": [event(1)]}).status_code == 202
        fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 1)

        proxy.cut()
        down = server.post({"events": [event(2)]})
        assert down.status_code == 503, down.text
        assert down.json() == {"error": "database unavailable, try again later"}
        assert down.headers["Retry-After"] == "5"
        worker_waits = "worker iteration failed; retrying (database unavailable: OperationalError: "
        wait_until(lambda: worker_waits in server.err.read_text(), timeout=10)
        log = server.err.read_text()
        assert "database unavailable: OperationalError: " in log
        assert "Traceback" not in log

        proxy.resume()
        again = wait_until(lambda: server.post({"events": [event(2)]}), timeout=15)
        assert again.status_code == 202
        assert again.json()["events"][0]["status"] == "accepted"  # the 503 stored nothing
        fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 2, timeout=15)
    assert server.stop() == 0
    assert len(fake_twilio.requests) == 2


def _pg_address(url: str) -> tuple[str, int]:
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def _through(url: str, port: int) -> str:
    """`url` with the proxy's port in place of the server's."""
    parsed = make_url(url)
    return parsed.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def test_slow_provider_never_delays_the_event_api(tmp_path, server_factory, fake_twilio):
    server = server_factory(tmp_path, base_config(tmp_path, provider=twilio_section(fake_twilio)))
    server.start()
    fake_twilio.script(Delay(5.0))
    assert server.post(SAMPLE).status_code == 202
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)  # the provider is now stuck
    for n in range(5):
        response = server.post({**SAMPLE, "key": f"order:{n}:paid", "kind": "order.paid"})
        assert response.status_code == 202
    # All five were answered while the provider still held the first request.
    assert fake_twilio.requests[0].at + 5.0 > time.monotonic()
    assert [m["status"] for m in server.messages()].count("sending") == 1


def test_kill_9_loses_nothing_and_sends_nothing_twice(tmp_path, server_factory, fake_twilio):
    config = base_config(tmp_path, provider=twilio_section(fake_twilio))
    server = server_factory(tmp_path, config).start()
    fake_twilio.script(Delay(30.0))  # the first request hangs at the provider
    keys = [f"order:{n}:created" for n in range(5)]
    for n, key in enumerate(keys):
        event = {**SAMPLE, "key": key, "data": {"order": {"number": f"#{n}", "total": "$1.00"}}}
        assert server.post(event).status_code == 202
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
    server.stop(signal.SIGKILL)
    in_flight_body = fake_twilio.requests[0].form["Body"]

    server.start()  # the same database, a new process
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 5, timeout=15)
    wait_until(
        lambda: (
            sorted(m["status"] for m in server.messages())
            == ["sent", "sent", "sent", "sent", "unknown"]
        ),
        timeout=15,
    )
    bodies = [r.form["Body"] for r in fake_twilio.requests]
    assert len(set(bodies)) == 5  # each message reached the provider exactly once
    assert bodies.count(in_flight_body) == 1
    unknown = [m for m in server.messages() if m["status"] == "unknown"]
    assert unknown[0]["reason"] == "interrupted"
    assert len(server.messages()) == 5


def test_kill_9_mid_window_settles_every_marked_message_once(tmp_path, server_factory, fake_twilio):
    # Twilio can be asked about a message, so the worker may mark several at a time in flight.
    config = base_config(
        tmp_path,
        provider=twilio_section(fake_twilio),
        worker={"unknown_grace_seconds": 0, "in_flight_window": 8},
    )
    server = server_factory(tmp_path, config).start()
    fake_twilio.script(Delay(30.0))  # the first request hangs at the provider
    batch = [
        {**SAMPLE, "key": f"order:{n}:created", "data": {"order": {"number": f"#{n}"}}}
        for n in range(5)
    ]
    assert server.post({"events": batch}).status_code == 202  # one commit: one claim
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
    server.stop(signal.SIGKILL)  # one request on the wire, four marked but never sent

    server.start()
    wait_until(lambda: [m["status"] for m in server.messages()] == ["sent"] * 5, timeout=20)
    bodies = [r.form["Body"] for r in fake_twilio.requests if r.method == "POST"]
    assert len(bodies) == 5 and len(set(bodies)) == 5  # each message reached Twilio once
    reasons = sorted(str(m["reason"]) for m in server.messages())
    assert reasons.count("settled_by_lookup") == 1  # the one on the wire was found there
    # The four that never left were not found, so each was sent once after the restart.
    assert server.err.read_text().count("settled: resend_after_lookup") == 4


def test_no_plaintext_number_or_secret_in_database_or_logs(tmp_path, server_factory, fake_twilio):
    server = server_factory(tmp_path, base_config(tmp_path, provider=twilio_section(fake_twilio)))
    server.start()
    server.post(SAMPLE)
    server.post({**SAMPLE, "key": "bad", "recipient": {"phone": "+1 555 555 5555"}})
    server.post({**SAMPLE, "key": "k2"}, token="wrong-token-0123456789abc")
    fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 1)
    server.cli("consent", "opt-out", "+1 415 555 0100")
    server.cli("messages", "--phone", "+1 415 555 0100")
    assert server.stop() == 0
    secrets = [
        b"4155550100",
        b"555 0100",
        b"5555555",
        fake_twilio.auth_token.encode(),
        API_TOKEN.encode(),
        b"wrong-token-0123456789abc",
        KEY.encode(),
    ]
    files = [p for p in tmp_path.iterdir() if p.name.startswith("txsms.db")]
    files += [server.out, server.err]
    assert len(files) >= 3
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret!r} found in {path.name}"


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("provider", {"rate_per_secnd": 3}, "provider.rate_per_secnd"),
        ("sender", {"default_region": "XX"}, "sender.default_region"),
        (
            'templates."order.created"',
            {"body": "{{ ''.__class__.__mro__ }}"},
            "templates.order.created",
        ),
        ('templates."order.paid"', {"body": "{% if %}"}, "templates.order.paid"),
    ],
)
def test_bad_config_stops_start_up_with_one_line(tmp_path, section, values, expected):
    config = base_config(tmp_path)
    config[section] = values
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(config))
    done = subprocess.run(
        [TXSMS, "serve", "--config", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "bad.toml" in lines[0] and expected in lines[0]
    assert not (tmp_path / "txsms.db").exists()


@pytest.mark.parametrize(
    ("preload", "section", "values", "expected"),
    [
        (False, "provider", {"kind": "twilo"}, "bad.toml: provider.kind: unknown provider kind"),
        (True, "provider", {"kind": "twilo"}, "bad.toml: provider.kind: unknown provider kind"),
        (True, 'templates."order.paid"', {"body": "{% if %}"}, "bad.toml: templates.order.paid"),
        (
            False,
            "storage",
            {"url": "sqlite:////nonexistent-dir/txsms.db"},
            "storage.url: the database is unavailable (OperationalError",
        ),
    ],
)
def test_gunicorn_stops_on_a_bad_config_or_database_with_one_line(
    tmp_path, preload, section, values, expected
):
    """The README's `gunicorn 'txsms.webhooks:create_app()'`: the line the commands print,
    not a traceback; and gunicorn stops (its status for an app that cannot load) instead of
    starting new workers that fail the same way. One worker: when several fail at the same
    moment, gunicorn's master may print a traceback of its own (its HaltServer, raised again
    while it stops)."""
    config = base_config(tmp_path)
    config[section] = {**config.get(section, {}), **values}
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(config))
    workers = "2" if preload else "1"  # with --preload the master loads it, once
    command = [str(Path(sys.executable).parent / "gunicorn"), "-w", workers, "--no-control-socket"]
    command += ["-b", f"127.0.0.1:{free_port()}", *(["--preload"] if preload else [])]
    done = subprocess.run(
        [*command, "txsms.webhooks:create_app()"],
        cwd=tmp_path,
        env={**os.environ, "TXSMS_CONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
