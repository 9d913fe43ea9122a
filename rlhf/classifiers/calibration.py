"""Metrics and calibration of the finding classifiers: ECE, masked NLL, the temperature, AUROC per label."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import auroc
from .data import LabelledImages
from .layout import ECE_BINS


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None, bins: int = ECE_BINS) -> float:
    """ECE over every known (image, label) pair: the count-weighted mean |accuracy - confidence|
    over ``bins`` equal-width bins of predicted probability (a multi-label model's probabilities
    are each a binary forecast, so they are pooled)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    mask = np.ones_like(probs, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    p, y = probs[mask], labels[mask]
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / p.size)


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy over known labels, of ``logits / temperature``."""
    if not known.any():
        return float("nan")
    loss = F.binary_cross_entropy_with_logits(logits / temperature, targets, reduction="none")
    return float(loss[known].mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> float:
    """One temperature for the whole model, minimising the NLL on the calibration split.

    One per model, not one per label: the calibration split holds a few dozen positives per label
    at most, and a per-label fit on that would mostly fit noise. A log-spaced grid over
    [0.05, 20] that contains exactly 1 means the fit can never raise the calibration NLL above the
    uncalibrated one."""
    if not known.any():
        return 1.0
    z, y = logits[known].double(), targets[known].double()
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 241, dtype=torch.float64))  # index 120 is exactly 1
    losses = torch.stack([F.binary_cross_entropy_with_logits(z / t, y) for t in grid])
    return float(grid[int(torch.argmin(losses))])


def fit_operating_points(probs: np.ndarray, targets: np.ndarray, known: np.ndarray, max_fpr: float | None) -> np.ndarray:
    """One decision threshold per label (``(L,)``): where the calibrated probability counts a finding as shown.

    For each label, of the thresholds at which at most ``max_fpr`` of the images without the finding are called
    positive, the one with the highest sensitivity minus false-positive rate (Youden's J under a specificity
    floor); ties go to the higher threshold. A fixed 0.5 fails small findings: a nodule's or a microaneurysm's
    calibrated probability rarely reaches it even where the image shows one, because at 64 px the classifier is
    never that sure, though it ranks them well. A label without both positives and negatives among the rows, or
    ``max_fpr`` None, keeps 0.5."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    out = np.full(probs.shape[1], 0.5)
    if max_fpr is None:
        return out
    for j in range(probs.shape[1]):
        p, y = probs[known[:, j], j], targets[known[:, j], j] > 0.5
        if not y.any() or y.all():
            continue
        pos, neg = np.sort(p[y]), np.sort(p[~y])
        candidates = np.unique(np.concatenate([p, [0.5]]))
        tpr = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)  # share of positives >= t
        fpr = 1.0 - np.searchsorted(neg, candidates, side="left") / len(neg)
        allowed = fpr <= max_fpr + 1e-12
        if not allowed.any():
            continue
        score = np.where(allowed, tpr - fpr, -np.inf)
        best = np.flatnonzero(score == score.max())[-1]  # the highest threshold of the best
        out[j] = float(candidates[best])
    return out


def operating_point_metrics(probs: np.ndarray, targets: np.ndarray, known: np.ndarray, thresholds: np.ndarray,
                            label_names: Sequence[str]) -> dict[str, Any]:
    """Sensitivity and specificity of each label at its threshold, on held-out rows (NaN where undefined)."""
    out = {}
    for j, name in enumerate(label_names):
        p, y = probs[known[:, j], j], targets[known[:, j], j] > 0.5
        shown = p >= thresholds[j]
        out[name] = {"threshold": float(thresholds[j]),
                     "sensitivity": float(shown[y].mean()) if y.any() else float("nan"),
                     "specificity": float((~shown[~y]).mean()) if (~y).any() else float("nan"),
                     "sensitivity_at_0.5": float((p[y] >= 0.5).mean()) if y.any() else float("nan")}
    return out


def classification_metrics(logits: torch.Tensor, data: LabelledImages, label_names: Sequence[str], temperature: float,
                           thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """AUROC per label and macro, ECE and NLL before and after temperature scaling; with ``thresholds``, each
    label's sensitivity and specificity at its operating point (``operating_points``)."""
    targets, known = data.targets.numpy(), data.known.numpy()
    before = torch.sigmoid(logits).numpy()
    after = torch.sigmoid(logits / temperature).numpy()
    per_label = {name: auroc(after[known[:, j], j], targets[known[:, j], j]) for j, name in enumerate(label_names)}
    defined = [v for v in per_label.values() if math.isfinite(v)]
    return {
        "images": len(data),
        "auroc_macro": float(np.mean(defined)) if defined else float("nan"),
        "auroc": per_label,
        "positives": {name: int(targets[known[:, j], j].sum()) for j, name in enumerate(label_names)},
        "ece_before": expected_calibration_error(before, targets, known),
        "ece_after": expected_calibration_error(after, targets, known),
        "nll_before": masked_nll(logits, data.targets, data.known),
        "nll_after": masked_nll(logits, data.targets, data.known, temperature),
        **({"operating_points": operating_point_metrics(after, targets, known, thresholds, label_names)} if thresholds is not None else {}),
    }
