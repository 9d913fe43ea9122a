"""`synthmed judges train classifier` and `synthmed eval` in-process, on tiny settings (CPU, offline)."""

from __future__ import annotations

import json
import sys

import pytest

from generator.phantoms import compatible_pairs, get_spec
from pipelines.cli import main
from rlhf.classifiers import DEFAULT_ROOT, load_classifier

# a small, fast classifier: 32 px, narrow, one or two epochs
TINY = ["--judges.classifier.image_size=32", "--judges.classifier.epochs=2", "--judges.classifier.batch_size=16",
        "--judges.classifier.convnet_widths=[8,16]", "--judges.classifier.resnet_widths=[8,16]",
        "--judges.classifier.val_fraction=0.4", "--judges.classifier.benchmark_per_finding=1",
        "--judges.classifier.benchmark_per_pair=1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (tests/conftest.py)


def draw(tmp_path, modality: str, per_finding: int = 8, size: int = 32) -> str:
    out = tmp_path / "ph"
    assert main(["data", "phantoms", "--out", str(out), "--per-finding", str(per_finding), "--size", str(size), "--seed", "3",
                 "--modalities", modality, "--no-progress"]) == 0
    return str(out / "manifest.csv")


def test_train_classifier_writes_every_role_with_the_command(tmp_path, monkeypatch, capsys):
    manifest = draw(tmp_path, "oct")
    argv = ["judges", "train", "classifier", "--data", manifest, "--modalities", "oct", "--out", str(tmp_path / "cls"), *TINY]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/synthmed", *argv])  # as the console script sees it
    assert main(argv) == 0
    assert "oct" in capsys.readouterr().out  # the summary table
    for role in ("reward", "verifier", "evaluator"):
        folder = tmp_path / "cls" / role / "oct"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metadata.json", "model.safetensors"]
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["command"] == "synthmed " + " ".join(argv)
        assert meta["role"] == role and meta["modality"] == "oct" and meta["data"] == [manifest]
        assert meta["label_names"] == list(get_spec("oct").findings) and meta["epochs"] == 2 and meta["image_size"] == 32
        assert set(meta["metrics"]) >= {"test", "benchmark"}
        classifier = load_classifier(folder, role=role)
        assert classifier.label_names == meta["label_names"] and classifier.arch == ("resnet" if role == "evaluator" else "convnet")
        assert meta["seed"] == {"reward": 0, "verifier": 2, "evaluator": 1}[role]
    widths = {role: json.loads((tmp_path / "cls" / role / "oct" / "metadata.json").read_text())["widths"] for role in ("reward", "verifier")}
    assert widths["reward"] != widths["verifier"]  # the verifier is another network than the reward's
    assert not (tmp_path / "cls" / "reward" / "cxr").exists()  # only the modality asked for


def test_default_data_is_the_classifiers_own_phantom_set(tmp_path, capsys):
    out = tmp_path / "cls"
    common = [f"--phantoms.out={tmp_path / 'phantoms'}", "--phantoms.modalities=[oct]", "--judges.classifier.phantoms_per_finding=6",
              "--judges.classifier.phantoms_per_pair=2"]
    assert main(["judges", "train", "classifier", "--roles", "evaluator", "--out", str(out), *common, *TINY]) == 0
    folder = tmp_path / "phantoms_32px_seed4242_6pf_2pp"  # <phantoms.out>_<image_size>px_seed<phantoms_seed>_<per_finding>pf_<per_pair>pp
    meta = json.loads((folder / "metadata.json").read_text())
    assert (meta["seed"], meta["per_finding"], meta["per_pair"], meta["size"], meta["modalities"]) == (4242, 6, 2, 32, ["oct"])
    assert meta["counts"]["oct"]["drusen+epiretinal_membrane"] == 2  # findings side by side, not only one at a time
    saved = json.loads((out / "evaluator" / "oct" / "config.json").read_text())
    assert set(saved["thresholds"]) == set(saved["label_names"]) and all(0 <= t <= 1 for t in saved["thresholds"].values())
    pairs = json.loads((out / "evaluator" / "oct" / "metadata.json").read_text())["metrics"]["benchmark_pairs"]
    assert pairs["images"] == len(compatible_pairs("oct")) and 0 <= pairs["both_shown"] <= 1
    assert json.loads((out / "evaluator" / "oct" / "metadata.json").read_text())["data"] == [str(folder / "manifest.csv")]
    assert not (out / "reward").exists()
    # a seed that would train the classifiers on the evaluation's reference phantoms is refused
    assert main(["judges", "train", "classifier", "--out", str(out), *common, *TINY, "--judges.classifier.phantoms_seed=1234"]) == 2
    assert "judges.eval.seed" in capsys.readouterr().err


SHIPPED = DEFAULT_ROOT / "evaluator" / "oct" / "config.json"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped evaluator classifiers missing")
def test_eval_on_the_shipped_model_and_judges(tmp_path, capsys):
    train = draw(tmp_path, "oct", per_finding=2, size=64)  # stands in for the generator's training set (memorisation)
    argv = ["eval", "--modalities", "oct", "--prompts", "1", "--n-per-prompt", "2", "--steps", "2", "--reference-per-finding", "2",
            "--train-data", train, f"--run.runs_dir={tmp_path / 'runs'}", "--run.device=cpu", "--no-progress"]
    assert main(argv) == 0
    run = next((tmp_path / "runs").iterdir())
    table = (run / "eval.md").read_text()
    rows = [[cell.strip() for cell in line.split("|")[1:3]] for line in table.splitlines() if line.startswith("| oct")]
    assert rows == [["oct", "real"], ["oct", "generated"]]  # a real and a generated row per evaluated modality
    result = json.loads((run / "eval.json").read_text())
    assert list(result["modalities"]) == ["oct"]
    oct_ = result["modalities"]["oct"]
    assert oct_["generated"]["n"] == 2 and oct_["real"]["n"] == 2 * (1 + len(get_spec("oct").findings)) // 2
    assert 0 <= oct_["generated"]["finding_accuracy"] <= 1 and len(oct_["prompts"]) == 1
    assert (run / "samples" / "oct.png").is_file() and (run / "metadata.json").is_file()
    assert "-> " in capsys.readouterr().out
