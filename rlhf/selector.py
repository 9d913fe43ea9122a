"""Quality selector: MINIM's second stage, a quality score in [0, 1] with a learned threshold.

Features are the frozen alignment model's unit embeddings of the image and of its prompt (and
their product, which carries their agreement); a small MLP head maps them to a logit, and the
quality is its sigmoid. Only the head trains, on features computed once, so training takes
seconds once the images are encoded.

Three ways to teach it (``judges.selector.source``):

- ``ratings``: a CSV ``image_path,rating,modality,expert_level,prompt`` (MINIM's format). Ratings
  are mapped to [0, 1] on their scale (``rating_scale``, or the smallest of 0-1, 1-5, 1-10, 0-10,
  0-100 holding every rating: 1-5 gives ``(r - 1) / 4``); each row is weighted by
  ``expert_weights[expert_level]``; loss: weighted binary cross-entropy against the normalised rating.
- ``pairs``: a CSV ``preferred_path,other_path,modality,prompt``; Bradley-Terry loss
  ``-log sigmoid(s_preferred - s_other)``.
- ``bootstrap`` (no people): real or phantom images (good) against degraded copies of themselves
  (:mod:`rlhf.degrade`) and, optionally, generated images (bad). Loss: Bradley-Terry on (image,
  its degraded copy) plus binary cross-entropy on the absolute labels.

The threshold used for active selection is the one that maximises balanced accuracy between good
and bad on the validation split. A trained selector is a folder: ``head.safetensors``,
``config.json`` (threshold, feature dims, the alignment model it was trained on with the sha256 of
its weights) and ``metadata.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from tqdm import tqdm

from generator.config import DataConfig
from generator.data.records import ManifestRow
from generator.errors import SynthmedError, UserError
from generator.fileio import atomic_folder
from generator.modalities import resolve_modality

from .alignment import (
    AlignmentModel, AlignmentNotFoundError, default_manifests, load_alignment, load_images, manifest_rows, read_metadata, resolve_folder,
)
from .config import SelectorConfig
from .degrade import DEGRADATIONS, degrade_each, draw_degradations
from .metrics import auroc as labelled_auroc
from .scorers import ScoreResult, as_image_batch, check_inputs, register_scorer

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
SHIPPED_FOLDER = Path(__file__).resolve().parent / "weights" / "selector"
TRAIN_COMMAND = "synthmed judges train selector"
FEATURES = "concat(image, text, image * text) of the alignment model's unit embeddings, standardised on the training set"
RATINGS_COLUMNS = ("image_path", "rating", "modality", "expert_level", "prompt")
PAIRS_COLUMNS = ("preferred_path", "other_path", "modality", "prompt")
STANDARD_SCALES = ((0.0, 1.0), (1.0, 5.0), (1.0, 10.0), (0.0, 10.0), (0.0, 100.0))  # narrowest first


class SelectorNotFoundError(SynthmedError, FileNotFoundError):
    """The selector folder is missing or incomplete."""


# -- head and features ------------------------------------------------------------------------
class QualityHead(torch.nn.Module):
    """Features -> quality logit (B,). Features are standardised with the training set's mean and
    spread (kept as buffers, saved with the weights): embeddings of one kind of image share a large
    common component, and the differences that tell quality apart are small next to it."""

    def __init__(self, embed_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(3 * embed_dim))
        self.register_buffer("feature_std", torch.ones(3 * embed_dim))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3 * embed_dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1),
        )

    @torch.no_grad()
    def standardise_on(self, features: torch.Tensor) -> None:
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp(min=1e-4))  # a constant feature (one prompt for all) stays zero

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) / self.feature_std).squeeze(-1)


def selector_features(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(B, 3D): image, prompt and their product (whose sum is their cosine: how well they agree)."""
    return torch.cat([image_embeddings, text_embeddings, image_embeddings * text_embeddings], dim=1)


