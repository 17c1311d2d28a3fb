"""vae-serve: run the service with uvicorn using the VAE_* settings."""

from __future__ import annotations

import logging
import sys

import uvicorn

from app.settings import get_settings


def main() -> int:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"vae-serve: models from {settings.models_dir.resolve()}, serving on "
          f"http://{settings.host}:{settings.port} (docs at /docs)", flush=True)
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
