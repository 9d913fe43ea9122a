"""DDPO's small pure functions: advantages, the PPO-clip loss, the KL penalty, per-prompt statistics.

The trainer (:mod:`rlhf.trainer`) composes these; each is tested on its own. What differs from the
anchors (ddpo-pytorch ``scripts/train.py`` + ``ddpo_pytorch/stat_tracking.py``, trl 0.23's
``DDPOTrainer.loss`` / ``calculate_loss``, flow_grpo's KL term):

1. :func:`group_advantages` normalises rewards within each prompt's group of K images of the *current*
   epoch (GRPO), ``(r - mean_g) / (std_g + eps)``; a group whose rewards are all equal gets advantage 0
   (no signal), where ddpo-pytorch would divide by ``eps`` alone and blow tiny float noise up.
2. :class:`PerPromptStatTracker` is ddpo-pytorch's tracker (a buffer of recent rewards per prompt,
   the batch's statistics until ``min_count`` are seen), with the same population std (``np.std``),
   but with ``state_dict`` / ``load_state_dict`` so a resumed run continues with the statistics it
   had (ddpo-pytorch's checkpoints drop them).
3. :func:`ppo_clip_loss` is trl's / ddpo-pytorch's loss: ``mean(max(-A r, -A clip(r, 1-c, 1+c)))``
   with ``r = exp(logp_new - logp_old)``, plus the same ``approx_kl = 0.5 mean((logp_new - logp_old)^2)``
   and ``clipfrac``. Advantages arrive already clipped (:func:`clip_advantages`), as in both anchors.
   It can return the per-element loss *sum* and a count, so micro-batches from several processes can
   be normalised by the global count (exactly one process's mean when gradients are summed).
4. :func:`gaussian_kl` is the KL between the policy's and the reference's Gaussian step with the same
   std: ``(mean - mean_ref)^2 / (2 std^2)``, averaged (or summed) over latent elements like the log
   density, as flow_grpo computes it with the adapter disabled. It is exactly 0 while the LoRA weights
   are 0.

5. :func:`predicted_x0`, :func:`output_for_x0` and :func:`guidance_shift` are reward guidance's arithmetic (stage 2's
   guided candidates, ``improve.selection.source="guided"``): x0_hat moved along the reward classifier's gradient and
   the UNet output that makes a DDIM step predict the moved x0_hat.

All arithmetic is float32 whatever the inputs (bf16 log-probs go NaN: flow_grpo #177).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from generator.ddim_logprob import output_for_x0, predicted_x0  # noqa: F401  (reward guidance's arithmetic, re-exported)
from generator.errors import UserError

__all__ = [
    "findings_log_likelihood", "guidance_shift", "output_for_x0", "predicted_x0", "stated_vector",
    "PerPromptStatTracker", "PPOTerms", "batch_advantages", "clip_advantages", "gaussian_kl", "group_advantages",
    "epoch_lr", "ppo_clip_loss",
]

EPS = 1e-6


def epoch_lr(lr: float, epoch: int, schedule: str = "constant", horizon: int = 1, min_ratio: float = 0.1) -> float:
    """The learning rate of ``epoch`` (1, 2, ...): ``lr`` throughout for "constant"; for "cosine", from ``lr`` at epoch 1
    along half a cosine to ``lr * min_ratio`` at epoch ``horizon``, and that floor after it."""
    if epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch}")
    if schedule == "constant":
        return float(lr)
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant or cosine")
    progress = min(1.0, (epoch - 1) / max(1, horizon - 1))
    return float(lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + np.cos(np.pi * progress))))


def _as_float(x: np.ndarray | Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array, got shape {a.shape}")
    return a


def group_advantages(rewards: np.ndarray | Sequence[float], groups: Sequence[Hashable], eps: float = EPS) -> np.ndarray:
    """(r - mean) / (std + eps) within each group (a prompt's K images); 0 for a group without spread."""
    r = _as_float(rewards)
    if len(groups) != len(r):
        raise ValueError(f"{len(r)} rewards but {len(groups)} group ids")
    out = np.zeros_like(r)
    index: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for members in index.values():
        values = r[members]
        std = values.std()
        if len(members) < 2 or std < eps:
            continue
        out[members] = (values - values.mean()) / (std + eps)
    return out


def batch_advantages(rewards: np.ndarray | Sequence[float], eps: float = EPS) -> np.ndarray:
    """(r - mean) / (std + eps) over the whole batch (ddpo-pytorch without per-prompt tracking)."""
    r = _as_float(rewards)
    std = r.std()
    return np.zeros_like(r) if std < eps else (r - r.mean()) / (std + eps)


def clip_advantages(advantages: np.ndarray, limit: float) -> np.ndarray:
    if limit <= 0:
        raise ValueError(f"the advantage clip must be > 0, got {limit}")
    return np.clip(np.asarray(advantages, dtype=np.float64), -limit, limit)


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt statistics, resumable. ``update(prompts, rewards)`` adds the rewards
    to each prompt's buffer (at most ``buffer_size`` newest) and returns the advantages: normalised
    by the prompt's buffer once it holds ``min_count`` rewards, by the batch's statistics before."""

    def __init__(self, buffer_size: int, min_count: int, eps: float = EPS):
        if buffer_size < 2 or min_count < 2:
            raise ValueError(f"buffer_size and min_count must be >= 2, got {buffer_size} and {min_count}")
        self.buffer_size, self.min_count, self.eps = int(buffer_size), int(min_count), eps
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray | Sequence[float]) -> np.ndarray:
        r = _as_float(rewards)
        if len(prompts) != len(r):
            raise ValueError(f"{len(r)} rewards but {len(prompts)} prompts")
        out = np.zeros_like(r)
        batch_mean, batch_std = r.mean(), r.std()
        for prompt in dict.fromkeys(prompts):
            members = [i for i, p in enumerate(prompts) if p == prompt]
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[members].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer))
            out[members] = 0.0 if std < self.eps else (r[members] - mean) / (std + self.eps)
        return out

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {p: list(v) for p, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("buffer_size") != self.buffer_size or state.get("min_count") != self.min_count:
            raise UserError(f"stat tracker state was saved with buffer {state.get('buffer_size')} / min count "
                            f"{state.get('min_count')}, this tracker has {self.buffer_size} / {self.min_count}")
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


@dataclass
class PPOTerms:
    loss: torch.Tensor  # scalar: the mean (or the sum with reduce="sum") of the clipped surrogate
    approx_kl: torch.Tensor  # scalar, 0.5 mean (logp_new - logp_old)^2 (detached)
    clipfrac: torch.Tensor  # scalar, share of ratios outside [1 - c, 1 + c] (detached)
    ratio: torch.Tensor  # (B,) detached
    count: int  # number of terms in ``loss``


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                  reduce: str = "mean") -> PPOTerms:
    """PPO-clip surrogate of one (B,) batch of transitions; ``advantages`` are already clipped."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
                         f"{tuple(advantages.shape)} must be equal (B,) shapes")
    log_prob, old_log_prob = log_prob.float(), old_log_prob.float().detach()
    advantages = advantages.float().detach()
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = per_sample.sum() if reduce == "sum" else per_sample.mean()
    with torch.no_grad():
        approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PPOTerms(loss, approx_kl, clipfrac, ratio.detach(), int(per_sample.numel()))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(B,) KL(N(mean, std^2) || N(ref_mean, std^2)) per element, averaged or summed over non-batch dims."""
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} differ")
    per_element = (mean.float() - ref_mean.float().detach()) ** 2 / (2 * std.float() ** 2)
    dims = tuple(range(1, per_element.ndim))
    return per_element.sum(dim=dims) if reduce == "sum" else per_element.mean(dim=dims)


def jittered_views(images: torch.Tensor, views: int, generator: torch.Generator, max_shift: float = 0.06,
                   max_zoom: float = 0.08) -> torch.Tensor:
    """``views`` differentiable copies of each image (``(views * B, C, H, W)``, view-major), each shifted by up to
    ``max_shift`` of the side and zoomed by up to ``max_zoom`` (uniform draws from ``generator``; borders repeat).
    A reward-gradient objective that averages a classifier over such views must change what the classifier still
    reads after the jitter it was trained with, not one pixel pattern only it sees. ``views == 1``: the images."""
    if views == 1:
        return images
    b = images.shape[0]
    n = views * b
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_zoom
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift)  # affine_grid's coordinates span 2 per side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    theta = theta.to(images.device, images.dtype)
    repeated = images.repeat(views, 1, 1, 1)
    grid = F.affine_grid(theta, list(repeated.shape), align_corners=False)
    return F.grid_sample(repeated, grid, mode="bilinear", padding_mode="border", align_corners=False)


def findings_log_likelihood(logits: torch.Tensor, stated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable form of the findings reward (``findings_form="log"``) for reward-gradient updates.

    ``logits`` (B, L) are the reward classifier's temperature-scaled logits; ``stated`` (B, L) holds +1 where
    the prompt asks for the finding, -1 where it states it absent and 0 where it says nothing. Returns the
    per-image mean of ``log p`` (present) and ``log(1 - p)`` (absent) over its stated findings, (B,), and a
    (B,) mask of the images that state any (the others carry 0 and should not enter a mean)."""
    if logits.shape != stated.shape or logits.ndim != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and stated {tuple(stated.shape)} must be equal (B, L) shapes")
    stated = stated.to(logits.dtype).detach()
    terms = F.logsigmoid(logits * stated) * stated.abs()  # log sigma(z) if present, log sigma(-z) = log(1 - p) if absent
    counts = stated.abs().sum(dim=1)
    has = counts > 0
    return terms.sum(dim=1) / counts.clamp_min(1), has