class Selector:
    """Quality in [0, 1] of images against their prompts, and the threshold for active selection."""

    def __init__(self, head: QualityHead, alignment: AlignmentModel, threshold: float, config: dict, folder: Path | None = None):
        self.head = head.eval()
        self.alignment = alignment
        self.threshold = float(threshold)
        self.config = config
        self.folder = folder

    def features(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return selector_features(self.alignment.encode_images(images), self.alignment.encode_texts(prompts))

    @torch.no_grad()
    def quality(self, images: Any, prompts: Sequence[str], modalities: Sequence[str] | None = None) -> np.ndarray:
        """(B,) in [0, 1]. ``modalities`` is checked, not used: the prompt names the modality."""
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities if modalities is not None else prompts)
        return torch.sigmoid(self.head(self.features(batch, prompts))).numpy().astype(np.float64)

    def select(self, images: Any, prompts: Sequence[str], modalities: Sequence[str] | None = None) -> np.ndarray:
        """(B,) bool: quality at or above the learned threshold."""
        return self.quality(images, prompts, modalities) >= self.threshold


# -- metrics ----------------------------------------------------------------------------------
def auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """Probability that a good item scores above a bad one (ties count half): :func:`rlhf.metrics.auroc`
    with the good items as the positive class; NaN when either set is empty."""
    good, bad = np.ravel(np.asarray(good, dtype=np.float64)), np.ravel(np.asarray(bad, dtype=np.float64))
    return labelled_auroc(np.concatenate([good, bad]), np.concatenate([np.ones(len(good)), np.zeros(len(bad))]))


def pairwise_accuracy(preferred: np.ndarray, other: np.ndarray) -> float:
    """Share of pairs where the preferred item scores higher (ties count half)."""
    diff = np.asarray(preferred, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return float(np.mean((diff > 0) + 0.5 * (diff == 0))) if len(diff) else float("nan")


def best_threshold(good: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy): the cut between sorted scores that best separates good
    (at or above) from bad (below); the midpoint of the best gap, so it lies in [0, 1]."""
    good, bad = np.asarray(good, dtype=np.float64), np.asarray(bad, dtype=np.float64)
    if not len(good) or not len(bad):
        return 0.5, float("nan")
    values = np.unique(np.concatenate([good, bad]))
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    tpr = (good[None, :] >= cuts[:, None]).mean(axis=1)
    tnr = (bad[None, :] < cuts[:, None]).mean(axis=1)
    balanced = (tpr + tnr) / 2
    best = int(np.argmax(balanced))
    return float(np.clip(cuts[best], 0.0, 1.0)), float(balanced[best])


# -- data -------------------------------------------------------------------------------------
@dataclass
class GeneratedImages:
    """Generated images the caller has, used as extra bad examples (label 0) in the bootstrap."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    prompts: list[str]
    modalities: list[str]


@dataclass
class RatingsTable:
    paths: list[str]  # absolute image paths, one per row
    ratings: np.ndarray  # (N,) as given
    targets: np.ndarray  # (N,) normalised to [0, 1]
    weights: np.ndarray  # (N,) expert weight of each row
    levels: list[str]
    modalities: list[str]
    prompts: list[str]
    scale: tuple[float, float]  # (worst, best) rating


def _read_csv(path: str | os.PathLike, columns: Sequence[str], what: str) -> tuple[Path, list[dict[str, str]]]:
    from generator.data.sources import csv_encoding, csv_read_error

    path = resolve_folder(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the {what} CSV file in it")
    if not path.is_file():
        raise UserError(f"{what} CSV not found: {path}")
    try:
        with open(path, newline="", encoding=csv_encoding(path)) as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            missing = [c for c in columns if c not in header]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)}; a {what} CSV has the header {','.join(columns)}")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (UnicodeError, csv.Error) as exc:
        raise UserError(csv_read_error(path, exc, f"{what} CSV")) from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return path, rows


def detect_scale(ratings: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(ratings)), float(np.max(ratings))
    for scale in STANDARD_SCALES:
        if scale[0] <= lo and hi <= scale[1]:
            return scale
    raise UserError(f"ratings from {lo:g} to {hi:g} fit none of the scales 0-1, 1-5, 1-10, 0-10, 0-100; set judges.selector.rating_scale=[worst, best]")


