"""Sampling: DDIM (with per-step log probabilities for DDPO) or DPM-Solver++, guided.

Classifier-free guidance runs the unconditional (negative prompt, or "") and conditional
branches in one UNet call. ``guidance_schedule`` varies the scale over the steps (dynamic CFG):
``constant``, or rising from 1 to ``guidance`` linearly or along a half cosine. Image ``i`` of a
call uses seed ``seed + i`` for its noise, so it is the same whatever the batch size.

``precision`` (``sample.precision``): ``fp32``; ``bf16`` (autocast: the text encoder, UNet and VAE compute in
bfloat16); ``auto``: bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16
or AMX: on this project's 2-core CPU it drew 1.3x faster than fp32, pixels within 0.02 of fp32's on a 0-1 scale) and fp32 elsewhere. A
trajectory (DDPO's rollouts) is always drawn in fp32: the loop re-scores its steps in fp32, and its clipped
probability ratio must start at exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from .conditioning import Conditioning
from .ddim_logprob import ddim_step_with_logprob
from .errors import UserError
from .models import LatentDiffusion, latent_size


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None = None  # (B, T + 1, C, h, w): x_T ... x_0, with return_trajectory
    log_probs: torch.Tensor | None = None  # (B, T): log p(x_{t-1} | x_t) of each step taken
    timesteps: torch.Tensor | None = None  # (T,)

    def to_uint8(self, modalities: list[str], channels: dict[str, int]) -> list[np.ndarray]:
        """Images as uint8 (H, W) for grey modalities and (H, W, 3) for colour ones."""
        out = []
        for image, modality in zip(self.images, modalities):
            array = image.detach().float().add(1).mul(127.5).round().clamp(0, 255).byte().cpu()
            out.append(array.float().mean(0).round().byte().numpy() if channels.get(modality, 3) == 1 else array.permute(1, 2, 0).numpy())
        return out


PRECISIONS = ("auto", "fp32", "bf16")


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype ``precision`` computes in on ``device``: float32 or bfloat16 (see the module's docstring)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


def guidance_scales(guidance: float, steps: int, schedule: str) -> list[float]:
    if schedule == "constant":
        return [guidance] * steps
    fractions = [(i + 1) / steps for i in range(steps)]
    if schedule == "linear":
        return [1.0 + (guidance - 1.0) * f for f in fractions]
    if schedule == "cosine":
        return [1.0 + (guidance - 1.0) * (1 - math.cos(math.pi * f)) / 2 for f in fractions]
    raise UserError(f"unknown guidance schedule {schedule!r}; use constant, linear or cosine")


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def guided_prediction(model: LatentDiffusion, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, scale: float) -> torch.Tensor:
    """One UNet call for both branches; cond holds the unconditional half first (see guided_conditioning).
    ``t`` is (B,): one timestep per sample. DDPO re-scores stored steps through this same function."""
    n = latents.shape[0]
    if scale == 1.0:  # no guidance: the conditional half only
        out = model.unet(latents, t, encoder_hidden_states=cond.tokens[n:], encoder_attention_mask=cond.mask[n:],
                         class_labels=cond.class_emb[n:]).sample
        return out
    doubled = torch.cat([latents, latents])
    out = model.unet(doubled, torch.cat([t, t]), encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask, class_labels=cond.class_emb).sample
    uncond, conditional = out.chunk(2)
    return uncond + scale * (conditional - uncond)


def guided_conditioning(model: LatentDiffusion, prompts: list[str], modalities: list[str],
                        negatives: list[str], guidance: float, findings: Sequence[Sequence[Mapping] | None] | None = None) -> Conditioning:
    """The conditioning of a guided batch: the negative (unconditional) half first, the prompts last.
    Without guidance the conditional half is repeated, keeping the "conditional half last" layout.
    ``findings`` (per prompt, its structured findings) condition the prompts' half of a model with a finding table."""
    dtype = next(model.unet.parameters()).dtype
    cond = model.conditioner(list(prompts), list(modalities), findings)
    if guidance != 1.0:
        cond = model.conditioner(list(negatives), list(modalities)).cat(cond)
    else:
        cond = cond.cat(cond)
    return Conditioning(cond.tokens.to(dtype), cond.mask, cond.class_emb.to(dtype))


