"""The model shipped in generator/weights/default: complete, small, offline, and it draws."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "generator" / "weights" / "default"


def test_shipped_model_is_complete_and_under_budget():
    assert (SHIPPED / "model.json").is_file(), "the default model is missing: reproduce it with `synthmed train default`"
    weights = list(SHIPPED.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} >= {"vae", "unet", "default"}
    assert sum(p.stat().st_size for p in weights) < 60 * 2**20
    meta = json.loads((SHIPPED / "metadata.json").read_text())
    for key in ("config", "data", "seed", "steps", "seconds", "environment", "final_loss", "command", "vae"):
        assert key in meta, key
    assert meta["steps"] == meta["config"]["train"]["max_steps"]
    vae = meta["vae"]
    assert vae["val_metrics"]["psnr"] > 20 and 0 < vae["val_metrics"]["ssim"] <= 1
    assert meta["command"].startswith("synthmed train")


def test_sample_on_the_shipped_model_offline(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "Chest radiograph, PA view. Findings: large left pleural effusion.", "--modality", "CXR",
                 "--n", "2", "--steps", "4", "--seed", "3", "--out", str(out)]) == 0
    images = sorted(out.glob("cxr_*.png"))
    assert len(images) == 2
    arrays = [np.asarray(Image.open(p)) for p in images]
    assert arrays[0].shape == (64, 64)  # grey modality, the model's size
    assert not np.array_equal(arrays[0], arrays[1])  # seed + i per image
    assert arrays[0].std() > 5  # not blank
    record = json.loads((out / "samples.jsonl").read_text().splitlines()[-1])
    assert record["modality"] == "cxr" and record["steps"] == 4


@pytest.mark.parametrize("modality,channels", [("fundus", 3), ("brain_mri", 1)])
def test_shipped_model_draws_each_modality_in_its_colour_space(tmp_path, modality, channels):
    out = tmp_path / modality
    assert main(["sample", "normal study", "--modality", modality, "--n", "1", "--steps", "3", "--out", str(out)]) == 0
    array = np.asarray(Image.open(next(out.glob("*.png"))))
    assert array.ndim == (3 if channels == 3 else 2)
