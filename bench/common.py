"""What the benchmarks share: child processes, readiness checks, fresh databases, the machine."""

from __future__ import annotations

import contextlib
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
API_TOKEN = "bench-api-token-0123456789abcdef"
KEY = Fernet.generate_key().decode()
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
    return url, f"PostgreSQL {version.split()[0]}"


@contextlib.contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated database: a SQLite file, or a PostgreSQL schema dropped afterwards."""
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
        engine = storage.make_engine(StorageConfig(url=url))
        storage.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        if admin is not None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
            admin.dispose()


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
    }
