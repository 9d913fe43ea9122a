"""Amortised reward guidance: a table of x0_hat offsets, one per (DDIM step, feature of a request's structured
expectation), fitted by ridge regression to the shifts reward guidance applied on drafts of training requests.

Reward guidance (:mod:`rlhf.guidance`) moves every step's x0_hat along the reward classifier's gradient, a gradient per
image. Measured, most of that shift is a direction of the *request*, shared by its images whatever their noise
(``docs/improve/probes/guidance_shift_structure.py``), so a table keyed by what the request states holds it:

    shift(request, step) ~= sum over the request's features f of W[step, f]

with one feature per (modality, finding, present, side), per (modality, finding, stated absent) and per modality (its
bias). Steering with the table (:func:`table_steered_draw`) needs no classifier and no gradient at sampling: one lookup
per step. The fit only ever sees the reward's classifiers' guidance (drafts of training requests); the held-out
evaluator never enters it. ``docs/improve/long_runs.md`` has what it does to the evaluator's figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from generator.errors import UserError

from .guidance import GuidedDraw, steered_draw

FORMAT = "synthmed-offset-table-1"


def request_features(modality: str, findings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's features of one request: its modality's bias, each present finding with its side, each finding it
    states absent ("stated": False, the absences a normal study implies without naming them, are left out)."""
    out = [f"{modality}|_bias"]
    for f in findings:
        if f["present"]:
            out.append(f"{modality}|{f['name']}|present|{f.get('laterality') or '-'}")
        elif f.get("stated", True):
            out.append(f"{modality}|{f['name']}|absent")
    return out