def stated_vector(expected: Mapping[str, bool], labels: Sequence[str]) -> torch.Tensor:
    """(L,) over ``labels``: +1 where ``expected`` (finding -> present) asks for the label, -1 where it states it absent,
    else 0 (names no label stands for are not read): the ``stated`` rows of :func:`findings_log_likelihood`."""
    out = torch.zeros(len(labels))
    column = {name: j for j, name in enumerate(labels)}
    for name, present in dict(expected).items():
        if name in column:
            out[column[name]] = 1.0 if present else -1.0
    return out


# -- reward guidance (stage 2's guided candidates) ---------------------------------------------------------
def guidance_shift(grad: torch.Tensor, scale: float, alpha_t: torch.Tensor) -> torch.Tensor:
    """The step reward guidance adds to x0_hat: ``scale * sqrt(alpha_t) * g / rms(g)``, ``g`` the reward's gradient at
    x0_hat and its RMS taken per sample. Normalised, the step's size does not depend on how steep the classifier is
    (its gradient spans orders of magnitude between an image it is sure of and one it is not); ``sqrt(alpha_t)`` lets
    it grow as the noise falls, when x0_hat is sharp enough for the classifier to read. A zero gradient adds nothing."""
    dims = tuple(range(1, grad.ndim))
    rms = grad.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
    unit = torch.where(rms > 0, grad.float() / rms.clamp_min(1e-30), torch.zeros_like(grad, dtype=torch.float32))
    return (scale * alpha_t.float().sqrt() * unit).to(grad.dtype)
