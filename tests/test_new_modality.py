"""A sixth modality is a config entry, a lexicon file and a manifest of its images: with no code change it
trains (the shipped model grows a row for it), samples, trains its finding classifiers, evaluates, and goes
through the agent graph. Its images are drawn here (simple shapes per finding), not phantoms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import load_config

FINDINGS = {  # finding id -> (term, how the image shows it)
    "blue_white_veil": "blue-white veil",
    "milia_like_cysts": "milia-like cysts",
}

PROFILE = """\
extends: tiny
data:
  modalities:
    dermoscopy:
      channels: 3
      display_name: dermoscopy image
      aliases: [dermatoscopy, dermoscopic image, epiluminescence microscopy]
      region: skin
      example_prompt: "Dermoscopy of a pigmented skin lesion. Findings: blue-white veil."
      dicom_modality: XC
knowledge:
  lexicon_files: [{lexicon}]
  case_manifests: []
  index_dir: {root}/kb
judges:
  classifier:
    out: {root}/judges
    image_size: 32
    epochs: 2
    batch_size: 16
    convnet_widths: [8, 16]
    resnet_widths: [8, 16]
    val_fraction: 0.4
    benchmark_per_finding: 0
agents:
  traces: {root}/traces.sqlite
  out: {root}/images
  candidates: 1
run:
  runs_dir: {root}/runs
"""

LEXICON = """\
concepts:
  - id: blue_white_veil
    kind: finding
    term: blue-white veil
    synonyms: [blue-whitish veil, blue white structures]
    modalities: [dermoscopy]
    description: An irregular, structureless blue area with a white ground-glass haze over a pigmented lesion.
  - id: milia_like_cysts
    kind: finding
    term: milia-like cysts
    synonyms: [milia like cysts, white cysts]
    modalities: [dermoscopy]
    description: Round white or yellow dots within a lesion, typical of seborrhoeic keratosis.
  - id: blue_white_veil@dermoscopy
    kind: appearance
    term: blue-white veil on dermoscopy
    finding: blue_white_veil
    modalities: [dermoscopy]
    description: A blue-grey patch over the brown lesion.
  - id: milia_like_cysts@dermoscopy
    kind: appearance
    term: milia-like cysts on dermoscopy
    finding: milia_like_cysts
    modalities: [dermoscopy]
    description: Small white dots scattered inside the lesion.
"""


def draw_lesion(finding: str | None, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Skin, a brown lesion, and the finding's shape on it."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.float32)
    image[:] = (225, 180, 160)
    cy, cx = size / 2 + rng.normal(0, 2, 2)
    radius = size * rng.uniform(0.25, 0.33)
    lesion = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image[lesion] = (120, 75, 50)
    if finding == "blue_white_veil":
        image[lesion & ((yy - cy) ** 2 + (xx - cx - radius / 3) ** 2 < (radius / 1.6) ** 2)] = (120, 135, 170)
    elif finding == "milia_like_cysts":
        for _ in range(6):
            r, a = rng.uniform(0, radius * 0.7), rng.uniform(0, 2 * np.pi)
            image[(yy - cy - r * np.sin(a)) ** 2 + (xx - cx - r * np.cos(a)) ** 2 < 4] = (250, 250, 235)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The profile, the lexicon file and a manifest of 42 drawn images (14 normal, 14 per finding)."""
    root = tmp_path_factory.mktemp("dermoscopy")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "modality", "findings", "source"])
        for i in range(42):
            finding = [None, *FINDINGS][i % 3]
            name = f"images/derm_{i:03d}.png"
            Image.fromarray(draw_lesion(finding, rng)).save(root / name)
            said = f"Findings: {FINDINGS[finding]}." if finding else "Findings: no blue-white veil or milia-like cysts."
            stated = [{"name": n, "present": n == finding} for n in FINDINGS]
            writer.writerow([name, f"Dermoscopy of a pigmented skin lesion. {said}", "dermoscopy", json.dumps(stated), f"drawn:{i}"])
    (root / "findings_dermoscopy.yaml").write_text(LEXICON)
    (root / "profile.yaml").write_text(PROFILE.format(root=root, lexicon=root / "findings_dermoscopy.yaml"))
    return root


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (tests/conftest.py)


def test_the_profile_adds_a_sixth_modality(workdir):
    cfg = load_config(workdir / "profile.yaml")
    assert list(cfg.data.modalities)[-1] == "dermoscopy" and len(cfg.data.modalities) == 6
    derm = cfg.data.modalities["dermoscopy"]
    assert (derm.region, derm.laterality, derm.example(), derm.dicom_modality) == ("skin", "body", derm.example_prompt, "XC")
    assert cfg.data.modalities["oct"].laterality == "eye"  # the built-in ones keep their entries


@pytest.mark.slow
def test_train_sample_evaluate_and_generate_with_no_code_change(workdir, capsys):
    profile = ["--config", str(workdir / "profile.yaml")]
    manifest = str(workdir / "manifest.csv")
    model = workdir / "model"

    # the shipped model grows an embedding row for the new modality and trains on its images
    assert main(["train", "unet", *profile, "--init-from", "generator/weights/default", "--data", manifest, f"--train.out={model}",
                 "--train.max_steps=2", "--train.batch_size=2", "--train.warmup_steps=1", "--train.validate_every=100",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "dermoscopy" in json.loads((model / "model.json").read_text())["modalities"]

    assert main(["sample", "Dermoscopy: blue-white veil.", *profile, "--modality", "dermatoscopy", "--model", str(model), "--n", "1",
                 "--steps", "2", "--out", str(workdir / "samples")]) == 0, capsys.readouterr().err
    drawn = list((workdir / "samples").glob("*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).mode == "RGB"  # channels: 3

    # finding classifiers learn the labels of the manifest's findings column
    assert main(["judges", "train", "classifier", *profile, "--data", manifest, "--modalities", "dermoscopy", "--no-progress"]) == 0
    meta = json.loads((workdir / "judges" / "evaluator" / "dermoscopy" / "metadata.json").read_text())
    assert meta["label_names"] == sorted(FINDINGS)

    capsys.readouterr()
    assert main(["eval", *profile, "--model", str(model), "--data", manifest, "--train-data", manifest, "--prompts", "2",
                 "--n-per-prompt", "2", "--steps", "2", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)["modalities"]["dermoscopy"]
    assert rows["generated"]["n"] == 4 and rows["real"]["finding_accuracy"] is not None

    # the graph reads the request with the new lexicon and composes it in the modality's words
    assert main(["generate", "Dermoscopy: blue-white veil, no milia-like cysts.", *profile, "--modality", "dermoscopic image",
                 "--model", str(model), "--steps", "2", "--max-rounds", "1", "--json"]) == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    found = {f["name"]: f["present"] for f in record["findings"]}
    assert found == {"blue_white_veil": True, "milia_like_cysts": False}
    # the model trained on the manifest keeps its captions' wording (wording.json): the prompt and technique speak it
    assert record["prompt"] == "Dermoscopy of a pigmented skin lesion. Findings: blue-white veil."
    assert record["report"]["technique"] == "Dermoscopy of a pigmented skin lesion."
    assert record["images"] and all(Path(p).is_file() for p in record["images"])
    trace = main(["trace", "show", record["trace_id"], "--json", "--config", str(workdir / "profile.yaml")])
    assert trace == 0 and json.loads(capsys.readouterr().out)["stages"]["localize_anatomy"]["region"] == "skin"
