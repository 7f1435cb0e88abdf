"""Shared test fixtures. Tests never touch ~/.cache/picochat: every test gets its own $PICOCHAT_DIR."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(autouse=True)
def tmp_base_dir(tmp_path, monkeypatch):
    """Point $PICOCHAT_DIR at a fresh temporary folder (autouse: no test can write the user's cache)."""
    base = tmp_path / "picochat"
    base.mkdir()
    monkeypatch.setenv("PICOCHAT_DIR", str(base))
    return str(base)


def shared_data(name):
    """Path of a file in ../shared/data, or skip the test when it is absent."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path
