"""Shared test set-up: offline, seeded, tiny; meddata tests skip where the folder is absent."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.pop("SYNTHMED_HOME", None)  # a workspace of the person running the tests would move every relative path
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one thread per worker (and the processes it starts), or the
    os.environ["OMP_NUM_THREADS"] = "1"  # workers' thread pools fight over the cores and the suite is barely faster
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MEDDATA = Path(os.environ.get("SYNTHMED_MEDDATA", REPO_ROOT.parent / "shared" / "meddata"))


@pytest.fixture
def meddata() -> Path:
    if not MEDDATA.is_dir():
        pytest.skip(f"real images not available: {MEDDATA} is absent (set SYNTHMED_MEDDATA to its location)")
    return MEDDATA


@pytest.fixture
def one_thread():
    """One torch thread for a test of small tensors: fastest, and spares the cores of other jobs. A module asks for it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config():
    from pipelines.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def embedder():
    """The packaged MiniLM, loaded once (offline)."""
    from knowledge.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def train_manifest(tmp_path_factory) -> Path:
    """A stand-in for the generator's training set (`synthmed synthesize --train-data`): two smooth random images per
    modality, far from anything drawn."""
    import csv

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    rows = []
    for modality, channels in (("cxr", 1), ("chest_ct", 1), ("fundus", 3), ("oct", 1)):
        for i in range(2):
            small = rng.integers(0, 255, (8, 8, channels), dtype=np.uint8)
            image = Image.fromarray(small.squeeze()).resize((64, 64), Image.BILINEAR)
            path = folder / f"{modality}_{i}.png"
            image.save(path)
            rows.append([path.name, "training image", modality])
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "text", "modality"], *rows])
    return folder / "manifest.csv"


def pytest_collection_modifyitems(config, items):
    """Tests that read the real images carry the ``meddata`` marker (``-m "not meddata"`` leaves them out)."""
    for item in items:
        if "meddata" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.meddata)
