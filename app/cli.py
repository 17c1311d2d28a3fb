"""vae-serve: run the service with uvicorn using the VAE_* settings, or the same settings as options
(`vae-serve --port 9000 --models-dir DIR`; `vae-serve --help` lists them)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from pydantic import SecretStr, ValidationError
from pydantic_settings import CliApp

from app import logs
from app.access import LOOPBACK_HOSTS, is_loopback
from app.settings import Settings, get_settings
from app.supervisor import STATUS_ENV, Supervisor


def _exit_cleanly(signum: int, frame: object) -> None:
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal; by then
    # the shutdown was orderly, so report success instead of dying by the signal.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = from_options(sys.argv[1:] if argv is None else argv)
    except ValidationError as e:
        print(f"vae-serve: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    scheme = "https" if settings.ssl_certfile else "http"
    print(f"vae-serve: models from {settings.models_dir.resolve()}, serving on {scheme}://{settings.host}:"
          f"{settings.port} with {settings.workers} worker(s) (docs at /docs)", flush=True)
    # Which layer bounds what: uvicorn the connections (limit_concurrency) and idle keep-alive time;
    # app/server.py the request head (time, size); app/middleware.py the body and the work.
    if is_loopback(settings.host) and "VAE_ALLOWED_HOSTS" not in os.environ:
        os.environ["VAE_ALLOWED_HOSTS"] = ",".join(LOOPBACK_HOSTS)  # app/access.py: DNS rebinding
    options = {"host": settings.host, "port": settings.port, "log_level": settings.log_level, "access_log": False,
               "timeout_graceful_shutdown": settings.shutdown_grace_s, "timeout_keep_alive": settings.keep_alive_s,
               "limit_concurrency": settings.max_connections, "http": "app.server:GuardedHttpToolsProtocol",
               "ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    if settings.log_format == "json":
        options["log_config"] = logs.uvicorn_config(settings.log_format)
    if settings.workers == 1:
        uvicorn.run("app.main:create_app", factory=True, **options)  # exits with status 3 itself when start-up fails
        return 0
    # Several workers: app/supervisor.py restarts each alone, and keeps the others serving while one
    # cannot start; it exits 3 (as one worker does) when none can start.
    with shared_metrics_dir(settings.metrics), supervisor_status_file() as status_file:
        config = uvicorn.Config("app.main:create_app", factory=True, **options)
        return Supervisor(config, settings.workers, status_file).run()


def from_options(argv: list[str]) -> Settings:
    """Options over the VAE_* variables (pydantic-settings' command line: --port 9000, --page false,
    --default-k null), written back into the environment: the app and its worker processes read
    their settings from there, not from this command line."""
    chosen = CliApp.run(Settings, cli_args=argv)
    for name, value in chosen.model_dump(mode="json", include=chosen.model_fields_set).items():
        secret = getattr(chosen, name)
        if isinstance(secret, SecretStr):  # dumped as "**********": the workers need the key itself
            value = secret.get_secret_value()
        if value is None:
            os.environ.pop(f"VAE_{name.upper()}", None)
        else:
            os.environ[f"VAE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    get_settings.cache_clear()
    return chosen


@contextmanager
def supervisor_status_file() -> Iterator[Path]:
    """Where the supervisor writes its workers' status for /readyz; the workers inherit the variable."""
    folder = Path(tempfile.mkdtemp(prefix="vae-supervisor-"))
    os.environ[STATUS_ENV] = str(folder / "status.json")
    try:
        yield folder / "status.json"
    finally:
        del os.environ[STATUS_ENV]
        shutil.rmtree(folder, ignore_errors=True)


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
