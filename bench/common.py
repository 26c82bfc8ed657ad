"""What the benchmarks share: child processes, readiness checks, fresh databases, the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TXSMS = str(Path(sys.executable).with_name("txsms"))
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
API_TOKEN = "bench-api-token-0123456789abcdef"
KEY = Fernet.generate_key().decode()
INDEX_KEY = "bench-index-key-0123456789abcdef"
TICKS = os.sysconf("SC_CLK_TCK")


# -- child processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a child with its stderr (and stdout unless given) in `log`."""
    with open(log, "wb") as out:
        kwargs.setdefault("stdout", out)
        return subprocess.Popen(cmd, cwd=ROOT, stderr=out, **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream:
            stream.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 200; fail if the child exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f}s (log: {log})")
        time.sleep(0.05)


def wait_log(
    log: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0, count: int = 1
) -> list[str]:
    """Wait until the child's log has `count` lines saying `text` (returned); fail if it exits
    or the deadline passes."""
    deadline = time.monotonic() + timeout
    while (
        len(lines := [x for x in log.read_text(errors="replace").splitlines() if text in x]) < count
    ):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not logged after {timeout:.0f}s (log: {log})")
        time.sleep(0.05)
    return lines


GUNICORN_WORKERS = 2
READY = "bench: worker ready pid="  # logged by bench/gunicorn_conf.py once a worker loaded the app


def gunicorn(
    app: str,
    log: Path,
    worker_class: str = "sync",
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, int, tuple[int, ...]]:
    """`gunicorn -w 2 -k <class>` serving `app` (a WSGI spec such as
    'txsms.webhooks:create_app()'); returns once both workers have loaded it:
    (master, port, worker pids)."""
    port = free_port()
    cmd = [GUNICORN, "-w", str(GUNICORN_WORKERS), "-k", worker_class, "-b", f"127.0.0.1:{port}"]
    cmd += ["--no-control-socket"]  # gunicorn 27's default socket path is shared by every run
    if worker_class == "gthread":
        cmd += ["--threads", str(threads)]
    proc = start([*cmd, "-c", "python:bench.gunicorn_conf", app], log, env=env)
    try:
        lines = wait_log(log, READY, proc, count=GUNICORN_WORKERS)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port, tuple(int(x.split(READY)[1].split()[0]) for x in lines)


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def loadavg() -> str:
    """The 1-minute load average now: recorded beside every measurement."""
    return f"{os.getloadavg()[0]:.2f}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


# -- databases ---------------------------------------------------------------------------------


def _driver(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else url


def postgres_url() -> tuple[str | None, str]:
    """(URL, description) of the PostgreSQL to use, or (None, why not)."""
    url = os.environ.get("TXSMS_BENCH_DATABASE_URL") or os.environ.get("TXSMS_TEST_DATABASE_URL")
    if not url:
        return None, "not run (set TXSMS_BENCH_DATABASE_URL)"
    from sqlalchemy import create_engine, text

    url = _driver(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
    except Exception as exc:
        return None, f"unreachable ({type(exc).__name__})"
    finally:
        engine.dispose()
    return url, version.split()[0]


@contextlib.contextmanager
def database(kind: str, tmp: Path, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database, migrated unless told not to (`txsms db upgrade` does it then): a SQLite
    file, or a PostgreSQL schema dropped afterwards."""
    from sqlalchemy import create_engine, text

    from txsms.core import storage
    from txsms.core.config import StorageConfig

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp / (name + '.db')}"
    else:
        base, _ = postgres_url()
        admin = create_engine(base)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{name}"
    try:
        if migrate:
            engine = storage.make_engine(StorageConfig(url=url))
            storage.upgrade(engine)
            engine.dispose()
        yield url
    finally:
        if admin is not None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
            admin.dispose()


def security_section() -> dict:
    return {"keys": [KEY], "index_key": INDEX_KEY, "api_tokens": [API_TOKEN]}


def toml(sections: dict[str, dict | list[dict]]) -> str:
    """Enough TOML for a config: JSON scalars and lists of strings are valid TOML values; a
    list of tables is written as `[[name]]`."""
    lines = []
    for name, values in sections.items():
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{name}]]" if isinstance(values, list) else f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


# -- the machine -------------------------------------------------------------------------------


def machine(pg: str) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "CPU": model,
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": pg,
        "load average at the start": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }
