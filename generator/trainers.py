"""Train the VAE and the UNet; export the model with its metadata.json.

Each function receives its parts (config, rows, run folder, model) and returns a summary that
goes into metadata.json; the CLI (``synthmed train ...``) only assembles them.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DataConfig, LoraConfig, ModelConfig, TrainConfig
from .data.records import ManifestRow
from .data.transforms import RecordTransform
from .fileio import atomic_folder, write_json_atomic
from .models import LatentDiffusion, build_vae
from .sampling import sample
from .similarity import ssim as _ssim
from .training import (
    ImageCache,
    RunDir,
    augment_prompt,
    batch_indices,
    process_slot,
    diffusion_loss,
    environment,
    latent_scaling_factor,
    run_loop,
    seed_everything,
    vae_loss,
)

log = logging.getLogger(__name__)


# -- image quality ----------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # images in [-1, 1] -> (B,) dB
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:  # (B,) mean SSIM, Gaussian window
    return _ssim(a, b, window)


@torch.no_grad()
def evaluate_reconstruction(vae, cache: ImageCache, batch: int = 64) -> dict:
    """PSNR and SSIM of VAE reconstructions (posterior mode), per modality and overall."""
    vae.eval()
    scores: dict[str, list[tuple[float, float]]] = {}
    for start in range(0, len(cache), batch):
        idx = np.arange(start, min(len(cache), start + batch))
        images, _, modalities = cache.batch(idx)
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        for m, p, s in zip(modalities, psnr(recon, images).tolist(), ssim(recon, images).tolist()):
            scores.setdefault(m, []).append((p, s))
    vae.train()
    out = {f"psnr_{m}": float(np.mean([p for p, _ in v])) for m, v in scores.items()}
    out |= {f"ssim_{m}": float(np.mean([s for _, s in v])) for m, v in scores.items()}
    everything = [x for v in scores.values() for x in v]
    out["psnr"] = float(np.mean([p for p, _ in everything]))
    out["ssim"] = float(np.mean([s for _, s in everything]))
    return out


# -- VAE --------------------------------------------------------------------------------------
def train_vae(
    model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, train_rows: list[ManifestRow],
    val_rows: list[ManifestRow], run: RunDir, out: str | os.PathLike, progress: bool = True, stop_after: int | None = None,
) -> dict:
    seed_everything(train_cfg.seed)
    data = data_cfg.model_copy(update={"image_size": model_cfg.image_size})
    train = ImageCache(train_rows, RecordTransform(data, train=True, seed=train_cfg.seed, as_tensor=False), progress)
    val = ImageCache(val_rows, RecordTransform(data, as_tensor=False), progress)
    vae = build_vae(model_cfg)
    generator = torch.Generator().manual_seed(train_cfg.seed)

    def loss_fn(step: int, micro: int):
        idx = batch_indices(len(train), train_cfg.batch_size, step, micro, train_cfg.grad_accum_steps, train_cfg.seed,
                            *process_slot())
        images, _, _ = train.batch(idx)
        return vae_loss(vae, images.to(next(vae.parameters()).device), train_cfg.kl_weight, generator)

    latest: dict[str, float] = {}  # the last validation, which run_loop always does at the final step

    def validate(step: int) -> dict:
        latest.clear()
        latest.update(evaluate_reconstruction(vae, val))
        return {f"val_{k}": v for k, v in latest.items()}

    result = run_loop(run, train_cfg, [vae], [p for p in vae.parameters()], loss_fn, validate=validate,
                      progress=progress, stop_after=stop_after, generators=[generator])
    if result.steps < train_cfg.max_steps:
        return {"stopped_at": result.steps}
    metrics = dict(latest)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train.images[:512].float().div(127.5).sub(1)))
    summary = {
        "kind": "synthmed VAE",
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "train_images": len(train),
        "val_images": len(val),
        "final_loss": result.last_loss,
        "val_metrics": {k: round(v, 4) for k, v in metrics.items()},
        "scaling_factor": vae.config.scaling_factor,
        "environment": environment(),
        "run": str(run.root),
    }
    with atomic_folder(out, keep=True) as tmp:  # a kill mid-export leaves the previous folder (or none), never half of one
        vae.save_pretrained(tmp, safe_serialization=True)
        write_json_atomic(tmp / "metadata.json", summary, indent=2)
    return summary


# -- UNet -------------------------------------------------------------------------------------
def save_grid(images: list[np.ndarray], path: Path, columns: int) -> Path:
    tiles = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in images]
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def validation_samples(model: LatentDiffusion, run: RunDir, step: int, data_cfg: DataConfig, steps: int = 20) -> dict:
    # each module goes back to its own mode after: model.train() would also switch the frozen text encoder to
    # training mode (dropout on) from the first validation on, so a run resumed past it would train differently
    modes = {module: module.training for module in model.modules()}
    model.eval()
    modalities = [m for m in data_cfg.modalities if m in model.modalities]
    prompts = [data_cfg.modalities[m].example() for m in modalities]
    started = time.perf_counter()
    output = sample(model, prompts + [""] * len(modalities), modalities * 2, guidance=3.0, steps=steps, seed=0)
    channels = {m: spec.channels for m, spec in data_cfg.modalities.items()}
    save_grid(output.to_uint8(modalities * 2, channels), run.samples / f"step_{step:07d}.png", len(modalities))
    for module, training in modes.items():
        module.training = training
    return {"val_sample_seconds": round(time.perf_counter() - started, 2)}


def train_unet(
    model: LatentDiffusion, train_cfg: TrainConfig, data_cfg: DataConfig, train_rows: list[ManifestRow],
    run: RunDir, out: str | os.PathLike | None, progress: bool = True,
    stop_after: int | None = None, ship_dtype: torch.dtype = torch.float16, lora_cfg: LoraConfig | None = None,
    metadata: dict | None = None,
) -> dict:
    """Train UNet + conditioner projections on frozen VAE latents (encoded once: the VAE is frozen
    and a phantom set fits in memory). The exported folder's ``metadata.json`` is the summary plus ``metadata``.

    With ``train_cfg.unet_lora`` the UNet stays frozen and LoRA adapters (``lora_cfg``) learn in its
    place; the export merges them. ``lora_cfg.text_encoder_rank > 0`` adds LoRA to the text encoder."""
    lora_cfg = lora_cfg or LoraConfig()
    seed_everything(train_cfg.seed)
    data = data_cfg.model_copy(update={"image_size": model.cfg.image_size})
    cache = ImageCache(train_rows, RecordTransform(data, train=False, as_tensor=False), progress)
    model.vae.requires_grad_(False)
    model.vae.eval()
    home = model.device
    encode_on = torch.device("cuda") if torch.cuda.is_available() else home  # a pretrained VAE is slow on a CPU
    model.vae.to(encode_on)
    with torch.no_grad():  # posterior parameters once; a fresh latent sample each time an image is drawn
        moments = torch.cat([model.vae.encode(cache.batch(np.arange(i, min(len(cache), i + 64)))[0].to(encode_on)).latent_dist.parameters.cpu()
                             for i in range(0, len(cache), 64)])
    model.vae.to(home)
    if lora_cfg.text_encoder_rank > 0 and model.conditioner.text_encoder.lora is None:
        model.conditioner.text_encoder.add_lora(lora_cfg.text_encoder_rank, lora_cfg.text_encoder_alpha)
    if train_cfg.unet_lora:
        from .lora import add_lora, lora_parameters
        from .lora_training import lora_spec

        add_lora(model.unet, lora_spec(lora_cfg), lora_cfg.name)  # freezes the base UNet
        unet_params = lora_parameters(model.unet, lora_cfg.name)
    else:
        unet_params = list(model.unet.parameters())
    trainable = unet_params + model.conditioner.trainable_parameters()
    for p in trainable:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    text_rng = random.Random(train_cfg.seed)

    def loss_fn(step: int, micro: int):
        idx = batch_indices(len(cache), train_cfg.batch_size, step, micro, train_cfg.grad_accum_steps, train_cfg.seed,
                            *process_slot())
        mean, logvar = moments[torch.from_numpy(idx)].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)) * model.scaling_factor
        texts = [cache.texts[i] for i in idx]
        if train_cfg.prompt_augment:
            texts = [augment_prompt(t, text_rng) for t in texts]
        texts = ["" if text_rng.random() < train_cfg.text_dropout else t for t in texts]
        findings = None
        if model.finding_keys is not None:  # the unconditional prompt states nothing; a share of the rest, text alone
            findings = [None if not t or text_rng.random() < train_cfg.finding_dropout else cache.findings[i]
                        for t, i in zip(texts, idx)]
        return diffusion_loss(model, latents.to(model.device), texts, [cache.modalities[i] for i in idx], generator, findings)

    result = run_loop(run, train_cfg, [model.unet, model.conditioner], trainable, loss_fn,
                      validate=lambda step: validation_samples(model, run, step, data_cfg), progress=progress,
                      stop_after=stop_after, generators=[generator, text_rng])
    summary = {
        "kind": "synthmed latent diffusion model",
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "train_images": len(cache),
        "final_loss": result.last_loss,
        "environment": environment(),
        "run": str(run.root),
    }
    summary["trainable_parameters"] = int(sum(p.numel() for p in trainable))
    if out is not None and result.steps >= train_cfg.max_steps:
        summary |= metadata or {}
        # a kill mid-export leaves the previous folder (or none), never half of one; its other files (vae/) stay
        with atomic_folder(out, keep=True) as tmp:
            if train_cfg.unet_lora:  # the adapter alone, then merged into the UNet that is exported
                from .lora import merge_lora, save_lora

                save_lora(model.unet, tmp / "unet_lora.safetensors", lora_cfg.name)
                merge_lora(model.unet, [lora_cfg.name])
                model.unet.unload_lora()
                summary["unet_lora"] = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "merged": True, "file": "unet_lora.safetensors"}
            model.save(tmp, dtype=ship_dtype)
            if not all(r.source.startswith("phantom") for r in train_rows):  # the phantom model composes from its own templates
                from .data.wording import FILE, learn_wording, write_wording

                write_wording(learn_wording(train_rows), tmp / FILE)  # how its captions word each finding, for the graph's prompts
            write_json_atomic(tmp / "metadata.json", summary, indent=2)
    return summary


__all__ = ["evaluate_reconstruction", "psnr", "save_grid", "ssim", "train_unet", "train_vae"]
