"""One DDIM step that also returns the log probability of the transition it takes (for DDPO).

DDPO (Black et al. 2023) and Flow-GRPO treat each denoising step as a Gaussian policy
``p(x_{t-1} | x_t) = N(mean, std^2 I)`` and need ``log p`` both when sampling (the "old" policy) and
when re-scoring the stored ``x_{t-1}`` during training (the "new" policy). This file is that step,
in the manner of ddpo-pytorch's ``ddim_with_logprob.py``, written for diffusers' ``DDIMScheduler``.

The maths is DDIM (Song et al. 2021, eqs. 12 and 16), with ``a_t = alphas_cumprod[t]``::

    x0_hat   = from model_output per prediction_type, then clipped / dynamically thresholded
    eps_hat  = from model_output per prediction_type (from the *unclipped* x0, as diffusers' default
               ``use_clipped_model_output=False``)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std      = eta * sqrt(variance)
    mean     = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat
    x_{t-1}  = mean + std * noise,   noise ~ N(0, I)

What changes relative to diffusers' ``DDIMScheduler.step`` (0.42):

1. It returns ``log_prob`` (B,): the Gaussian log density of ``prev_sample`` under ``N(mean, std^2)``,
   and also ``mean`` and ``std``. By default (``reduce="mean"``) the log density is *averaged* over
   all non-batch dimensions, as ddpo-pytorch does: a per-element scale does not grow with the
   latent size, so the PPO ratio ``exp(new - old)`` stays well conditioned (a sum over 4x64x64
   elements turns tiny per-element changes into ratios that are always clipped).
   ``reduce="sum"`` gives the true joint log density.
2. ``prev_sample`` may be given: then nothing is drawn and the given sample is scored (training).
   The log density is a function of the policy parameters only through ``mean``; ``prev_sample``
   is detached inside it (the action is fixed, as REINFORCE / PPO require).
3. ``timestep`` may be a (B,) tensor of per-sample timesteps (DDPO re-scores shuffled steps in one
   batch); each row then equals a scalar call for that row. ``a_t``, ``a_prev`` and ``std`` are
   per-sample, shaped (B, 1, 1, 1).
4. The default is ``eta=1.0`` (diffusers: 0.0) because a policy needs a stochastic step.
5. Arithmetic runs in float32 (float64 for float64 inputs) whatever the input dtype;
   ``prev_sample`` and ``pred_original_sample`` come back in ``sample.dtype`` like diffusers', while
   ``mean``, ``std`` and ``log_prob`` stay in the compute dtype. The log density of a drawn sample
   is computed from the sample *after* the cast to ``sample.dtype``, so re-scoring the returned
   sample gives exactly the same ``log_prob``. Noise is drawn in the compute dtype with diffusers'
   ``randn_tensor`` (one generator, or one per sample), and only when ``eta > 0`` as diffusers
   does; for float32 inputs a loop therefore consumes a generator exactly as diffusers' step does.
6. No ``variance_noise``, ``use_clipped_model_output`` or ``return_dict`` arguments.

Unchanged from diffusers: the previous timestep is ``t - num_train_timesteps // num_inference_steps``
whatever ``timestep_spacing`` is (so "linspace" spacing steps to that timestep, not to the next entry
of ``scheduler.timesteps``, exactly as diffusers); a negative previous timestep uses
``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``); thresholding takes
precedence over ``clip_sample``.

Deterministic steps (``std == 0``), where no density exists:

- ``eta == 0``, or a step whose DDIM variance is 0: ``a_prev = 1`` (the final step when
  ``set_alpha_to_one=True``) or ``a_prev = a_t`` (the final step from ``t = 0`` to
  ``final_alpha_cumprod = alphas_cumprod[0]``, i.e. "leading" spacing with ``steps_offset=0``).
- Drawing (``prev_sample=None``): if ``std == 0`` for every sample, ``prev_sample`` is the mean and
  ``log_prob`` is ``None``, so one sampler serves both DDIM (eta=0) evaluation and RL sampling.
  Mixed zero / non-zero ``std`` in one batch raises ``ValueError``.
- Scoring (``prev_sample`` given): any ``std == 0`` raises ``ValueError`` (a point mass has no
  density). DDPO set-ups that train on the final step should use ``set_alpha_to_one=False`` and a
  final timestep above 0 (``steps_offset=1`` or "trailing" spacing), as Stable Diffusion's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["DDIMStepOutput", "ddim_step_with_logprob", "output_for_x0", "predicted_x0"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # x_{t-1} (B, C, h, w), sample.dtype
    log_prob: torch.Tensor | None  # (B,) compute dtype; None only for a deterministic draw (std == 0)
    pred_original_sample: torch.Tensor  # x0_hat (B, C, h, w) after clipping / thresholding, sample.dtype
    mean: torch.Tensor  # (B, C, h, w) compute dtype
    std: torch.Tensor  # (B, 1, 1, 1) compute dtype


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduce: Literal["mean", "sum"] = "mean",
) -> DDIMStepOutput:
    """One DDIM step from ``sample`` (x_t) with the log probability of ``x_{t-1}``.

    ``model_output`` (B, C, h, w) is what the UNet predicts (per ``scheduler.config.prediction_type``);
    ``timestep`` is a scalar or (B,) per-sample timesteps. With ``prev_sample`` None, x_{t-1} is drawn
    (with ``generator``); given, it is scored and ``generator`` is unused. ``reduce`` averages
    ("mean", default) or sums ("sum") the per-element log density over non-batch dimensions.
    See the module docstring for how this differs from ``DDIMScheduler.step`` and for ``eta == 0``.
    """
    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no num_inference_steps: call scheduler.set_timesteps(...) first")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ in shape")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

    batch = sample.shape[0]
    compute_dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
    per_sample = (batch,) + (1,) * (sample.ndim - 1)  # (B, 1, 1, 1): broadcasts over (B, C, h, w)

    # Per-sample schedule coefficients, computed where alphas_cumprod lives (CPU in diffusers) so the
    # checks below do not synchronise with an accelerator.
    alphas_cumprod = scheduler.alphas_cumprod
    t = _per_sample_timesteps(timestep, batch, config.num_train_timesteps, alphas_cumprod.device)  # (B,)
    t_prev = t - config.num_train_timesteps // scheduler.num_inference_steps  # (B,), may be negative
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=alphas_cumprod.device).to(compute_dtype)
    alpha_t = alphas_cumprod[t].to(compute_dtype)  # (B,)
    alpha_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)].to(compute_dtype), final)  # (B,)
    beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
    variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)  # (B,) DDIM eq. 16 with eta = 1
    std = eta * variance.sqrt()  # (B,)
    direction_sq = 1 - alpha_prev - std**2  # (B,) squared coefficient of eps_hat
    if bool((direction_sq < 0).any()):
        raise ValueError(f"eta={eta} is too large: std^2 exceeds 1 - alpha_cumprod_prev (use eta <= 1)")
    deterministic = std == 0  # (B,)

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(sample.device).reshape(per_sample)  # (B, 1, 1, 1)

    sqrt_alpha_t, sqrt_beta_t = on_device(alpha_t.sqrt()), on_device(beta_t.sqrt())
    x_t = sample.to(compute_dtype)  # (B, C, h, w)
    output = model_output.to(compute_dtype)  # (B, C, h, w)

    # x0_hat and eps_hat, DDIM eq. 12
    prediction_type = config.prediction_type
    if prediction_type == "epsilon":
        pred_original = (x_t - sqrt_beta_t * output) / sqrt_alpha_t
        pred_epsilon = output
    elif prediction_type == "sample":
        pred_original = output
        pred_epsilon = (x_t - sqrt_alpha_t * pred_original) / sqrt_beta_t
    elif prediction_type == "v_prediction":
        pred_original = sqrt_alpha_t * x_t - sqrt_beta_t * output
        pred_epsilon = sqrt_alpha_t * output + sqrt_beta_t * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'")

    if config.thresholding:
        pred_original = _dynamic_threshold(pred_original, config.dynamic_thresholding_ratio, config.sample_max_value)
    elif config.clip_sample:
        pred_original = pred_original.clamp(-config.clip_sample_range, config.clip_sample_range)

    mean = on_device(alpha_prev.sqrt()) * pred_original + on_device(direction_sq.sqrt()) * pred_epsilon  # (B, C, h, w)
    std_b = on_device(std)  # (B, 1, 1, 1)

    if prev_sample is None:
        if eta > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=compute_dtype)
            prev_sample = (mean + std_b * noise).to(sample.dtype)  # (B, C, h, w)
        else:
            prev_sample = mean.to(sample.dtype)
        if bool(deterministic.all()):
            log_prob = None
        elif bool(deterministic.any()):
            raise ValueError(
                f"std is 0 for timesteps {sorted(set(t[deterministic].tolist()))} but not for others in the batch: "
                "no log probability for a mixed batch"
            )
        else:
            log_prob = _gaussian_log_prob(prev_sample, mean, std_b, reduce)
    else:
        if bool(deterministic.any()):
            reason = (
                "eta == 0"
                if eta == 0
                else f"the step from timesteps {sorted(set(t[deterministic].tolist()))} has zero variance: "
                "alpha_cumprod_prev is 1 (set_alpha_to_one=True) or equals alpha_cumprod_t (t = 0 stepping to "
                "alphas_cumprod[0]; use steps_offset=1 or 'trailing' spacing)"
            )
            raise ValueError(f"cannot score prev_sample: the DDIM step is deterministic (std = 0) because {reason}")
        log_prob = _gaussian_log_prob(prev_sample, mean, std_b, reduce)

    return DDIMStepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        pred_original_sample=pred_original.to(sample.dtype),
        mean=mean,
        std=std_b,
    )


def _per_sample_timesteps(
    timestep: int | torch.Tensor, batch: int, num_train: int, device: torch.device
) -> torch.Tensor:
    """``timestep`` as a (B,) long tensor on ``device``; a scalar is repeated over the batch."""
    t = torch.as_tensor(timestep).to(device)
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"timesteps must be integers, got {t.tolist()}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or shaped ({batch},), got {tuple(t.shape)}")
    if bool(((t < 0) | (t >= num_train)).any()):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got {t.tolist()}")
    return t


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022), per sample: s = quantile(|x0|, ratio)
    clamped to [1, max_value]; x0 is clamped to [-s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*h*w)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged or summed over non-batch dims: (B,)."""
    x = x.detach().to(mean.dtype)  # the action is fixed; gradients reach the policy through mean only
    per_element = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI  # (B, C, h, w)
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0_hat of DDIM eq. 12 from the UNet's ``output`` at ``x_t``; ``alpha_t`` is ``alphas_cumprod[t]`` (scalar or
    broadcastable per sample). ``prediction_type``: epsilon, sample or v_prediction."""
    a = alpha_t.to(x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    raise ValueError(f"prediction_type {prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'")


def output_for_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The UNet output that makes a DDIM step at ``x_t`` predict ``x0`` (and the noise ``(x_t - sqrt(a) x0) / sqrt(1 - a)``
    consistent with it): the inverse of :func:`predicted_x0` at fixed ``x_t``."""
    a = alpha_t.to(x_t.dtype)
    if prediction_type == "sample":
        return x0
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'")
