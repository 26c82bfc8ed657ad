"""gunicorn settings of the benchmarks (`-c python:bench.gunicorn_conf`): only a line in the log
once each worker has loaded the app, so a run waits for both workers instead of sleeping."""

from bench.common import READY


def post_worker_init(worker) -> None:
    worker.log.info("%s%d", READY, worker.pid)
