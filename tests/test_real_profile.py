"""The real profile (`--config real`): its shipped generator draws every modality offline, its two classifier
roles are independent networks, and a missing part says which command makes it."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import load_config

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "generator" / "weights" / "real"
JUDGES = REPO / "rlhf" / "weights" / "real"
PROMPTS = {
    "cxr": "Paediatric chest radiograph. Findings: pneumonia.",
    "chest_ct": "Axial chest CT slice. Findings: malignant pulmonary lesion.",
    "brain_mri": "Brain MRI. Findings: intra-axial mass consistent with glioma.",
    "fundus": "Colour fundus photograph, right eye. Findings: diabetic macular oedema; non-proliferative diabetic retinopathy.",
    "oct": "Macular OCT B-scan, left eye. Findings: diabetic macular oedema.",
}


def test_the_real_generator_is_complete_small_and_reproducible():
    assert (GENERATOR / "model.json").is_file(), "the real model is missing: `synthmed data meddata && synthmed train default --config real`"
    weights = list(GENERATOR.rglob("*.safetensors")) + list(JUDGES.rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in weights) < 60 * 2**20  # the whole real set
    meta = json.loads((GENERATOR / "metadata.json").read_text())
    assert meta["config"]["profile"] == "real" and meta["command"].startswith("synthmed train") and meta["vae"]["val_metrics"]["psnr"] > 20
    assert (GENERATOR / "MODEL_CARD.md").is_file()


@pytest.mark.parametrize("modality", list(PROMPTS))
def test_the_real_generator_samples_every_modality_offline(tmp_path, modality):
    out = tmp_path / modality
    assert main(["sample", PROMPTS[modality], "--config", "real", "--modality", modality, "--n", "2", "--steps", "4",
                 "--out", str(out)]) == 0
    arrays = [np.asarray(Image.open(p)) for p in sorted(out.glob(f"{modality}_*.png"))]
    assert len(arrays) == 2 and arrays[0].shape[:2] == (64, 64)
    assert arrays[0].ndim == (3 if load_config("real").data.modalities[modality].channels == 3 else 2)
    assert arrays[0].std() > 3 and not np.array_equal(arrays[0], arrays[1])


def test_the_real_judges_roles_share_no_weights():
    from safetensors.torch import load_file

    folder = JUDGES / "classifiers"
    if not folder.is_dir():
        pytest.skip("the real classifiers are not shipped yet: `synthmed judges train classifier --config real`")
    modalities = sorted(p.name for p in (folder / "evaluator").iterdir() if p.is_dir())
    assert set(modalities) == set(PROMPTS)
    for modality in modalities:
        reward = load_file(folder / "reward" / modality / "model.safetensors")
        evaluator = load_file(folder / "evaluator" / modality / "model.safetensors")
        evaluator_tensors = {(tuple(t.shape), t.flatten()[:16].tolist().__repr__()) for t in evaluator.values()}
        assert not any((tuple(t.shape), t.flatten()[:16].tolist().__repr__()) in evaluator_tensors for t in reward.values() if t.numel() > 1)
        meta = {role: json.loads((folder / role / modality / "metadata.json").read_text()) for role in ("reward", "evaluator")}
        assert meta["reward"]["seed"] != meta["evaluator"]["seed"] and meta["reward"]["arch"] != meta["evaluator"]["arch"]
        assert meta["reward"]["label_names"] == meta["evaluator"]["label_names"]


def test_config_real_without_its_model_names_the_command_that_makes_it(tmp_path, capsys):
    code = main(["sample", "Brain MRI. Findings: glioma.", "--config", "real", "--modality", "brain_mri", "--n", "1",
                 "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "synthmed train default --config" in err and len(err.strip().splitlines()) == 1