def read_ratings(path: str | os.PathLike, cfg: SelectorConfig, data: DataConfig | None = None) -> RatingsTable:
    """The ratings CSV, normalised and weighted; image paths are relative to the CSV's folder."""
    path, rows = _read_csv(path, RATINGS_COLUMNS, "ratings")
    modalities = (data or DataConfig()).modalities
    given = tuple(cfg.rating_scale) if cfg.rating_scale is not None else None
    if given is not None and given[1] <= given[0]:
        raise UserError(f"judges.selector.rating_scale must be (worst, best) with best > worst, got {given}")
    paths, ratings, weights, levels, mods, prompts = [], [], [], [], [], []
    for line, row in enumerate(rows, start=2):  # (a quoted field holding a line break makes later numbers approximate)
        level = row["expert_level"].lower()
        if level not in cfg.expert_weights:
            raise UserError(f"{path}, line {line}: unknown expert_level {row['expert_level'][:40]!r}; known levels: "
                            f"{', '.join(cfg.expert_weights)} (add it to judges.selector.expert_weights)")
        try:
            rating = float(row["rating"])
        except ValueError:
            rating = None
        if rating is None or not np.isfinite(rating):
            raise UserError(f"{path}, line {line}: rating {row['rating'][:40]!r} is not a number; write a number such as 4") from None
        if given is not None and not given[0] <= rating <= given[1]:
            raise UserError(f"{path}, line {line}: rating {rating:g} is outside judges.selector.rating_scale "
                            f"{given[0]:g}-{given[1]:g}; fix the rating or the scale")
        ratings.append(rating)
        if not row["image_path"] or "\x00" in row["image_path"]:
            raise UserError(f"{path}, line {line}: image_path is empty or holds a NUL byte; give the image file, "
                            "relative to the CSV's folder")
        paths.append(str((path.parent / row["image_path"]).resolve()))
        weights.append(float(cfg.expert_weights[level]))
        levels.append(level)
        try:
            mods.append(resolve_modality(row["modality"], modalities))
        except UserError as exc:
            raise UserError(f"{path}, line {line}: {exc}") from None
        prompts.append(row["prompt"])
    values = np.asarray(ratings, dtype=np.float64)
    scale = given if given is not None else detect_scale(values)
    targets = np.clip((values - scale[0]) / (scale[1] - scale[0]), 0.0, 1.0)
    return RatingsTable(paths, values, targets, np.asarray(weights), levels, mods, prompts, (float(scale[0]), float(scale[1])))


def _encode_files(alignment: AlignmentModel, paths: Sequence[str], modalities: Sequence[str], prompts: Sequence[str],
                  data: DataConfig | None, progress: bool) -> torch.Tensor:
    """Features of image files (each file decoded once) with their prompts."""
    unique = list(dict.fromkeys(zip(paths, modalities)))
    for p, _ in unique:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p} (paths in the CSV are relative to its folder)")
    cache = load_images([ManifestRow(path=p, text="", modality=m) for p, m in unique], alignment.image_size, data, progress)
    where = {key: i for i, key in enumerate(unique)}
    images = cache.images[torch.tensor([where[k] for k in zip(paths, modalities)])].float().div(127.5).sub(1.0)
    return _features(alignment, images, prompts)


def _features(alignment: AlignmentModel, images: torch.Tensor, prompts: Sequence[str], chunk: int = 512) -> torch.Tensor:
    text_cache: dict[str, torch.Tensor] = {}
    unique = [p for p in dict.fromkeys(prompts)]
    for i in range(0, len(unique), chunk):
        for p, e in zip(unique[i : i + chunk], alignment.encode_texts(unique[i : i + chunk])):
            text_cache[p] = e
    texts = torch.stack([text_cache[p] for p in prompts])
    image_emb = torch.cat([alignment.encode_images(images[i : i + chunk]) for i in range(0, len(images), chunk)])
    return selector_features(image_emb, texts)


def _degraded_features(alignment: AlignmentModel, images: torch.Tensor, prompts: Sequence[str],
                       plan: Sequence[tuple[int, str, int]], seed: int, progress: bool, chunk: int = 512) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(plan), chunk), desc="degraded copies", unit=" chunk", disable=not progress):
        part = plan[start : start + chunk]
        idx = [p[0] for p in part]
        degraded = degrade_each(images[idx], [p[1] for p in part], [p[2] for p in part], seed=seed + start)
        out.append(_features(alignment, degraded, [prompts[i] for i in idx], chunk))
    return torch.cat(out)