@torch.no_grad()
def sample(
    model: LatentDiffusion,
    prompts: list[str],
    modalities: list[str],
    negative: str | list[str] | None = None,
    guidance: float = 4.0,
    steps: int = 25,
    seed: int = 0,
    return_trajectory: bool = False,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_schedule: str = "constant",
    precision: str = "fp32",
    findings: Sequence[Sequence[Mapping] | None] | None = None,
) -> SampleOutput:
    """Draw one image per prompt. With ``return_trajectory`` (DDIM, eta > 0) also the latents of
    every step and the log probability of each transition (always in fp32). ``precision``: fp32, bf16
    or auto (see the module's docstring); images come back as float32 either way. ``findings``: per
    prompt, the structured findings it states, for a model with finding tokens (others ignore them) and for a
    steered model (``model.steering``, a steered folder's offset table: generator.steering), whose every step's
    x0_hat moves by gamma x the table's offset for those findings."""
    compute = torch.float32 if return_trajectory else sampling_dtype(precision, model.device)
    args = (model, prompts, modalities, negative, guidance, steps, seed)
    if compute == torch.float32 or next(model.unet.parameters()).dtype != torch.float32:
        return _sample(*args, return_trajectory, sampler, eta, guidance_schedule, findings)
    with torch.autocast(model.device.type, dtype=compute):
        out = _sample(*args, False, sampler, eta, guidance_schedule, findings)
    return SampleOutput(out.images.float())


def _sample(model: LatentDiffusion, prompts: list[str], modalities: list[str], negative: str | list[str] | None, guidance: float,
            steps: int, seed: int, return_trajectory: bool, sampler: str, eta: float, guidance_schedule: str,
            findings: Sequence[Sequence[Mapping] | None] | None = None) -> SampleOutput:
    n = len(prompts)
    if n == 0:
        raise UserError("no prompts")
    if len(modalities) != n:
        raise ValueError(f"{n} prompts but {len(modalities)} modalities")
    if return_trajectory and (sampler != "ddim" or eta <= 0):
        raise UserError("a trajectory with log probabilities needs sampler='ddim' and eta > 0")
    negatives = [negative] * n if negative is None or isinstance(negative, str) else list(negative)
    negatives = [neg or "" for neg in negatives]
    device = model.device
    dtype = next(model.unet.parameters()).dtype

    cond = guided_conditioning(model, list(prompts), list(modalities), negatives, guidance, findings)

    size = latent_size(model.cfg)
    latents, generators = initial_noise(n, (model.cfg.latent_channels, size, size), seed)
    latents = latents.to(device, dtype)

    if sampler == "ddim":
        scheduler = model.scheduler
    elif sampler == "dpmpp":
        scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise UserError(f"unknown sampler {sampler!r}; use ddim or dpmpp")
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    scales = guidance_scales(guidance, len(scheduler.timesteps), guidance_schedule)

    steering = model.steering  # a steered folder's offset table (generator.steering): x0_hat moved at every step
    features = steering.features(modalities, findings) if steering is not None else None
    trajectory, log_probs = [latents], []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        prediction = guided_prediction(model, model_input, t.expand(n) if t.ndim == 0 else t, cond, scales[i])
        if steering is not None:
            prediction = steering.steer(prediction, latents, t, scheduler.alphas_cumprod, scheduler.config.prediction_type, features)
        if sampler == "ddim":
            step = ddim_step_with_logprob(scheduler, prediction, t, latents, eta=eta, generator=generators)
            latents = step.prev_sample.to(dtype)
            if return_trajectory:
                log_probs.append(step.log_prob)
                trajectory.append(latents)
        else:
            latents = scheduler.step(prediction, t, latents).prev_sample
    images = model.decode(latents).float()
    if not return_trajectory:
        return SampleOutput(images)
    return SampleOutput(images, torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), scheduler.timesteps.clone())
