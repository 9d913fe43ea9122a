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
        meta = {role: json.loads((folder / role / modality / "metadata.json").read_text()) for role in ("reward", "verifier", "evaluator")}
        assert meta["reward"]["seed"] != meta["evaluator"]["seed"] and meta["reward"]["arch"] != meta["evaluator"]["arch"]
        assert meta["verifier"]["seed"] not in (meta["reward"]["seed"], meta["evaluator"]["seed"])
        assert meta["verifier"]["arch"] != meta["evaluator"]["arch"] and meta["verifier"]["widths"] != meta["reward"]["widths"]
        assert meta["reward"]["label_names"] == meta["verifier"]["label_names"] == meta["evaluator"]["label_names"]


def test_config_real_without_its_model_names_the_command_that_makes_it(tmp_path, capsys):
    code = main(["sample", "Brain MRI. Findings: glioma.", "--config", "real", "--modality", "brain_mri", "--n", "1",
                 "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "synthmed train default --config" in err and len(err.strip().splitlines()) == 1


def test_improve_config_real_without_its_manifests_names_the_command_that_makes_them(tmp_path, capsys):
    code = main(["improve", "--config", "real", "--run-dir", str(tmp_path / "run"), "--no-progress",
                 f"--data.manifests=[{tmp_path / 'absent.csv'}]"])
    err = capsys.readouterr().err
    assert code == 2 and "synthmed data meddata" in err and "absent.csv" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _real_profile(meddata: Path, tmp_path: Path, **tree) -> Path:
    """The real profile on manifests built here from ../shared/meddata (a fresh clone has none under data/)."""
    import yaml

    out = tmp_path / "manifests"
    assert main(["data", "meddata", "--root", str(meddata), "--out", str(out)]) == 0
    names = ["nih_cxr14_64", "kermany_pediatric_cxr", "chest_ct_iqothnccd", "brain_tumor_mri", "oct_fundus_dme_dr"]
    profile = tmp_path / "real_here.yaml"
    profile.write_text(yaml.safe_dump({"extends": "real", "data": {"manifests": [str(out / f"{n}.csv") for n in names]}, **tree}))
    return profile


@pytest.mark.slow
def test_the_loop_runs_on_the_real_profile_in_its_words_against_real_images(meddata, tmp_path, capsys):
    """`synthmed improve --config real`: requests over the real reward classifier's labels, prompts in the real captions'
    words, the named held-out combinations, and held-out measures against the real validation images and training splits."""
    profile = _real_profile(meddata, tmp_path, improve={
        "prompts": {"heldout_per_modality": 1, "test_per_modality": 1},
        "ddpo": {"epochs": 1, "prompts_per_epoch": 5, "images_per_prompt": 2, "steps": 2, "sample_batch_size": 10,
                 "train_batch_size": 10, "grad_accum_steps": 1, "timestep_fraction": 0.5},
        "selection": {"enabled": False},
        "eval": {"every": 1, "images_per_prompt": 2, "steps": 2, "reference_per_finding": 2},
        "report_to": "none"})
    run = tmp_path / "run"
    assert main(["improve", "--config", str(profile), "--run-dir", str(run), "--no-progress", "--improve.num_threads=1"]) == 0
    capsys.readouterr()
    wording = json.loads((GENERATOR / "wording.json").read_text())
    held = [json.loads(line) for line in (run / "heldout_prompts.jsonl").read_text().splitlines()]
    named = load_config("real").improve.prompts.heldout
    assert {p["modality"]: p["key"].split(":")[1] for p in held} == {m: c[0] for m, c in named.items()}
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for item in held + samples:
        techniques = tuple(wording[item["modality"]]["technique"].values())
        assert item["prompt"].startswith(techniques), item["prompt"]  # the real captions' words, not the phantom templates
        assert item["key"] not in {p["key"] for p in held} or item in held  # held-out combinations never train
    assert "chest_ct" not in {item["modality"] for item in samples}  # its one label is held out: nothing to train on
    only = {"cxr": "pleural_effusion", "brain_mri": "meningioma"}  # no training combination has them
    assert all(only.get(item["modality"]) not in item["expected"] for item in samples)  # so no training reward asks or denies them
    evals = [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1]
    for row in evals[0]["per_modality"].values():
        assert np.isfinite(row["fd"]) and row["memorised_share"] is not None  # against real validation and training images
    # the reference: real validation images whose labels hold each held-out request, where there are any
    reference = [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "reference"]
    assert len(reference) == 1 and reference[0]["source"] == "real"
    assert set(reference[0]["per_modality"]) | set(reference[0]["missing"]) == set(evals[0]["per_modality"])
    assert reference[0]["per_modality"] and all(row["n"] >= 2 for row in reference[0]["per_modality"].values())


@pytest.mark.slow
def test_eval_config_real_takes_any_manifest_of_real_images(meddata, tmp_path, capsys):
    """`synthmed eval --config real --data MANIFEST`: a user's own held-out set, here one dataset's manifest."""
    profile = _real_profile(meddata, tmp_path)
    capsys.readouterr()
    manifest = tmp_path / "manifests" / "chest_ct_iqothnccd.csv"
    out = tmp_path / "runs"
    assert main(["eval", "--config", str(profile), "--data", str(manifest), "--prompts", "2", "--n-per-prompt", "2",
                 "--steps", "2", "--run.runs_dir", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["modalities"]) == ["chest_ct"] and result["data"] == [str(manifest)]
    generated = result["modalities"]["chest_ct"]["generated"]
    assert np.isfinite(generated["fd"]) and generated["memorised_share"] is not None
    assert (Path(result["run"]) / "eval.md").is_file()