# -- training ---------------------------------------------------------------------------------
def _fit_head(head: QualityHead, loss_fn: Callable[[np.ndarray], torch.Tensor], n_items: int, cfg: SelectorConfig,
              progress: bool) -> list[float]:
    """AdamW over ``n_items`` training items in seeded batches; ``loss_fn(indices)`` -> loss."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, n_items)
    steps = max(1, -(-n_items // batch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    head.train()
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="train selector", unit=" epoch", disable=not progress):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_items)
        losses = []
        for s in range(steps):
            loss = loss_fn(order[s * batch : (s + 1) * batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history.append(round(float(np.mean(losses)), 5))
    head.eval()
    return history


@torch.no_grad()
def _quality(head: QualityHead, features: torch.Tensor) -> np.ndarray:
    head.eval()
    return torch.sigmoid(head(features)).numpy().astype(np.float64)


def train_selector(
    cfg: SelectorConfig,
    alignment: AlignmentModel,
    out_dir: str | os.PathLike | None = None,
    *,
    train_rows: Sequence[ManifestRow] | None = None,
    val_rows: Sequence[ManifestRow] | None = None,
    generated: GeneratedImages | None = None,
    data: DataConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train the head on ``alignment``'s frozen features per ``cfg.source``, save to ``out_dir``
    (default ``cfg.out``); returns the summary also written to ``metadata.json``.

    ``bootstrap`` uses ``train_rows`` / ``val_rows`` (pass the alignment model's split so that the
    validation images are new to both); without them, ``cfg.data`` (default: phantoms) split by
    ``cfg.val_fraction`` and ``cfg.seed``. ``generated`` adds bad examples to the bootstrap."""
    from generator.training import environment  # training-only imports stay out of scoring

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    head = QualityHead(alignment.embed_dim, cfg.hidden, cfg.dropout)
    if cfg.source == "bootstrap":
        if train_rows is None or val_rows is None:
            train_rows, val_rows = bootstrap_rows(cfg, alignment, data)
        result = _train_bootstrap(head, cfg, alignment, list(train_rows), list(val_rows), generated, data, progress)
    elif cfg.source == "ratings":
        if not cfg.ratings:
            raise UserError("judges.selector.source=ratings needs judges.selector.ratings (a CSV image_path,rating,modality,expert_level,prompt)")
        result = _train_ratings(head, cfg, alignment, data, progress)
    else:
        if not cfg.pairs:
            raise UserError("judges.selector.source=pairs needs judges.selector.pairs (a CSV preferred_path,other_path,modality,prompt)")
        result = _train_pairs(head, cfg, alignment, data, progress)
    threshold, metrics, data_info, history = result
    alignment_info = {
        "folder": str(alignment.folder) if alignment.folder is not None else None,
        "weights_sha256": alignment.weights_hash,
        "embed_dim": head.net[0].in_features // 3,
        "image_size": alignment.image_size,
    }
    config = {
        "version": FORMAT_VERSION,
        "threshold": threshold,  # quality at or above which an image is selected
        "features": FEATURES,
        "feature_dim": head.net[0].in_features,
        "head": {"hidden": cfg.hidden, "dropout": cfg.dropout},
        "alignment": alignment_info,
        "source": cfg.source,
    }
    summary = {
        "version": FORMAT_VERSION,
        "kind": "synthmed quality selector",
        "source": cfg.source,
        "data": data_info,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "threshold": threshold,
        "metrics": metrics,
        "train_loss": history,
        "alignment": alignment_info,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(alignment.device),
        "environment": environment(),
        "command": " ".join(sys.argv),
    }
    out = Path(out_dir if out_dir is not None else cfg.out)
    save_selector(head, out, config, summary)
    summary["folder"] = str(out)
    return summary


def bootstrap_rows(cfg: SelectorConfig, alignment: AlignmentModel, data: DataConfig | None = None) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train, val) images for the bootstrap: ``cfg.data`` split by ``cfg.val_fraction`` and ``cfg.seed``;
    without ``cfg.data``, the alignment model's own data and split, so validation images are new to both."""
    from generator.training import split_rows

    if cfg.data:
        return split_rows(manifest_rows(cfg.data, data), cfg.val_fraction, cfg.seed)
    recorded = read_metadata(alignment.folder).get("data", {}) if alignment.folder is not None else {}
    if recorded.get("manifests") and "split_seed" in recorded:
        rows = manifest_rows(recorded["manifests"], data)
        return split_rows(rows, recorded["val_fraction"], recorded["split_seed"])
    return split_rows(manifest_rows(default_manifests(alignment.image_size), data), cfg.val_fraction, cfg.seed)


