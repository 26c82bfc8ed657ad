"""A FakeTwilio in a process of its own, so its CPU does not compete for the sender's GIL.

python -m bench.fake_provider [--delay 0.2]   # prints the URL, serves until stdin closes or SIGTERM
"""

from __future__ import annotations

import argparse
import selectors
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from bench.common import PYTHON, ROOT, start, stop

sys.path.insert(0, str(ROOT / "tests"))
from fakes.twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio


def provider_section(url: str, **extra) -> dict:
    """The `[provider]` table pointing at the fake."""
    return {
        "kind": "twilio",
        "base_url": url,
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from": FROM_NUMBER,
        **extra,
    }


def launch(stack: ExitStack, log: Path, timeout: float = 30.0, delay: float = 0.0) -> str:
    """Start the fake as a child (stopped when `stack` closes); its URL once it listens.
    `delay`: seconds before every answer, as a real provider's API takes."""
    proc = start(
        [PYTHON, "-m", "bench.fake_provider", "--delay", str(delay)],
        log,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    stack.callback(stop, proc)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout) or not (line := proc.stdout.readline().decode().strip()):
            raise RuntimeError(f"fake provider did not start (log: {log})")
    return line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    delay = parser.parse_args().delay
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with FakeTwilio(record=False, delay=delay) as fake:  # listening once start() returns
        print(fake.url, flush=True)
        sys.stdin.read()  # EOF: the parent closed the pipe, or died


if __name__ == "__main__":
    main()
