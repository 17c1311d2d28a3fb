"""vae-serve: run the service with uvicorn using the VAE_* settings."""

from __future__ import annotations

import signal
import sys

import uvicorn

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
          f"http://{settings.host}:{settings.port} (docs at /docs)", flush=True)
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s,
                timeout_keep_alive=settings.keep_alive_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