def _train_bootstrap(head, cfg, alignment, train_rows, val_rows, generated, data, progress):
    if not train_rows or not val_rows:
        raise UserError(f"the bootstrap needs training and validation images, got {len(train_rows)} and {len(val_rows)}")
    train = load_images(train_rows, alignment.image_size, data, progress)
    val = load_images(val_rows, alignment.image_size, data, progress)
    train_images = train.images.float().div(127.5).sub(1.0)
    val_images = val.images.float().div(127.5).sub(1.0)
    good = _features(alignment, train_images, train.texts)
    plan = draw_degradations(len(train), cfg.copies_per_image, cfg.degradations, cfg.severities, cfg.seed)
    bad = _degraded_features(alignment, train_images, train.texts, plan, cfg.seed, progress)
    source_of_bad = torch.tensor([p[0] for p in plan])

    gen_train = gen_val = None
    if generated is not None and len(generated.images):
        check_inputs(generated.images, generated.prompts, generated.modalities)
        order = np.random.default_rng(cfg.seed).permutation(len(generated.images))
        n_val = max(1, int(round(len(order) * cfg.val_fraction))) if len(order) > 1 else 0
        gen_all = _features(alignment, as_image_batch(generated.images), generated.prompts)
        gen_val, gen_train = gen_all[order[:n_val]], gen_all[order[n_val:]]
    gen_rng = np.random.default_rng([cfg.seed, 1])

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        s_bad = head(bad[idx])
        s_good = head(good[source_of_bad[idx]])
        ranking = F.softplus(-(s_good - s_bad)).mean()  # Bradley-Terry: -log sigmoid(s_good - s_bad)
        negatives = F.binary_cross_entropy_with_logits(s_bad, torch.zeros_like(s_bad))
        if gen_train is not None and len(gen_train):
            pick = torch.from_numpy(gen_rng.integers(0, len(gen_train), size=len(idx)))
            s_gen = head(gen_train[pick])
            negatives = (negatives + F.binary_cross_entropy_with_logits(s_gen, torch.zeros_like(s_gen))) / 2
        absolute = (F.binary_cross_entropy_with_logits(s_good, torch.ones_like(s_good)) + negatives) / 2
        return absolute + cfg.pair_weight * ranking

    head.standardise_on(torch.cat([good, bad] + ([gen_train] if gen_train is not None else [])))
    history = _fit_head(head, loss_fn, len(plan), cfg, progress)

    # validation: every held-back image against each of its degraded copies, every kind and severity
    q_good = _quality(head, _features(alignment, val_images, val.texts))
    val_plan = [(i, kind, severity) for kind in cfg.degradations for severity in cfg.severities for i in range(len(val))]
    q_bad = _quality(head, _degraded_features(alignment, val_images, val.texts, val_plan, cfg.seed + 10_000, progress))
    source = np.array([p[0] for p in val_plan])
    kinds = np.array([p[1] for p in val_plan])
    severities = np.array([p[2] for p in val_plan])
    q_bad_all = q_bad if gen_val is None else np.concatenate([q_bad, _quality(head, gen_val)])
    threshold, balanced = best_threshold(q_good, q_bad_all)
    metrics: dict[str, Any] = {
        "pairwise_accuracy": round(pairwise_accuracy(q_good[source], q_bad), 4),
        "pairwise_accuracy_by_degradation": {k: round(pairwise_accuracy(q_good[source[kinds == k]], q_bad[kinds == k]), 4) for k in cfg.degradations},
        "pairwise_accuracy_by_severity": {str(s): round(pairwise_accuracy(q_good[source[severities == s]], q_bad[severities == s]), 4) for s in cfg.severities},
        "pairwise_accuracy_by_modality": {m: round(pairwise_accuracy(q_good[source[np.asarray(val.modalities)[source] == m]], q_bad[np.asarray(val.modalities)[source] == m]), 4)
                                          for m in sorted(set(val.modalities))},
        "auroc": round(auroc(q_good, q_bad_all), 4),
        "auroc_by_degradation": {k: round(auroc(q_good, q_bad[kinds == k]), 4) for k in cfg.degradations},
        "balanced_accuracy_at_threshold": round(balanced, 4),
        "selected_share_good": round(float(np.mean(q_good >= threshold)), 4),
        "selected_share_degraded": round(float(np.mean(q_bad >= threshold)), 4),
        "quality_mean_good": round(float(q_good.mean()), 4),
        "quality_mean_degraded": round(float(q_bad.mean()), 4),
        "val_images": len(val), "val_degraded": len(val_plan),
    }
    if gen_val is not None and len(gen_val):
        q_gen = _quality(head, gen_val)
        metrics["auroc_vs_generated"] = round(auroc(q_good, q_gen), 4)
        metrics["quality_mean_generated"] = round(float(q_gen.mean()), 4)
    data_info = {"train_images": len(train), "train_degraded": len(plan), "val_images": len(val),
                 "generated": 0 if generated is None else len(generated.images),
                 "degradations": list(cfg.degradations), "severities": list(cfg.severities)}
    return threshold, metrics, data_info, history


