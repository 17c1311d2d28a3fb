"""The README documents every setting, and its table is the one the Settings class produces."""

from __future__ import annotations

from app.settings import Settings
from scripts.settings_table import table
from tests.conftest import REPO


def test_readme_configuration_table_matches_settings() -> None:
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`VAE_{name.upper()}`" in readme, name
    assert table() in readme
