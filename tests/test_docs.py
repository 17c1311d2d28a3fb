"""The docs document every setting, with the table the Settings class produces; their examples are what the
service answers; the site builds strictly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.settings import Settings
from scripts.settings_table import table
from tests.conftest import REPO, vae_serve


def test_the_configuration_page_table_matches_settings() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`VAE_{name.upper()}`" in page, name
    assert table() in page


@pytest.mark.slow
def test_readme_and_api_page_examples_are_what_the_service_answers() -> None:
    """The curl examples of README.md and docs/api.md and the tritonclient block's printed line, run against
    vae-serve on the bundled models (scripts/readme_examples.py)."""
    with vae_serve({"VAE_MODELS_DIR": str(REPO / "models")}) as (base, _):
        done = subprocess.run([sys.executable, "scripts/readme_examples.py", "--check", "--host",
                               base.removeprefix("http://")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_examples_check_catches_drift_but_not_float_noise() -> None:
    from scripts.readme_examples import same

    assert same('{"mu":[-0.4125671088695526,1.95]} 200', '{"mu":[-0.41256701946258545,1.95]} 200')
    assert not same('{"mu":[-0.41256,1.95]}', '{"mu":[-0.41356,1.95]}')  # a real change of value
    assert not same('{"error":"cannot decode image"} 415', '{"error":"cannot decode image"} 400')
    assert not same('"detail":"a"', '"detail":"b"')


@pytest.mark.slow
def test_device_parity_compares_every_answer_of_both_models(capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/device_parity.py, which scripts/gpu-check.sh runs where there is a GPU, here CPU against CPU:
    a row per answer and model, and the same device twice gives the same bits."""
    from scripts import device_parity

    assert device_parity.main(["--devices", "cpu", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("vae ", "vae-2d "))]
    answers = {"encode mu", "encode logvar", "reconstruct", "decode", "sample"} | {
        f"anomaly {m} {what}" for m in ("default", "bound") for what in ("score", "percentile", "flagged")}
    assert sorted((r[0], " ".join(r[1:-3])) for r in rows) == sorted((m, a) for m in ("vae", "vae-2d") for a in answers)
    assert {r[-3] for r in rows} == {"0.00e+00"}  # CPU against CPU: identical
    assert out.rstrip().endswith("PASS")


def test_device_parity_measures_differences_on_the_values_scale() -> None:
    import numpy as np

    from scripts.device_parity import gap

    assert gap(np.array([1.0, -4.0]), np.array([1.0, -3.0])) == 0.25
    assert gap(np.zeros(3), np.zeros(3)) == 0.0


def test_gpu_check_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu-check.sh")]).returncode == 0
