"""vae-serve: run the service with uvicorn using the VAE_* settings."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from app.settings import get_settings


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal; by then
    # the shutdown was orderly, so report success instead of dying by the signal.
    raise SystemExit(0)


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    settings = get_settings()
    print(f"vae-serve: models from {settings.models_dir.resolve()}, serving on "
          f"http://{settings.host}:{settings.port} with {settings.workers} worker(s) (docs at /docs)", flush=True)
    # Which layer bounds what: uvicorn the connections (limit_concurrency) and idle keep-alive time;
    # app/server.py the request head (time, size); app/middleware.py the body and the work.
    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level, "access_log": False,
               "timeout_graceful_shutdown": settings.shutdown_grace_s, "timeout_keep_alive": settings.keep_alive_s,
               "limit_concurrency": settings.max_connections, "http": "app.server:GuardedHttpToolsProtocol"}
    if settings.workers == 1:
        uvicorn.run("app.main:create_app", factory=True, **options)  # exits with status 3 itself when start-up fails
        return 0
    # What uvicorn.run does for several workers, keeping hold of the supervisor: it stops when
    # a worker fails to start (a broken models folder) but returns as it does after SIGTERM, and
    # uvicorn.run would then exit 0. A failed start must stay a failure, as with one worker.
    with shared_metrics_dir(settings.metrics):
        config = uvicorn.Config("app.main:create_app", factory=True, workers=settings.workers, **options)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


@contextmanager
def shared_metrics_dir(enabled: bool) -> Iterator[None]:
    """Several workers: each writes its metrics to files in one folder, which any of them reads
    back for a scrape (prometheus-client's multiprocess mode); the workers inherit the variable."""
    if not enabled or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="vae-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
