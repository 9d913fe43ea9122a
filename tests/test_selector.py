"""The quality selector and its degradations: bootstrap, ratings, pairs, threshold, contract."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from generator.data.records import ManifestRow
from rlhf.alignment import build_alignment
from rlhf.config import AlignmentConfig, SelectorConfig
from rlhf.degrade import DEGRADATIONS, SEVERITIES, degrade, degrade_each
from rlhf.scorers import build_scorer, check_result
from rlhf.selector import (
    TRAIN_COMMAND, SelectorNotFoundError, auroc, best_threshold, load_selector, read_ratings, train_selector,
)

torch.set_num_threads(1)


def toy_image(seed: int, size: int = 32) -> np.ndarray:
    """A dark field with a few bright ellipses and faint texture: edges and detail to degrade."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    image = 0.1 + 0.05 * rng.standard_normal((size, size))
    for _ in range(rng.integers(2, 5)):
        cy, cx, ry, rx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25), rng.uniform(0.08, 0.25)
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.uniform(0.5, 0.95)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def toy_rows(start: int, n: int) -> list[ManifestRow]:
    return [ManifestRow(path=f"toy#{i}", text="Chest X-ray. No acute abnormality.", modality="cxr", image=toy_image(i))
            for i in range(start, start + n)]


def as_batch(rows: list[ManifestRow]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(r.image).float().div(127.5).sub(1.0).expand(3, -1, -1) for r in rows])


@pytest.fixture(scope="module")
def alignment():
    """A tiny, untrained alignment model: its random ResNet features already see blur and noise."""
    cfg = AlignmentConfig(image_size=32, embed_dim=32, vision_layers=[1, 1, 1, 1], vision_width=8, text_width=32,
                          text_layers=1, text_heads=2, context_length=16, device="cpu", seed=0)
    return build_alignment(cfg)


@pytest.fixture(scope="module")
def bootstrapped(alignment, tmp_path_factory):
    out = tmp_path_factory.mktemp("selector") / "selector"
    cfg = SelectorConfig(out=str(out), epochs=100, batch_size=64, lr=3e-3, hidden=128, dropout=0.0, copies_per_image=7, seed=0)
    summary = train_selector(cfg, alignment, train_rows=toy_rows(0, 48), val_rows=toy_rows(1000, 16), progress=False)
    return summary, load_selector(out, alignment)


# -- degradations -----------------------------------------------------------------------------
def test_degradations_are_seeded_and_change_the_image():
    images = as_batch(toy_rows(0, 3))
    for kind in DEGRADATIONS:
        for severity in SEVERITIES:
            a, b = degrade(images, kind, severity, seed=5), degrade(images, kind, severity, seed=5)
            assert torch.equal(a, b), kind
            assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
            assert (a - images).abs().mean() > 0.005, f"{kind} {severity} left the image unchanged"
            assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2]), f"{kind} made a grey image colour"
    for kind in ("noise", "occlusion", "clipping"):
        assert not torch.equal(degrade(images, kind, 2, seed=1), degrade(images, kind, 2, seed=2))
    blur = [(degrade(images, "blur", s) - images).abs().mean() for s in SEVERITIES]
    assert blur[0] < blur[1] < blur[2]  # severity orders the damage
    mixed = degrade_each(images, ["blur", "noise", "blur"], [1, 3, 1], seed=0)
    assert torch.equal(mixed, degrade_each(images, ["blur", "noise", "blur"], [1, 3, 1], seed=0))
    with pytest.raises(ValueError, match="known"):
        degrade(images, "smudge", 1)
    with pytest.raises(ValueError, match="severity"):
        degrade(images, "blur", 4)


# -- bootstrap --------------------------------------------------------------------------------
def test_selector_ranks_undegraded_above_degraded_copy_on_held_out_images(bootstrapped):
    summary, selector = bootstrapped
    metrics = summary["metrics"]  # held-back images against copies of every kind and severity, mild ones included
    assert metrics["pairwise_accuracy"] >= 0.75 and metrics["auroc"] >= 0.75
    assert set(metrics["pairwise_accuracy_by_degradation"]) == set(DEGRADATIONS)
    # images neither the head nor the validation saw, each against its own severe copy
    rows = toy_rows(5000, 12)
    clean = as_batch(rows)
    prompts, modalities = [r.text for r in rows], ["cxr"] * len(rows)
    q_clean = selector.quality(clean, prompts, modalities)
    wins = [np.mean(q_clean > selector.quality(degrade(clean, kind, 3, seed=9), prompts, modalities)) for kind in DEGRADATIONS]
    assert np.mean(wins) >= 0.85, dict(zip(DEGRADATIONS, wins))


def test_threshold_in_unit_interval_and_select_agrees(bootstrapped):
    summary, selector = bootstrapped
    assert 0.0 <= selector.threshold <= 1.0
    assert summary["threshold"] == selector.threshold
    config = json.loads((selector.folder / "config.json").read_text())
    assert config["threshold"] == selector.threshold and config["alignment"]["weights_sha256"] == selector.alignment.weights_hash
    batch = torch.cat([as_batch(toy_rows(7000, 4)), degrade(as_batch(toy_rows(7000, 4)), "noise", 3)])
    prompts = ["Chest X-ray."] * 8
    quality = selector.quality(batch, prompts, ["cxr"] * 8)
    assert np.all((quality >= 0) & (quality <= 1))
    np.testing.assert_array_equal(selector.select(batch, prompts, ["cxr"] * 8), quality >= selector.threshold)