def _group_split(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), split by key (an image) so no image is on both sides."""
    unique = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = max(1, int(round(len(unique) * val_fraction))) if len(unique) > 1 else 0
    val_keys = {unique[i] for i in order[:n_val]}
    in_val = np.array([k in val_keys for k in keys])
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def _train_ratings(head, cfg, alignment, data, progress):
    table = read_ratings(cfg.ratings, cfg, data)
    features = _encode_files(alignment, table.paths, table.modalities, table.prompts, data, progress)
    train_idx, val_idx = _group_split(table.paths, cfg.val_fraction, cfg.seed)
    targets = torch.from_numpy(table.targets).float()
    weights = torch.from_numpy(table.weights).float()

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(train_idx[idx])
        per_row = F.binary_cross_entropy_with_logits(head(features[rows]), targets[rows], reduction="none")
        return (weights[rows] * per_row).sum() / weights[rows].sum()

    head.standardise_on(features[torch.from_numpy(train_idx)])
    history = _fit_head(head, loss_fn, len(train_idx), cfg, progress)
    # one score per validation image against its expert-weighted mean rating
    q = _quality(head, features)
    per_image: dict[str, list[int]] = {}
    for i in val_idx:
        per_image.setdefault(table.paths[i], []).append(int(i))
    q_img = np.array([q[rows[0]] for rows in per_image.values()])
    t_img = np.array([np.average(table.targets[rows], weights=table.weights[rows]) for rows in per_image.values()])
    good, bad = q_img[t_img >= cfg.good_rating], q_img[t_img < cfg.good_rating]
    threshold, balanced = best_threshold(good, bad)
    rho = spearmanr(q_img, t_img).statistic if len(q_img) > 2 and np.ptp(t_img) > 0 else float("nan")
    metrics = {"spearman": round(float(rho), 4), "auroc": round(auroc(good, bad), 4),
               "balanced_accuracy_at_threshold": round(balanced, 4), "val_images": len(per_image), "val_rows": int(len(val_idx))}
    levels = {level: int(sum(1 for l in table.levels if l == level)) for level in dict.fromkeys(table.levels)}
    data_info = {"ratings": str(cfg.ratings), "rows": len(table.paths), "images": len(set(table.paths)),
                 "rating_scale": list(table.scale), "normalisation": f"(rating - {table.scale[0]:g}) / {table.scale[1] - table.scale[0]:g}",
                 "rows_per_expert_level": levels, "expert_weights": dict(cfg.expert_weights)}
    return threshold, metrics, data_info, history


def _train_pairs(head, cfg, alignment, data, progress):
    path, rows = _read_csv(cfg.pairs, PAIRS_COLUMNS, "preferences")
    modalities = (data or DataConfig()).modalities
    mods = [resolve_modality(r["modality"], modalities) for r in rows]
    preferred = [str((path.parent / r["preferred_path"]).resolve()) for r in rows]
    other = [str((path.parent / r["other_path"]).resolve()) for r in rows]
    prompts = [r["prompt"] for r in rows]
    f_pref = _encode_files(alignment, preferred, mods, prompts, data, progress)
    f_other = _encode_files(alignment, other, mods, prompts, data, progress)
    train_idx, val_idx = _group_split([f"{a}|{b}" for a, b in zip(preferred, other)], cfg.val_fraction, cfg.seed)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        rows_ = torch.from_numpy(train_idx[idx])
        return F.softplus(-(head(f_pref[rows_]) - head(f_other[rows_]))).mean()  # Bradley-Terry

    head.standardise_on(torch.cat([f_pref[torch.from_numpy(train_idx)], f_other[torch.from_numpy(train_idx)]]))
    history = _fit_head(head, loss_fn, len(train_idx), cfg, progress)
    q_pref, q_other = _quality(head, f_pref[torch.from_numpy(val_idx)]), _quality(head, f_other[torch.from_numpy(val_idx)])
    threshold, balanced = best_threshold(q_pref, q_other)
    metrics = {"pairwise_accuracy": round(pairwise_accuracy(q_pref, q_other), 4), "auroc": round(auroc(q_pref, q_other), 4),
               "balanced_accuracy_at_threshold": round(balanced, 4), "val_pairs": int(len(val_idx))}
    data_info = {"pairs": str(cfg.pairs), "rows": len(rows), "train_pairs": int(len(train_idx)), "val_pairs": int(len(val_idx))}
    return threshold, metrics, data_info, history


# -- save / load ------------------------------------------------------------------------------
def save_selector(head: QualityHead, folder: str | os.PathLike, config: dict, metadata: dict) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return folder


def load_selector(folder: str | os.PathLike | None = None, alignment: AlignmentModel | None = None, device: str = "auto") -> Selector:
    """The selector in ``folder`` (default: the shipped one) on ``alignment`` (default: the model
    it was trained on, as recorded in its config.json). Another alignment model is an error."""
    path = resolve_folder(SHIPPED_FOLDER if folder is None else folder)
    missing = [name for name in ("head.safetensors", "config.json") if not (path / name).is_file()]
    if missing:
        raise SelectorNotFoundError(
            f"no selector in {path} ({', '.join(missing)} missing); train one with `{TRAIN_COMMAND}` "
            "(writes judges.selector.out, default rlhf/weights/selector) or point judges.selector.out at a trained selector folder"
        )
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    recorded = config["alignment"]
    if alignment is None:
        if not recorded.get("folder"):
            raise ValueError(f"{path}: the selector was trained on an unsaved alignment model; pass that model as `alignment`")
        try:
            alignment = load_alignment(recorded["folder"], device=device)
        except AlignmentNotFoundError as exc:
            raise AlignmentNotFoundError(f"selector {path} needs its alignment model: {exc}") from None
    if alignment.weights_hash != recorded["weights_sha256"]:
        raise UserError(
            f"selector {path} was trained on alignment model {recorded['weights_sha256'][:12]} ({recorded.get('folder')}), "
            f"but the one given is {alignment.weights_hash[:12]} ({alignment.folder}); load the alignment model it was "
            f"trained on, or retrain the selector on this one with `{TRAIN_COMMAND}`"
        )
    head = QualityHead(recorded["embed_dim"], config["head"]["hidden"], config["head"]["dropout"])
    head.load_state_dict(load_file(str(path / "head.safetensors")), strict=True)
    return Selector(head, alignment, config["threshold"], config, path)


# -- scorer -----------------------------------------------------------------------------------
class SelectorScorer:
    """Reward component: the selector's quality; details say whether each image clears the threshold."""

    name = "selector"

    def __init__(self, selector: Selector):
        self.selector = selector

    def score(self, images: Any, prompts: Sequence[str], modalities: Sequence[str]) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        quality = self.selector.quality(batch, prompts, modalities)
        return quality, {"quality": quality, "above_threshold": (quality >= self.selector.threshold).astype(np.float64)}


@register_scorer("selector")
def selector_scorer(folder: str | os.PathLike | None = None, alignment: AlignmentModel | None = None, device: str = "auto",
                    selector: Selector | None = None) -> SelectorScorer:
    """The selector scorer on ``selector``, or on the selector in ``folder`` (default: the shipped one)."""
    return SelectorScorer(selector if selector is not None else load_selector(folder, alignment, device))


__all__ = [
    "DEGRADATIONS", "GeneratedImages", "QualityHead", "RatingsTable", "Selector", "SelectorNotFoundError", "SelectorScorer",
    "auroc", "best_threshold", "bootstrap_rows", "detect_scale", "load_selector", "pairwise_accuracy", "read_ratings", "save_selector",
    "selector_features", "selector_scorer", "train_selector",
]