class OffsetTable:
    """``weights`` (T, F, C, h, w): the offset of feature f at fitted step t, for the scheduler's ``timesteps`` (T, in
    sampling order); ``features`` name the F columns."""

    def __init__(self, features: Sequence[str], timesteps: Sequence[int], weights: torch.Tensor, ridge: float = 0.0):
        if weights.dim() < 3 or weights.shape[:2] != (len(timesteps), len(features)):
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not match {len(timesteps)} timesteps x {len(features)} features")
        if len(set(features)) != len(features):
            raise ValueError("the table's features repeat")
        self.features = list(features)
        self.index = {f: k for k, f in enumerate(self.features)}
        self.timesteps = [int(t) for t in timesteps]
        self.weights = weights.float()
        self.ridge = float(ridge)
        self.fit_r2: list[float] | None = None  # per step, R2 on the drafts :meth:`fit` was fitted to

    @classmethod
    def fit(cls, features: Sequence[Sequence[str]], shifts: torch.Tensor, timesteps: Sequence[int], ridge: float = 1.0) -> "OffsetTable":
        """Per step, the ridge regression of the N drafts' shifts (N, T, C, h, w) on their features' indicators."""
        if not ridge >= 0:
            raise UserError(f"the offset table's ridge penalty must be 0 or more, got {ridge!r}")
        if shifts.dim() < 3 or shifts.shape[0] != len(features) or shifts.shape[1] != len(timesteps):
            raise ValueError(f"shifts of shape {tuple(shifts.shape)} do not match {len(features)} drafts x {len(timesteps)} steps")
        if not len(features):
            raise UserError("no drafts to fit the offset table to")
        vocab = sorted({f for fs in features for f in fs})
        table = cls(vocab, timesteps, torch.zeros(len(timesteps), len(vocab), *shifts.shape[2:]), ridge)
        X = table.design(features).double()
        gram = X.T @ X + ridge * torch.eye(len(vocab), dtype=X.dtype)
        n, steps = shifts.shape[:2]
        rhs = X.T @ shifts.reshape(n, -1).double()  # every step's right-hand sides at once: (F, T x D)
        # lstsq, not solve: with no ridge a feature that always comes with another is not singular
        solution = torch.linalg.lstsq(gram, rhs).solution.float().view(len(vocab), steps, *shifts.shape[2:])
        table.weights = solution.transpose(0, 1).contiguous()
        table.fit_r2 = table.r2(features, shifts)  # what it holds of the data it was fitted to
        return table

    def design(self, features: Sequence[Sequence[str]]) -> torch.Tensor:
        """(N, F) indicators; a feature the table never saw adds nothing."""
        X = torch.zeros(len(features), len(self.features))
        for i, fs in enumerate(features):
            for f in fs:
                k = self.index.get(f)
                if k is not None:
                    X[i, k] = 1.0
        return X

    def r2(self, features: Sequence[Sequence[str]], shifts: torch.Tensor) -> list[float]:
        """Per step, the share of the shifts' energy the table explains."""
        pred = torch.einsum("nf,tfd->ntd", self.design(features), self.weights.flatten(2))
        flat = shifts.flatten(2).float()
        return [1 - float((flat[:, j] - pred[:, j]).pow(2).sum() / flat[:, j].pow(2).sum().clamp_min(1e-30))
                for j in range(len(self.timesteps))]

    def at(self, t: int | torch.Tensor) -> torch.Tensor:
        """(F, C, h, w): the offsets at timestep ``t``, linear between the two fitted timesteps around it (the first or
        last fitted one outside them), so a sampler with other steps than the fit's can use the table."""
        t = float(t)
        ts = self.timesteps
        order = sorted(range(len(ts)), key=lambda k: ts[k])
        lo = max((k for k in order if ts[k] <= t), key=lambda k: ts[k], default=order[0])
        hi = min((k for k in order if ts[k] >= t), key=lambda k: ts[k], default=order[-1])
        if ts[lo] == ts[hi]:
            return self.weights[lo]
        w = (t - ts[lo]) / (ts[hi] - ts[lo])
        return (1 - w) * self.weights[lo] + w * self.weights[hi]

    def offset(self, features: Sequence[Sequence[str]], t: int | torch.Tensor) -> torch.Tensor:
        """(N, C, h, w): each request's offset at timestep ``t``."""
        return torch.einsum("nf,fd->nd", self.design(features), self.at(t).flatten(1)).view(len(features), *self.weights.shape[2:])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from generator.fileio import atomic_write

        meta = {"format": FORMAT, "features": json.dumps(self.features), "timesteps": json.dumps(self.timesteps),
                "ridge": repr(self.ridge)}
        return atomic_write(path, lambda tmp: save_file({"weights": self.weights.contiguous()}, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OffsetTable":
        from safetensors import safe_open

        from generator.safeload import check_safetensors

        fix = "refit it (docs/improve/probes/amortised_guidance.py) or remove it"
        check_safetensors(path, "offset table", fix)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "weights" not in f.keys():
                raise UserError(f"{path} is not a synthmed offset table (format {meta.get('format')!r}, want {FORMAT!r}); {fix}")
            weights = f.get_tensor("weights")
        try:
            return cls(json.loads(meta["features"]), json.loads(meta["timesteps"]), weights, float(meta.get("ridge", 0)))
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"offset table {path} is damaged ({exc}); {fix}") from None


@torch.no_grad()
def table_steered_draw(model, table: OffsetTable, gamma: float, prompts: Sequence[str], modalities: Sequence[str],
                       features: Sequence[Sequence[str]], noise_seeds: Sequence[int], steps: int, guidance: float,
                       negatives: Sequence[str] | None = None, findings: Sequence[Any] | None = None, batch_size: int = 8,
                       keep_trajectory: bool = False, on_batch: Callable[[int], None] | None = None) -> GuidedDraw:
    """A DDIM draw (eta 0) per prompt with every step's x0_hat moved by ``gamma`` x the table's offset for the request's
    ``features`` (:func:`request_features`): no classifier runs. gamma 0 is the plain sampler, image for image."""
    def shift(x0: torch.Tensor, rows: list[int], j: int, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return gamma * table.offset([features[i] for i in rows], int(t)).to(x0.device)

    return steered_draw(model, shift, prompts, modalities, noise_seeds, steps, guidance, negatives, findings, batch_size,
                        keep_trajectory, on_batch)


__all__ = ["FORMAT", "OffsetTable", "request_features", "table_steered_draw"]