def test_scorer_honours_contract(bootstrapped):
    _, selector = bootstrapped
    scorer = build_scorer("selector", selector=selector)
    images = as_batch(toy_rows(8000, 5))
    scores, details = check_result(scorer.score(images, ["Chest X-ray."] * 5, ["cxr"] * 5), 5, "selector")
    assert set(details) == {"quality", "above_threshold"}
    np.testing.assert_array_equal(details["above_threshold"], (scores >= selector.threshold).astype(float))
    uint8 = [r.image for r in toy_rows(8000, 2)]  # grey uint8 arrays as written to PNG
    check_result(scorer.score(uint8, ["Chest X-ray."] * 2, ["cxr"] * 2), 2)


def test_other_alignment_model_is_a_clear_error(bootstrapped, tmp_path):
    _, selector = bootstrapped
    other = build_alignment(AlignmentConfig(image_size=32, embed_dim=32, vision_layers=[1, 1, 1, 1], vision_width=8, text_width=32,
                                            text_layers=1, text_heads=2, context_length=16, device="cpu", seed=1))
    with pytest.raises(ValueError, match="was trained on alignment model"):
        load_selector(selector.folder, other)
    with pytest.raises(SelectorNotFoundError, match=TRAIN_COMMAND):
        load_selector(tmp_path / "absent", other)


# -- ratings ----------------------------------------------------------------------------------
def write_images(folder, rows: list[ManifestRow]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(rows):
        Image.fromarray(row.image).save(folder / f"img_{i}.png")
        names.append(f"images/img_{i}.png")
    return names


def write_csv(path, header, lines) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)


def test_ratings_csv_normalised_and_weighted_by_expert(alignment, tmp_path):
    names = write_images(tmp_path / "images", toy_rows(0, 8))
    lines = []
    for name in names:  # every image: a junior says 1 (worst), an expert says 5 (best)
        lines += [[name, 1, "CXR", "junior", "Chest X-ray."], [name, 5, "chest x-ray", "expert", "Chest X-ray."]]
    write_csv(tmp_path / "ratings.csv", ["image_path", "rating", "modality", "expert_level", "prompt"], lines)
    cfg = SelectorConfig(source="ratings", ratings=str(tmp_path / "ratings.csv"), out=str(tmp_path / "sel"),
                         epochs=300, batch_size=16, lr=3e-3, hidden=32, dropout=0.0)
    table = read_ratings(cfg.ratings, cfg)
    assert table.scale == (1.0, 5.0)
    np.testing.assert_allclose(table.targets, [0.0, 1.0] * 8)  # (r - 1) / 4
    np.testing.assert_allclose(table.weights, [0.5, 1.5] * 8)
    assert set(table.modalities) == {"cxr"} and all(p.endswith(".png") for p in table.paths)

    summary = train_selector(cfg, alignment, progress=False)
    assert summary["data"]["rating_scale"] == [1.0, 5.0]
    selector = load_selector(cfg.out, alignment)
    quality = selector.quality(as_batch(toy_rows(0, 8)), ["Chest X-ray."] * 8, ["cxr"] * 8)
    # weighted cross-entropy is minimised at the weighted mean (0.5 * 0 + 1.5 * 1) / 2 = 0.75, not the plain 0.5
    assert abs(float(np.mean(quality)) - 0.75) < 0.08
    assert 0.0 <= selector.threshold <= 1.0


def test_unknown_expert_level_names_the_known_ones(tmp_path):
    write_csv(tmp_path / "ratings.csv", ["image_path", "rating", "modality", "expert_level", "prompt"],
              [["a.png", 3, "cxr", "intern", "x"]])
    with pytest.raises(ValueError) as err:
        read_ratings(tmp_path / "ratings.csv", SelectorConfig())
    message = str(err.value)
    assert "intern" in message and "junior" in message and "senior" in message and "expert" in message and "line 2" in message


def test_ratings_csv_missing_column_is_a_clear_error(tmp_path):
    write_csv(tmp_path / "ratings.csv", ["image_path", "score"], [["a.png", 3]])
    with pytest.raises(ValueError, match="missing column"):
        read_ratings(tmp_path / "ratings.csv", SelectorConfig())


# -- pairwise preferences ---------------------------------------------------------------------
def test_pairs_csv_bradley_terry(alignment, tmp_path):
    rows = toy_rows(0, 30)
    clean = write_images(tmp_path / "images", rows)
    blurred = degrade(as_batch(rows), "blur", 3)
    for i in range(len(rows)):
        pixels = blurred[i, 0].add(1).mul(127.5).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"blur_{i}.png")
    # a reader prefers each clean image to its blurred copy
    lines = [[clean[i], f"images/blur_{i}.png", "cxr", "Chest X-ray."] for i in range(len(rows))]
    write_csv(tmp_path / "pairs.csv", ["preferred_path", "other_path", "modality", "prompt"], lines)
    cfg = SelectorConfig(source="pairs", pairs=str(tmp_path / "pairs.csv"), out=str(tmp_path / "sel"), epochs=60,
                         batch_size=16, lr=3e-3, hidden=32, val_fraction=0.3)
    summary = train_selector(cfg, alignment, progress=False)
    assert summary["metrics"]["val_pairs"] == 9
    assert summary["metrics"]["pairwise_accuracy"] >= 0.8
    selector = load_selector(cfg.out, alignment)
    assert 0.0 <= selector.threshold <= 1.0


# -- metrics ----------------------------------------------------------------------------------
def test_auroc_and_threshold_by_hand():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.5]), np.array([0.5])) == 0.5
    assert auroc(np.array([0.9, 0.3]), np.array([0.5])) == 0.5
    threshold, balanced = best_threshold(np.array([0.7, 0.8, 0.9]), np.array([0.1, 0.2, 0.6]))
    assert 0.6 < threshold <= 0.7 and balanced == 1.0
