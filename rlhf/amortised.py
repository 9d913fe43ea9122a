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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from generator.steering import FORMAT, OffsetTable, request_features  # the table lives with the sampler that steers by it

from .guidance import GuidedDraw, steered_draw


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
