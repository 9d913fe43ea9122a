"""Shared test set-up: offline, seeded, tiny; meddata tests skip where the folder is absent."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MEDDATA = Path(os.environ.get("SYNTHMED_MEDDATA", REPO_ROOT.parent / "shared" / "meddata"))


@pytest.fixture
def meddata() -> Path:
    if not MEDDATA.is_dir():
        pytest.skip(f"real images not available: {MEDDATA} is absent (set SYNTHMED_MEDDATA to its location)")
    return MEDDATA


@pytest.fixture
def tiny_config():
    from pipelines.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def embedder():
    """The packaged MiniLM, loaded once (offline)."""
    from knowledge.embedder import Embedder

    return Embedder()


def pytest_collection_modifyitems(config, items):
    """Tests that read the real images carry the ``meddata`` marker (``-m "not meddata"`` leaves them out)."""
    for item in items:
        if "meddata" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.meddata)
