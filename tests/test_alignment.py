"""The alignment model: contrastive loss, training on a toy set, recall, save/load, the scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from generator.data.records import ManifestRow
from rlhf.alignment import (
    CLIP_SCORE_WEIGHT, TRAIN_COMMAND, AlignmentNotFoundError, alignment_scorer, build_alignment, contrastive_loss, finding_label,
    load_alignment, recall_at_k, round_to_fp16, save_alignment, train_alignment,
)
from rlhf.config import AlignmentConfig
from rlhf.scorers import build_scorer, check_result

torch.set_num_threads(1)

SHAPES = ("disc", "square", "horizontal bar", "vertical bar")
PLACES = {"upper left": (8, 8), "upper right": (8, 24), "lower left": (24, 8), "lower right": (24, 24)}


def toy_pairs() -> list[ManifestRow]:
    """16 distinct image-text pairs: one bright shape in one quadrant of a dark 32 px image."""
    rows = []
    yy, xx = np.mgrid[:32, :32]
    for shape in SHAPES:
        for place, (cy, cx) in PLACES.items():
            if shape == "disc":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            elif shape == "square":
                mask = (abs(yy - cy) <= 5) & (abs(xx - cx) <= 5)
            elif shape == "horizontal bar":
                mask = (abs(yy - cy) <= 2) & (abs(xx - cx) <= 7)
            else:
                mask = (abs(yy - cy) <= 7) & (abs(xx - cx) <= 2)
            image = np.where(mask, 230, 20).astype(np.uint8)
            rows.append(ManifestRow(path=f"toy#{len(rows)}", text=f"A bright {shape} in the {place}.", modality="cxr",
                                    findings=[{"name": shape.replace(" ", "_"), "present": True}], image=image))
    return rows


def tiny_config(tmp_path, **overrides) -> AlignmentConfig:
    values = dict(out=str(tmp_path / "clip"), image_size=32, embed_dim=32, vision_layers=[1, 1, 1, 1], vision_width=8,
                  text_width=32, text_layers=1, text_heads=2, context_length=16, epochs=30, batch_size=16, lr=3e-3,
                  weight_decay=0.0, warmup_steps=2, augment_prompts=False, max_shift=0, seed=0, device="cpu")
    return AlignmentConfig(**{**values, **overrides})


def as_batch(rows: list[ManifestRow]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(r.image).float().div(127.5).sub(1.0).expand(3, -1, -1) for r in rows])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("alignment")
    cfg = tiny_config(tmp_path)
    rows = toy_pairs()
    untrained = build_alignment(cfg)
    summary = train_alignment(cfg, rows, rows, progress=False)
    return cfg, rows, untrained, summary, load_alignment(cfg.out, device="cpu")


def test_contrastive_loss_by_hand():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * (img @ txt.T)
    i2t = -np.mean([torch.log_softmax(logits[i], 0)[i].item() for i in range(2)])
    t2i = -np.mean([torch.log_softmax(logits[:, i], 0)[i].item() for i in range(2)])
    assert contrastive_loss(img, txt, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.7, 0.3]])
    out = recall_at_k(sim, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert out["i2t_recall@1"] == pytest.approx(1 / 3)  # only image 0 finds its text first
    assert out["i2t_recall@2"] == pytest.approx(2 / 3)  # image 1 ranks texts 2, 0, 1
    assert out["i2t_recall@3"] == pytest.approx(1.0)
    assert out["t2i_recall@1"] == pytest.approx(1 / 3)  # text 0 -> image 0; text 1 -> image 2; text 2 -> image 1
    # texts 1 and 2 identical: retrieving either counts
    match = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=bool)
    assert recall_at_k(sim, match, ks=(1,))["i2t_recall@1"] == pytest.approx(1.0)


def test_training_lowers_loss_and_recall_beats_chance(trained):
    cfg, rows, untrained, summary, model = trained
    images, texts = as_batch(rows), [r.text for r in rows]
    with torch.no_grad():
        before = contrastive_loss(untrained.encode_images(images), untrained.encode_texts(texts), model.clip.logit_scale).item()
        after = contrastive_loss(model.encode_images(images), model.encode_texts(texts), model.clip.logit_scale).item()
    assert after < before - 0.5
    recall = model.retrieval_recall(images, texts, ks=(1, 5), labels=[finding_label(r) for r in rows])
    chance = 1 / len(rows)
    assert recall["i2t_recall@1"] > 3 * chance and recall["t2i_recall@1"] > 3 * chance
    assert recall["i2t_same_label_recall@1"] >= recall["i2t_recall@1"]
    assert summary["metrics"]["i2t_recall@1"] == pytest.approx(recall["i2t_recall@1"], abs=1e-4)
    assert set(summary["metrics"]["per_modality"]) == {"cxr"}


def test_folder_holds_weights_config_metadata(trained):
    cfg, rows, _, summary, model = trained
    folder = model.folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metadata.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 32 and config["image_size"] == 32 and config["context_length"] == 16
    assert config["tokenizer"] and config["mean"] == [0.5, 0.5, 0.5]
    meta = json.loads((folder / "metadata.json").read_text())
    for key in ("version", "data", "seed", "epochs", "metrics", "seconds", "device", "command"):
        assert key in meta
    assert meta["weights_sha256"] == model.weights_hash
    assert not list(folder.parent.glob(".clip.*"))  # no temporary folder left behind


def test_save_load_round_trip_identical_embeddings(tmp_path):
    cfg = tiny_config(tmp_path)
    model = round_to_fp16(build_alignment(cfg))
    save_alignment(model, tmp_path / "saved", {"note": "test"})
    loaded = load_alignment(tmp_path / "saved", device="cpu")
    images, texts = as_batch(toy_pairs()[:4]), [r.text for r in toy_pairs()[:4]]
    assert torch.equal(model.encode_images(images), loaded.encode_images(images))
    assert torch.equal(model.encode_texts(texts), loaded.encode_texts(texts))
    assert model.weights_hash == loaded.weights_hash
    save_alignment(loaded, tmp_path / "saved", {"note": "overwrite"})  # replacing a model folder works
    assert json.loads((tmp_path / "saved" / "metadata.json").read_text()) == {"note": "overwrite"}


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AlignmentNotFoundError) as err:
        load_alignment(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and TRAIN_COMMAND in str(err.value)


def test_scorer_honours_contract(trained):
    _, rows, _, _, model = trained
    scorer = build_scorer("alignment", model=model)
    assert scorer.name == "alignment"
    images, prompts = as_batch(rows[:5]), [r.text for r in rows[:5]]
    scores, details = check_result(scorer.score(images, prompts, ["cxr"] * 5), 5, "alignment")
    assert set(details) == {"cosine"}
    np.testing.assert_allclose(scores, CLIP_SCORE_WEIGHT * np.clip(details["cosine"], 0, None))
    np.testing.assert_allclose(scores, model.clip_score(images, prompts), rtol=1e-6)
    assert np.all((scores >= 0) & (scores <= CLIP_SCORE_WEIGHT))
    # uint8 arrays as written to PNG, at another size (resized to the model's)
    arrays = [np.repeat(np.kron(r.image, np.ones((2, 2), np.uint8))[..., None], 3, axis=2) for r in rows[:3]]
    check_result(alignment_scorer(model=model).score(arrays, prompts[:3], ["cxr"] * 3), 3)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, prompts[:2], ["cxr"] * 5)
