"""Fine-tune a LoRA adapter on a manifest with the denoising loss; only the adapter is saved."""

from __future__ import annotations

import json
import os
import random

import torch

from .config import DataConfig, LoraConfig, TrainConfig
from .data.records import ManifestRow
from .data.transforms import RecordTransform
from .fileio import write_json_atomic
from .lora import LoraSpec, add_lora, lora_parameters, save_lora
from .models import LatentDiffusion
from .training import ImageCache, RunDir, augment_prompt, batch_indices, diffusion_loss, process_slot, environment, run_loop, seed_everything


def lora_spec(cfg: LoraConfig) -> LoraSpec:
    return LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, include_mid_block=cfg.include_mid_block,
                    include_out=cfg.include_out)


def train_lora_adapter(
    model: LatentDiffusion, lora_cfg: LoraConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
    rows: list[ManifestRow], run: RunDir, out: str | os.PathLike, progress: bool = True, stop_after: int | None = None,
) -> dict:
    """The base UNet, VAE and conditioner stay frozen; the adapter learns the new data."""
    seed_everything(train_cfg.seed)
    data = data_cfg.model_copy(update={"image_size": model.cfg.image_size})
    cache = ImageCache(rows, RecordTransform(data, as_tensor=False), progress)
    model.requires_grad_(False)
    add_lora(model.unet, lora_spec(lora_cfg), lora_cfg.name)
    params = lora_parameters(model.unet, lora_cfg.name)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    text_rng = random.Random(train_cfg.seed)

    def loss_fn(step: int, micro: int):
        idx = batch_indices(len(cache), train_cfg.batch_size, step, micro, train_cfg.grad_accum_steps, train_cfg.seed,
                            *process_slot())
        images, texts, modalities = cache.batch(idx)
        with torch.no_grad():
            latents = model.encode(images.to(model.device), generator=generator)
        if train_cfg.prompt_augment:
            texts = [augment_prompt(t, text_rng) for t in texts]
        texts = ["" if text_rng.random() < train_cfg.text_dropout else t for t in texts]
        return diffusion_loss(model, latents, texts, modalities, generator)

    result = run_loop(run, train_cfg.model_copy(update={"ema_decay": 0.0}), [model.unet], params, loss_fn,
                      progress=progress, stop_after=stop_after)
    summary = {"kind": "synthmed LoRA adapter", "adapter": lora_cfg.name, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
               "steps": result.steps, "seconds": round(result.seconds, 1), "train_images": len(cache),
               "final_loss": result.last_loss, "trainable_parameters": int(sum(p.numel() for p in params)),
               "environment": environment(), "run": str(run.root)}
    if result.steps >= train_cfg.max_steps:
        save_lora(model.unet, out, lora_cfg.name, metadata={"training": json.dumps(summary)})
        write_json_atomic(str(out) + ".metadata.json", summary)
    return summary


__all__ = ["lora_spec", "train_lora_adapter"]
