"""Periodic background jobs inside `txsms serve` (reconciliation, CRM polls).

A job is a name, an interval and a callable; each runs on its own thread so a slow job never
delays another, and an exception is logged and retried at the next interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from txsms.core.storage import log_failure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    name: str
    interval_seconds: float
    run: Callable[[], object]


class Scheduler:
    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for job in self.jobs:
            thread = threading.Thread(
                target=self._loop, args=(job,), daemon=True, name=f"txsms-job-{job.name}"
            )
            thread.start()
            self._threads.append(thread)
            log.info("background job %s every %ss", job.name, job.interval_seconds)

    def _loop(self, job: Job) -> None:
        while not self.stop_event.wait(job.interval_seconds):
            try:
                job.run()
            except Exception:
                log_failure(
                    log, "background job %s failed; next try in %ss", job.name, job.interval_seconds
                )

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)
