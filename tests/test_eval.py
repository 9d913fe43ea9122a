"""`synthmed eval` on tiny models: generated against real, per modality, with the held-out evaluator."""

import json
import math

import numpy as np
import pytest
import torch

from generator.config import ModelConfig
from generator.conditioning import TextEncoder
from generator.models import LatentDiffusion
from rlhf.classifiers import fit_classifier, phantom_benchmark_rows
from rlhf.config import ClassifierConfig, EvalConfig
from rlhf.evaluate import EvalCase, Judges, choose_prompts, evaluate, expected_matrix, markdown_table, phantom_cases

TINY = ModelConfig(image_size=32, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                   cross_attention_dim=32, text_max_length=16)


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, ["cxr", "oct"], text_encoder=TextEncoder(TINY.text_encoder, TINY.text_max_length)).eval()
    cfg = ClassifierConfig(image_size=32, epochs=1, batch_size=16, convnet_widths=[8, 16], resnet_widths=[8, 16],
                           stem_patch=2, benchmark_per_finding=0, augment=False)
    rows = phantom_benchmark_rows("cxr", 3, 32, seed=5)
    evaluator, _ = fit_classifier(cfg, "evaluator", "cxr", rows, progress=False)
    return model, Judges(evaluator={"cxr": evaluator}, inception="unavailable: no local Inception weights",
                         missing={"alignment": "not trained in this test"})


def test_prompts_cover_every_label_round_robin():
    cases = [EvalCase(np.zeros((8, 8), np.uint8), f"t{i}", "cxr", [{"name": n, "present": True}] if n else [], True)
             for i, n in enumerate(["", "", "effusion", "effusion", "mass"])]
    chosen = choose_prompts(cases, 3, seed=0)
    assert sorted(c.label for c in chosen) == ["effusion", "mass", "normal"]


def test_expected_matrix_complete_truth_and_unknowns():
    phantom = EvalCase(np.zeros((8, 8), np.uint8), "", "cxr", [{"name": "mass", "present": True}], complete_truth=True)
    real = EvalCase(np.zeros((8, 8), np.uint8), "", "cxr", [{"name": "nodule", "present": False}], complete_truth=False)
    e = expected_matrix([phantom, real], ["mass", "nodule", "pneumothorax"])
    assert e[0].tolist() == [1.0, 0.0, 0.0]
    assert e[1, 1] == 0.0 and math.isnan(e[1, 0]) and math.isnan(e[1, 2])


def test_evaluate_gives_real_and_generated_rows_with_a_baseline(tiny_setup, tmp_path):
    model, judges = tiny_setup
    cases = phantom_cases(["cxr"], 32, per_finding=4, seed=1234)
    cfg = EvalConfig(n_per_prompt=2, prompts_per_modality=3, steps=2, kid_subsets=5)
    train = {"cxr": torch.cat([torch.full((2, 3, 32, 32), -1.0), torch.rand(2, 3, 32, 32) * 2 - 1])}
    result = evaluate(model, cases, judges, cfg, train_images=train, sample_dir=tmp_path, progress=False, batch_size=4)
    rows = result["modalities"]["cxr"]
    assert rows["generated"]["n"] == 6 and rows["real"]["n"] == len(cases[0::2])
    for side in ("real", "generated"):
        row = rows[side]
        for key in ("fd", "kid", "finding_accuracy", "ms_ssim", "nearest_train_ssim", "nearest_train_feature_cosine", "contrast", "quality_ok"):
            assert row[key] is not None and np.isfinite(row[key]), (side, key)
        assert row["clip_score"] is None and row["selector_quality"] is None  # not loaded: n/a, not invented
        q = row["nearest_train_ssim_quantiles"]
        assert q["p5"] <= q["p50"] <= q["p95"] <= q["max"] and q["p5"] <= row["nearest_train_ssim"] <= q["max"]
    assert len(rows["prompts"]) == 3 and (tmp_path / "cxr.png").is_file()
    table = markdown_table(result)
    assert "| cxr | real |" in table and "| cxr | generated |" in table
    assert "alignment: not available" in table and "FD (synthmed features)" in table
    assert "nearest-train SSIM, p5 / p50 / p95 / max" in table and "cxr generated" in table
    json.loads(json.dumps(result, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def test_evaluate_refuses_a_modality_without_an_evaluator(tiny_setup):
    model, judges = tiny_setup
    cases = phantom_cases(["oct"], 32, per_finding=1, seed=1)
    with pytest.raises(ValueError, match="no evaluator classifier for oct"):
        evaluate(model, cases, judges, EvalConfig(n_per_prompt=2, prompts_per_modality=1, steps=1), progress=False)


def test_a_finding_counts_as_shown_from_the_evaluators_operating_point(tiny_setup):
    from rlhf.classifiers import FindingClassifier
    from rlhf.evaluate import measure
    from rlhf.scorers import as_image_batch

    _, judges = tiny_setup
    base = judges.evaluator["cxr"]
    cases = phantom_cases(["cxr"], 32, per_finding=1, seed=3)
    images = as_image_batch([c.image for c in cases])
    expected = expected_matrix(cases, base.label_names)
    feats = base.features(images)
    rows = {}
    for threshold in (0.0, 1.0):
        clf = FindingClassifier(base.network, base.label_names, base.image_size, base.temperature, "evaluator", "cxr",
                                base.architecture, thresholds=[threshold] * len(base.label_names))
        j = Judges(evaluator={"cxr": clf}, inception="unavailable", missing={})
        rows[threshold] = measure(images, [c.text for c in cases], "cxr", [c.label for c in cases], expected, feats, None, j,
                                  EvalConfig(kid_subsets=2), images)
    assert rows[0.0]["requested_shown"] == 1.0 and rows[0.0]["all_requested_shown"] == 1.0  # every probability reaches 0
    assert rows[1.0]["requested_shown"] == 0.0 and rows[1.0]["all_requested_shown"] == 0.0  # none reaches 1
    # finding accuracy reads the same points: at 0 every stated-absent finding is wrong, at 1 every present one
    assert rows[0.0]["finding_accuracy"] != rows[1.0]["finding_accuracy"]
