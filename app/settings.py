"""All service settings in one place, read from VAE_* environment variables (and vae-serve's options)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # vae-serve also takes every setting as an option (--models-dir, --port ...; app/cli.py)
    model_config = SettingsConfigDict(env_prefix="VAE_", protected_namespaces=(), cli_kebab_case=True,
                                      cli_prog_name="vae-serve")

    models_dir: Path = Field(Path("models"), description="folder of the TorchScript artifacts served: flat *.pt "
                             "files (version 1 of the model their meta.json names) and <name>/<version>/model.pt "
                             "(Triton's layout; every version is served, the newest by default)")
    default_model: str = Field("vae", description="model used when a request names none (?model=NAME)")
    model_poll_s: float = Field(2.0, ge=0, description="how often the models folder is looked at: a new, replaced "
                                "or removed artifact is loaded, swapped in or dropped without a restart once it has "
                                "stopped changing for one look (0 = only at start-up and through the repository "
                                "API); a file that fails its checks is refused with one log line and the version "
                                "it would replace keeps serving")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when torch.cuda.is_available(), else CPU; cuda without a GPU falls back "
        "to CPU with a warning")
    host: str = Field("127.0.0.1", description="vae-serve bind address (the container sets 0.0.0.0)")
    port: int = Field(8000, description="vae-serve port")
    grpc_port: int = Field(8081, ge=0, le=65535, description="port of the Open Inference Protocol's gRPC "
                           "service and the standard gRPC health service (KServe's default; 0 = off), on "
                           "VAE_HOST; shared by every worker; TLS with VAE_SSL_CERTFILE's certificate when set")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="app log level; info logs one JSON line per request (app.access)")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: `time level logger: message` lines; json: one JSON object per line for every "
        "log record (time, level, logger, message; an access record's fields, trace id included, at the top level)")
    workers: int = Field(1, ge=1, description="vae-serve: worker processes sharing the port, each with its own "
                         "models, batching and in-flight limit, and ~400 MB of its own memory (torch's runtime); "
                         "on CPU each gets its share of the cores as torch threads. More workers: more throughput "
                         "under concurrent load, slower lone requests (docs/benchmarks.md#workers)")
    threads: int = Field(0, ge=0, description="torch intra-op threads per worker, set once at start-up; 0 = on CPU "
                         "the worker's share of the cores for short passes (they run on the event loop) and one "
                         "less for the compute thread, torch's default on GPU; 1 suits traffic dominated by large "
                         "anomaly scores")

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body accepted (413 above)")
    max_image_pixels: int = Field(16_000_000, ge=784, description="largest decoded image, width x height "
                                  "(413 above; guards against decompression bombs)")
    decoders: int = Field(0, ge=0, description="image decoder processes per worker (every image but a small "
                          "28x28 grey PNG is decoded in one, stopped at the request's deadline); 0 = twice the "
                          "cores, at least 4 and at most 16, so that an ordinary photo finds one while bombs run")
    max_batch: int = Field(64, ge=1, description="most images in one request (413 above)")
    max_samples: int = Field(256, ge=1, description="largest n for /sample (413 above)")
    default_k: int | None = Field(None, ge=1, description="importance samples for /anomaly-score when the request "
                                  "gives none; unset: each model's calibration k (64 for the bundled models), the "
                                  "only k at which percentiles mean what they say")
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    max_neighbours: int = Field(100, ge=1, description="largest k for /similar (422 above)")
    default_threshold_percentile: float = Field(
        99.0, gt=0, lt=100, description="an image scoring above this percentile of the calibration set is an anomaly")

    batch_max_size: int = Field(64, ge=1, description="dynamic batching: most images in one forward pass")
    batch_max_wait_us: int = Field(0, ge=0, description="dynamic batching: how long a forward pass waits for "
                                   "more requests once one is queued (0 = only what is already queued)")
    batch_max_samples: int = Field(1024, ge=1, description="anomaly scores: most images x importance samples k "
                                   "in one forward pass; a larger request runs as several passes with other "
                                   "requests' passes between them, so that no request holds the others for long "
                                   "(64 images at k=1000: 64 passes of one image each)")
    inline_max_us: int = Field(5000, ge=0, description="a forward pass expected (from measured passes) to take "
                               "less runs on the event loop thread, saving a thread hand-off; longer ones run on "
                               "the compute thread so the service keeps answering (0 = always the compute thread); "
                               "above a one-image anomaly score under load, which otherwise alternates between the two")
    max_in_flight: int = Field(256, ge=1, description="most model requests in progress at once; beyond it the "
                               "service answers 503 with Retry-After at once instead of queueing")
    max_receiving: int = Field(1024, ge=1, description="most uploads still arriving at once (a request counts "
                               "against VAE_MAX_IN_FLIGHT only once its body is in); beyond it 503 at once")
    max_connections: int = Field(2048, ge=1, description="vae-serve: most open connections plus requests in "
                                 "progress (uvicorn's limit_concurrency); a request beyond it is answered 503 at "
                                 "once, so that a connection flood cannot exhaust memory or file descriptors")
    header_timeout_s: float = Field(5.0, gt=0, description="vae-serve: a request's head (request line and "
                                    "headers) must arrive within this long of its first byte; 408 and the "
                                    "connection closed after")
    max_header_bytes: int = Field(32768, ge=1024, description="vae-serve: largest request head (request line and "
                                  "headers); 431 and the connection closed above")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this long of its "
                                  "head (10 MB takes 30 s at 2.8 Mbit/s); 408 and the connection closed after")
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request's images may take to decode, "
                                     "and longest it may wait for its forward pass (504 after either)")
    keep_alive_s: float = Field(75.0, gt=0, description="vae-serve: how long an idle keep-alive connection stays "
                                "open; longer than clients' and proxies' own idle timeouts (httpx 5 s, nginx and "
                                "cloud load balancers 60 s), so that they close first: a server that closes first "
                                "races the client's next request on that connection, which then fails with a reset")
    drain_delay_s: float = Field(5.0, ge=0, description="on SIGTERM: first report not ready (/readyz 503) and "
                                 "keep answering, with Connection: close, for this long, so that load balancers "
                                 "and clients move off before the server stops accepting")
    shutdown_grace_s: float = Field(20.0, gt=0, description="on SIGTERM, after the drain delay: stop accepting, let "
                                    "in-flight requests finish for at most this long, then exit 0")
    allowed_hosts: str = Field("*", description="comma-separated host names the Host header may name (400 for "
                               "others), or * for any; vae-serve bound to a loopback address defaults to "
                               "localhost,127.0.0.1,::1 (DNS rebinding)")
    allowed_origins: str = Field("", description="comma-separated origins (https://app.example.com) whose web "
                                 "pages may call the service from a browser, or *; requests from the service's own "
                                 "page always may, those from any other page get 403")
    api_keys: SecretStr | None = Field(None, description="comma-separated API keys; when set (or api_keys_file), "
                                       "every endpoint but the page, docs, health, readiness and metrics needs "
                                       "'Authorization: Bearer <key>' (401 otherwise)")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (a Kubernetes Secret), "
                                       "added to api_keys")
    open_ops: bool = Field(True, description="with API keys: health, readiness and metrics answer without one; "
                           "false: they need one too")
    ssl_certfile: Path | None = Field(None, description="vae-serve: serve HTTPS with this PEM certificate (chain)")
    ssl_keyfile: Path | None = Field(None, description="vae-serve: the certificate's PEM private key")
    page: bool = Field(True, description="serve the interactive page at GET / (its files under /static); false: "
                       "/ redirects to /docs, for API-only deployments")
    metrics: bool = Field(True, description="serve Prometheus metrics at GET /metrics (and count them); false: "
                          "neither")
    bare_endpoint: bool = Field(False, description="serve POST /_bare, which only reads the body: the HTTP "
                                "ceiling the benchmark compares against")


    def api_key_list(self) -> list[str]:
        """The keys of api_keys and api_keys_file, blank lines and spaces left out."""
        keys = self.api_keys.get_secret_value().split(",") if self.api_keys else []
        if self.api_keys_file is not None:
            keys += self.api_keys_file.read_text().splitlines()
        return [k.strip() for k in keys if k.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
