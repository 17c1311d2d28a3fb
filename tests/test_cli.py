"""vae-serve as a process: workers, their share of the cores, start-up failure, keep-alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app import cli
from app.settings import Settings
from app.tuning import thread_counts
from tests.conftest import REPO, TEST_DATA, vae_serve

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """vae-serve writes its settings into the environment for its workers (VAE_ALLOWED_HOSTS among
    them): what cli.main writes here must not reach the tests that follow."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_workers_share_the_cores(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert thread_counts(0, cpu) == (8, 7)  # one worker: every core on the event loop, one less on the thread
    assert thread_counts(0, cpu, workers=2) == (4, 3)
    assert thread_counts(0, cpu, workers=8) == (1, 1)
    assert thread_counts(0, cpu, workers=16) == (1, 1)  # more workers than cores: never 0 (torch's default)
    assert thread_counts(3, cpu, workers=2) == (3, 3)  # VAE_THREADS wins
    assert thread_counts(0, torch.device("cuda"), workers=2) == (0, 0)


@pytest.mark.slow
def test_two_workers_serve_and_stop_cleanly(models_dir: Path) -> None:
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), "VAE_WORKERS": "2"}) as (base, proc):
        with httpx.Client(base_url=base, timeout=30) as client:
            r = client.post("/encode", content=DIGIT, headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and len(r.json()["mu"]) == r.json()["latent_dim"]
            answered_by = client.get("/models").json()["worker_pid"]
        assert answered_by != proc.pid  # a worker process answered, not the supervisor
    # vae_serve checked that SIGTERM stopped every worker and the supervisor exited 0


@pytest.mark.slow
def test_workers_that_cannot_load_the_models_fail_the_start(tmp_path: Path) -> None:
    env = {**os.environ, "VAE_MODELS_DIR": str(tmp_path / "missing"), "VAE_WORKERS": "2", "VAE_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "app.cli"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 3, done.stderr  # as with one worker: uvicorn alone would exit 0 here
    assert "models folder does not exist" in done.stderr


def test_vae_serve_outlasts_client_keep_alive(monkeypatch) -> None:
    """The server must not close idle connections before clients do, or a client's next request
    on one races the close and fails with a reset (seen in the soak with uvicorn's default 5 s)."""
    seen: dict = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main([]) == 0  # the settings read afresh: from_options clears get_settings' cache
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert seen["timeout_keep_alive"] > max(httpx.Limits().keepalive_expiry or 0, 60)  # httpx 5 s; proxies 60 s


def test_options_set_the_settings_over_the_environment_for_every_worker(monkeypatch) -> None:
    """`vae-serve --port 9123` must serve on 9123: the options override VAE_*, and are written back into
    the environment, which the app (and each worker process) reads its settings from."""
    seen: dict = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setenv("VAE_PORT", "7000")
    monkeypatch.setenv("VAE_DEFAULT_K", "8")
    monkeypatch.setenv("VAE_PAGE", "true")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(["--port", "9123", "--default-k", "null", "--page", "false"]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        cli.get_settings.cache_clear()
    assert seen["port"] == 9123
    assert os.environ["VAE_PORT"] == "9123" and os.environ["VAE_PAGE"] == "false" and "VAE_DEFAULT_K" not in os.environ
    settings = Settings()
    assert (settings.port, settings.page, settings.default_k) == (9123, False, None)


def test_a_bad_option_is_refused_before_anything_starts(monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli.uvicorn, "run", lambda *args, **kwargs: pytest.fail("started"))
    assert cli.main(["--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--prot", "9000"])
    assert e.value.code == 2 and "unrecognized arguments: --prot" in capsys.readouterr().err
