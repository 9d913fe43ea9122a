"""Reward guidance: a DDIM draw (eta 0) in which every step's predicted clean latent x0_hat moves along the gradient of
the **reward-role** finding classifiers' log likelihood of what the request states (present findings shown, absent ones
not), through the VAE decoder and averaged over jittered views; the step then continues from the moved x0_hat.

One function draws for both of its users: the loop's stage 2 (``improve.selection.source=guided``: the drafts the policy
is asked to learn, and the run's ``guided`` line) and the agent graph (``agents.reward_guidance``, ``synthmed generate
--reward-guidance``), so the images a user asks for are drawn exactly as the loop measured them. The held-out evaluator
never guides: :class:`RewardGuide` refuses any classifier whose role is not ``reward``. The arithmetic (x0_hat, the output
that predicts a moved x0_hat, the step's size) is in :mod:`rlhf.ddpo`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from generator.ddim_logprob import ddim_step_with_logprob
from generator.errors import UserError
from generator.models import latent_size
from generator.sampling import guided_conditioning, guided_prediction, initial_noise

from .ddpo import findings_log_likelihood, guidance_shift, jittered_views, output_for_x0, predicted_x0, stated_vector


@dataclass
class GuidedDraw:
    """What :func:`reward_guided_draw` drew, on the CPU."""

    finals: torch.Tensor  # (B, C, h, w): the final latents
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32
    states: torch.Tensor | None = None  # (B, T, C, h, w): x_t before each step (keep_trajectory)
    targets: torch.Tensor | None = None  # (B, T, C, h, w): the guided output each step took (keep_trajectory)
    shifts: torch.Tensor | None = None  # (B, T, C, h, w): how far each step's steering moved x0_hat (keep_trajectory)


class RewardGuide:
    """The reward-role classifiers' gradient for guided sampling.

    ``scorer`` is the reward's :class:`rlhf.classifiers.FindingScorer` (role ``reward``: the one the reward and the
    verifier use; the held-out evaluator is refused). ``scale``: x0_hat moves by ``scale * sqrt(alpha_t)`` in RMS units
    of its latent per step (:func:`rlhf.ddpo.guidance_shift`); ``views``: jittered copies of each decoded image the
    likelihood is averaged over, so the gradient cannot rest on one pixel pattern only that classifier reads."""

    def __init__(self, scorer, scale: float, views: int = 4, view_shift: float = 0.06, view_zoom: float = 0.08):
        role = getattr(scorer, "role", None)
        if role != "reward":
            raise ValueError(f"reward guidance uses the reward-role finding classifiers; got role {role!r}. "
                             "The held-out evaluator must never guide what it judges.")
        if not scale > 0:
            raise ValueError(f"reward guidance scale must be > 0, got {scale}")
        if views < 1:
            raise ValueError(f"reward guidance views must be >= 1, got {views}")
        self.scorer, self.scale, self.views = scorer, float(scale), int(views)
        self.view_shift, self.view_zoom = float(view_shift), float(view_zoom)

    def labels(self, modality: str) -> list[str]:
        classifier = self.scorer.classifiers.get(modality)
        if classifier is None:
            raise UserError(f"reward guidance: no reward-role finding classifier for modality {modality!r} (it has "
                            f"{', '.join(self.scorer.classifiers) or 'none'}); train one with `synthmed judges train` "
                            "or draw without reward guidance")
        return list(classifier.label_names)

    def stated(self, expected: Mapping[str, bool], modality: str) -> torch.Tensor:
        """(L,) over ``modality``'s labels: +1 where ``expected`` asks for the label, -1 where it states it absent, else 0
        (names no label stands for are not read)."""
        return stated_vector(expected, self.labels(modality))

    def gradient(self, model, x0: torch.Tensor, modalities: Sequence[str], stated: Sequence[torch.Tensor],
                 view_seeds: Sequence[int]) -> torch.Tensor:
        """d/dx0 of each image's log likelihood of its stated findings under its modality's classifier, averaged over
        ``views`` jittered views drawn from ``view_seeds[i]`` (one seed per image, so any batching draws the same)."""
        x0 = x0.detach().requires_grad_(True)
        with torch.enable_grad():
            images = model.decode(x0).float()
            total = images.new_zeros(())
            for modality in dict.fromkeys(modalities):
                rows = [i for i, m in enumerate(modalities) if m == modality]
                self.labels(modality)  # a clear error for a modality without a classifier
                classifier = self.scorer.classifiers[modality]
                seen = torch.cat([jittered_views(images[i:i + 1], self.views, torch.Generator().manual_seed(int(view_seeds[i])),
                                                 self.view_shift, self.view_zoom) for i in rows])  # sample-major
                wanted = torch.stack([stated[i] for i in rows]).repeat_interleave(self.views, dim=0)
                value, _ = findings_log_likelihood(classifier.differentiable_logits(seen), wanted.to(seen.device))
                total = total + value.sum() / self.views
            (grad,) = torch.autograd.grad(total, x0)
        return grad


def views_of_seeds(seeds: Sequence[int]) -> Callable[[int, int], int]:
    """``view_seed(i, step)`` for images drawn one per seed (``synthmed generate``, ``synthmed synthesize``): step j's
    jittered views of image i come from its seed alone, so the same seed draws the same image through either command."""
    seeds = [int(s) for s in seeds]
    return lambda i, step: int(np.random.default_rng([seeds[i], step, 29]).integers(2**31 - 1))


@torch.no_grad()
def reward_guided_draw(model, guide: RewardGuide, prompts: Sequence[str], modalities: Sequence[str], stated: Sequence[torch.Tensor],
                       noise_seeds: Sequence[int], view_seed: Callable[[int, int], int], steps: int, guidance: float,
                       negatives: Sequence[str] | None = None, findings: Sequence[Any] | None = None, batch_size: int = 8,
                       keep_trajectory: bool = False, on_batch: Callable[[int], None] | None = None) -> GuidedDraw:
    """One reward-guided DDIM draw (eta 0, classifier-free ``guidance``) per prompt.

    Image i starts from the noise of ``noise_seeds[i]`` (:func:`generator.sampling.initial_noise`, as ``synthmed
    sample --seed`` and the loop's rollouts), its step j's views from ``view_seed(i, j)``; ``stated[i]`` is its
    modality's (L,) vector (:meth:`RewardGuide.stated`), ``findings[i]`` the structured findings a finding-token
    model reads (None: text alone). Every image depends on its own seeds only, whatever ``batch_size``.
    ``keep_trajectory``: also the state and the guided output of every step (what ``selection.target=trajectory``
    fits). ``on_batch(n)`` is called after each batch of n images (a progress bar's update)."""
    n = len(prompts)
    if not (len(modalities) == len(stated) == len(noise_seeds) == n):
        raise ValueError(f"prompts ({n}), modalities ({len(modalities)}), stated ({len(stated)}) and noise_seeds "
                         f"({len(noise_seeds)}) must be as many")

    def shift(x0: torch.Tensor, rows: list[int], j: int, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        grad = guide.gradient(model, x0, [modalities[i] for i in rows], [stated[i] for i in rows], [view_seed(i, j) for i in rows])
        return guidance_shift(grad, guide.scale, alpha)

    return steered_draw(model, shift, prompts, modalities, noise_seeds, steps, guidance, negatives, findings, batch_size,
                        keep_trajectory, on_batch)


def steered_draw(model, shift: Callable[..., torch.Tensor], prompts: Sequence[str], modalities: Sequence[str],
                 noise_seeds: Sequence[int], steps: int, guidance: float, negatives: Sequence[str] | None = None,
                 findings: Sequence[Any] | None = None, batch_size: int = 8, keep_trajectory: bool = False,
                 on_batch: Callable[[int], None] | None = None) -> GuidedDraw:
    """A DDIM draw (eta 0, classifier-free ``guidance``) per prompt whose every step's x0_hat is moved by
    ``shift(x0_hat, rows, j, t, alpha_t)`` (rows: the batch's prompt indices, j: the step) before the step continues
    from it: reward guidance's gradient (:func:`reward_guided_draw`) or a fitted offset
    (:func:`rlhf.amortised.table_steered_draw`). With ``keep_trajectory`` the draw keeps, per step, the state, the output
    the step took and the shift it applied (what an offset table is fitted to). The other arguments are
    :func:`reward_guided_draw`'s."""
    n = len(prompts)
    if not (len(modalities) == len(noise_seeds) == n):
        raise ValueError(f"prompts ({n}), modalities ({len(modalities)}) and noise_seeds ({len(noise_seeds)}) must be as many")
    size = latent_size(model.cfg)
    shape = (model.cfg.latent_channels, size, size)
    scheduler = model.scheduler
    scheduler.set_timesteps(steps)
    kind = scheduler.config.prediction_type
    steering = getattr(model, "steering", None)
    features = steering.features(modalities, findings) if steering is not None else None
    finals, images, states, targets, shifts = [], [], [], [], []
    for start in range(0, n, batch_size):
        rows = list(range(start, min(n, start + batch_size)))
        x = torch.cat([initial_noise(1, shape, int(noise_seeds[i]))[0] for i in rows]).to(model.device)
        x = x * scheduler.init_noise_sigma
        cond = guided_conditioning(model, [prompts[i] for i in rows], [modalities[i] for i in rows],
                                   [negatives[i] if negatives is not None else "" for i in rows], guidance,
                                   [findings[i] for i in rows] if findings is not None else None)
        chunk_states, chunk_targets, chunk_shifts = [], [], []
        for j, t in enumerate(scheduler.timesteps):
            output = guided_prediction(model, x, t.expand(len(rows)), cond, guidance)
            alpha = scheduler.alphas_cumprod[int(t)].to(x.device)
            x0 = predicted_x0(output.float(), x.float(), alpha, kind)
            delta = shift(x0, rows, j, t, alpha)
            if steering is not None:  # a steered model's own table (generator.steering) moves the guided step too
                delta = delta + steering.delta([features[i] for i in rows], int(t)).to(x0.device)
            moved = output_for_x0(x0 + delta, x.float(), alpha, kind)
            if keep_trajectory:
                chunk_states.append(x.cpu())
                chunk_targets.append(moved.cpu())
                chunk_shifts.append(delta.float().cpu())
            x = ddim_step_with_logprob(scheduler, moved, t, x, eta=0.0).prev_sample
        if keep_trajectory:
            states.append(torch.stack(chunk_states, dim=1))  # (b, T, C, h, w)
            targets.append(torch.stack(chunk_targets, dim=1))
            shifts.append(torch.stack(chunk_shifts, dim=1))
        finals.append(x.cpu())
        images.append(model.decode(x).float().cpu())
        if on_batch is not None:
            on_batch(len(rows))
    kept = [torch.cat(part) if keep_trajectory else None for part in (states, targets, shifts)]
    return GuidedDraw(torch.cat(finals), torch.cat(images), *kept)


__all__ = ["GuidedDraw", "RewardGuide", "reward_guided_draw", "steered_draw", "views_of_seeds"]
