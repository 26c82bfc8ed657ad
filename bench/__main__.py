"""`make bench`: run the benchmarks, print one table, write it to BENCHMARKS.md.

.venv/bin/python -m bench [--seconds 10] [--only ingest|send]
TXSMS_BENCH_DATABASE_URL=postgresql://... adds PostgreSQL rows (a schema made and dropped).
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from bench import fake_provider, ingest, send
from bench.common import ROOT, database, machine, postgres_url

# The targets, from the project's issue.
INGEST_RATIO, INGEST_P99_MS, SEND_RATIO = 0.33, 25.0, 0.8
COLUMNS = ("Benchmark", "Database", "Result", "p50 ms", "p99 ms", "Errors", "CPU", "Limit", "Met")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured load per ingest run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured load before it")
    p.add_argument("--connections", type=int, default=16, help="concurrent keep-alive clients")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--messages", type=int, default=2000, help="messages per send run")
    p.add_argument("--only", choices=("ingest", "send"), help="run one benchmark")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    pg_url, pg_desc = postgres_url()
    kinds = ["sqlite"] + (["postgresql"] if pg_url else [])
    rows: list[tuple] = []
    with TemporaryDirectory(prefix="txsms-bench-") as name, ExitStack() as stack:
        tmp = Path(name)
        fake = fake_provider.launch(stack, tmp / "fake.log")
        if args.only in (None, "ingest"):
            rows += run_ingest(args, tmp, kinds, fake)
        if args.only in (None, "send"):
            rows += run_send(args, tmp, kinds, fake)
    report = render(args, rows, pg_desc, bool(pg_url))
    print("\n" + report)
    args.output.write_text(report)
    print(f"written to {args.output}", file=sys.stderr)


def run_ingest(args, tmp: Path, kinds: list[str], fake: str) -> list[tuple]:
    from txsms.core.config import ServerConfig

    threads = ServerConfig().threads
    say(f"ingest: bare Flask on waitress ({threads} threads), {args.seconds:g} s")
    base = ingest.bare(args, tmp, threads)
    rows = [("bare Flask route, waitress", "-", f"{base.rps:,.0f} req/s", *_load_cols(base))]
    rows[0] += ("baseline", "")
    for kind in kinds:
        say(f"ingest: txsms serve on {kind}, {args.seconds:g} s")
        with database(kind, tmp) as url:
            r = ingest.txsms(args, tmp, url, fake)
        ratio = r.rps / base.rps
        missed = [
            what
            for what, ok in (
                ("ratio", ratio >= INGEST_RATIO),
                ("p99", r.p99_ms <= INGEST_P99_MS),
                ("errors", r.errors == 0),
            )
            if not ok
        ]
        rows.append(
            (
                "ingest `POST /api/v1/events`",
                kind,
                f"{r.rps:,.0f} req/s = {ratio:.2f} x bare",
                *_load_cols(r),
                f">= {INGEST_RATIO} x bare, p99 <= {INGEST_P99_MS:g} ms, 0 errors",
                "no: " + ", ".join(missed) if missed else "yes",
            )
        )
    return rows


def _load_cols(r) -> tuple:
    cpu = f"{r.server_cpu:.2f} + {r.client_cpu:.2f}" if r.server_cpu is not None else "-"
    return f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.errors), cpu


def run_send(args, tmp: Path, kinds: list[str], fake: str) -> list[tuple]:
    send.production_logging(tmp / "send.log")
    rows, base = [], None
    for kind in kinds:
        for concurrency in (1, 4):
            with database(kind, tmp) as url:
                rt = send.runtime(url, fake, tmp)
                try:
                    send.fill(rt, args.messages)
                    if base is None:
                        say(f"send: bare requests.Session loop, {args.messages} messages")
                        base = _timed(send.bare, fake, send.forms(rt))
                        rows.append(("bare `requests.Session` loop", "-", *_send_cols(base)))
                        rows[-1] += ("baseline", "")
                    say(f"send: Worker(concurrency={concurrency}) on {kind}")
                    r = _timed(send.worker, rt, concurrency, args.messages)
                finally:
                    rt.close()
            ratio = r[0].rate / base[0].rate
            if concurrency == 1:
                met = ratio >= SEND_RATIO and r[0].errors == 0
                limit = (f">= {SEND_RATIO} x bare", "yes" if met else "no")
            else:
                limit = ("(no target)", "")
            name = f"send, Worker(concurrency={concurrency})"
            rows.append((name, kind, *_send_cols(r, ratio), *limit))
    return rows


def _timed(fn, *args):
    """`fn(*args)` and the cores this process kept busy meanwhile."""
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fn(*args)
    usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    return result, cpu / (wall1 - wall0)


def _send_cols(timed, ratio: float | None = None) -> tuple:
    r, cpu = timed
    result = f"{r.rate:,.0f} msg/s" + (f" = {ratio:.2f} x bare" if ratio is not None else "")
    return result, "-", "-", str(r.errors), f"{cpu:.2f}"


def render(args, rows: list[tuple], pg_desc: str, with_pg: bool) -> str:
    command = shlex.join([".venv/bin/python", "-m", "bench", *sys.argv[1:]])
    if with_pg:
        command = "TXSMS_BENCH_DATABASE_URL=postgresql+psycopg://…/test " + command
    table = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
    info = machine(pg_desc)
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Command: `{command}` (what `make bench` runs, plus the flags shown)  ",
            f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
            "",
            *table,
            "",
            NOTES.format(a=args).strip(),
            "",
        ]
    )


NOTES = """
How to read it:

- **ingest**: {a.connections} keep-alive connections, one request in flight on each, from
  {a.procs} load generator process(es) (`http.client`, a thread per connection); {a.warmup:g} s
  of warm-up, then {a.seconds:g} s measured. Every request is a distinct `order.created` event.
  `txsms serve` runs in its own process exactly as in production (waitress, the default thread
  count, INFO logging, and its in-process worker sending to a fake Twilio in a third process);
  the baseline is the same waitress with the same threads serving a Flask route that reads the
  body and answers 200. Afterwards, the number of stored events must equal the 202s.
- **send**: {a.messages} messages queued through `txsms.core.pipeline.ingest`, then a `Worker`
  (`rate_per_second` 100000) sends them to the fake Twilio in its own process; the rate runs
  until the last message is recorded. The baseline POSTs the same form bodies from one
  `requests.Session` loop to the same fake.
- **CPU**: cores kept busy over the measured time. Ingest: server process + load generator;
  send: the sending process. The machine has nproc cores for everything, fake included.
""".replace("nproc", "`nproc`")


def say(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
