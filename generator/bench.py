"""Side-by-side speed and memory of synthmed's sampler and the stock diffusers pipeline.

Both draw the same images from the same weights: the stock ``StableDiffusionPipeline`` is
assembled from the model's own VAE, UNet and a DDIM scheduler with the same config, and is given
the same initial noise, the same conditioning tokens (computed inside its timed region, as
synthmed's sampler computes them inside its own) and the same guidance. The pipeline has no notion
of the modality-and-text class vector that this UNet adds to its time embedding, so a forward
pre-hook on the UNet supplies it (and the token mask) on every call; nothing else of the pipeline
is touched. ``max_abs_diff`` between the two sets of images shows that the comparison is like for
like.

Timings are the median of ``repeats`` runs after one warm-up of each; the two are interleaved so
that drift in the machine's speed falls on both. Peak memory is the growth of resident memory
over the run (sampled every 2 ms) on the CPU, and ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

from .config import ModalityConfig, default_modalities
from .errors import UserError
from .models import LatentDiffusion, latent_size
from .sampling import initial_noise, sample, sampling_dtype


@dataclass
class _Peak:
    baseline: float
    peak: float = 0.0


@contextmanager
def peak_memory_mb(device: torch.device):
    """Yields an object whose ``peak`` is the memory the block added at its highest point, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = _Peak(torch.cuda.memory_allocated(device) / 2**20)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device) / 2**20 - result.baseline
        return
    process = psutil.Process()
    result = _Peak(process.memory_info().rss / 2**20)
    highest = [result.baseline]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            highest[0] = max(highest[0], process.memory_info().rss / 2**20)
            stop.wait(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.peak = max(highest[0], process.memory_info().rss / 2**20) - result.baseline


class StockPipeline:
    """diffusers' ``StableDiffusionPipeline`` over this model's VAE and UNet."""

    def __init__(self, model: LatentDiffusion):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if abs(float(model.vae.config.get("scaling_factor", 1.0)) - model.scaling_factor) > 1e-6:
            raise UserError("the VAE config's scaling_factor differs from the model's; the stock pipeline would decode wrongly")
        self.model = model
        self.pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet,
            scheduler=DDIMScheduler.from_config(model.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self._extra: dict | None = None
        self._handle = model.unet.register_forward_pre_hook(self._inject, with_kwargs=True)

    def _inject(self, module, args, kwargs):
        if self._extra is not None:  # only while this pipeline is drawing
            kwargs = {**kwargs, **self._extra}
        return args, kwargs

    def close(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def __call__(self, prompts: list[str], modalities: list[str], guidance: float, steps: int, seed: int) -> torch.Tensor:
        model = self.model
        n = len(prompts)
        cond = model.conditioner(list(prompts), list(modalities))
        uncond = model.conditioner([""] * n, list(modalities))
        both = uncond.cat(cond)  # padded to one length: the pipeline concatenates [negative, positive]
        dtype = next(model.unet.parameters()).dtype
        unet_half = slice(0, 2 * n) if guidance > 1 else slice(n, 2 * n)  # the pipeline guides only above 1
        self._extra = {"class_labels": both.class_emb[unet_half].to(dtype), "encoder_attention_mask": both.mask[unet_half]}
        size = latent_size(model.cfg)
        latents, _ = initial_noise(n, (model.cfg.latent_channels, size, size), seed)
        try:
            out = self.pipe(
                prompt_embeds=both.tokens[n:].to(dtype), negative_prompt_embeds=both.tokens[:n].to(dtype),
                num_inference_steps=steps, guidance_scale=guidance, latents=latents.to(model.device, dtype),
                output_type="pt", height=model.cfg.image_size, width=model.cfg.image_size,
            )
        finally:
            self._extra = None
        return out.images * 2 - 1  # the pipeline returns [0, 1]


def bench_generate(
    model: LatentDiffusion, n: int = 16, batch_size: int = 8, steps: int = 25, guidance: float = 4.0,
    repeats: int = 3, seed: int = 0, progress: bool = True, modalities: Mapping[str, ModalityConfig] | None = None,
    precision: str = "fp32",
) -> dict:
    """Seconds per image and peak memory of both samplers; ``speedup_vs_diffusers`` is stock s/image
    divided by synthmed s/image (above 1: synthmed is faster). Each modality draws its example report
    (``modalities``: the configured ones; None: the built-in ones). synthmed draws at ``precision``
    (generator.sampling), the stock pipeline as diffusers does by default (the model's own dtype);
    ``max_abs_diff`` compares their images, ``fp32_max_abs_diff`` synthmed's fp32 images with the stock ones."""
    if n < 1 or batch_size < 1 or repeats < 1:
        raise UserError("n, batch size and repeats must be at least 1")
    if guidance < 1:
        raise UserError(f"guidance {guidance} < 1: the stock pipeline only guides above 1, so the two would not draw the same images")
    specs = default_modalities() if modalities is None else modalities
    names = [model.modalities[i % len(model.modalities)] for i in range(n)]
    prompts = [specs[m].example() if m in specs else f"{m.replace('_', ' ')} study. Findings: normal." for m in names]
    stock = StockPipeline(model)
    device = model.device

    compute = sampling_dtype(precision, device)

    def run_synthmed(precision: str = precision) -> torch.Tensor:
        return torch.cat([sample(model, prompts[i:i + batch_size], names[i:i + batch_size], guidance=guidance,
                                 steps=steps, seed=seed + i, precision=precision).images for i in range(0, n, batch_size)])

    def run_stock() -> torch.Tensor:
        return torch.cat([stock(prompts[i:i + batch_size], names[i:i + batch_size], guidance, steps, seed + i)
                          for i in range(0, n, batch_size)])

    def timed(fn):
        with torch.inference_mode(), peak_memory_mb(device) as memory:
            started = time.perf_counter()
            images = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
        return images, seconds, memory.peak

    runners = {"synthmed": run_synthmed, "diffusers": run_stock}
    seconds = {k: [] for k in runners}
    peaks = {k: [] for k in runners}
    images = {}
    try:
        from tqdm import tqdm

        exact = compute == torch.float32
        bar = tqdm(total=2 * (repeats + 1) + (not exact), desc="bench generate", unit="run", disable=not progress)
        for k, fn in runners.items():  # warm-up, and the images compared
            images[k], _, _ = timed(fn)
            bar.update()
        if not exact:
            images["fp32"], _, _ = timed(lambda: run_synthmed("fp32"))
            bar.update()
        for _ in range(repeats):
            for k, fn in runners.items():
                _, s, peak = timed(fn)
                seconds[k].append(s)
                peaks[k].append(peak)
                bar.update()
        bar.close()
    finally:
        stock.close()
    per_image = {k: statistics.median(v) / n for k, v in seconds.items()}
    return {
        "n": n, "batch_size": batch_size, "steps": steps, "guidance": guidance, "repeats": repeats,
        "image_size": model.cfg.image_size, "device": str(device), "torch_threads": torch.get_num_threads(),
        "precision": str(compute).removeprefix("torch."),
        "synthmed": {"seconds_per_image": round(per_image["synthmed"], 4), "images_per_second": round(1 / per_image["synthmed"], 2),
                     "peak_memory_mb": round(max(peaks["synthmed"]), 1), "runs_seconds": [round(s, 3) for s in seconds["synthmed"]]},
        "diffusers": {"seconds_per_image": round(per_image["diffusers"], 4), "images_per_second": round(1 / per_image["diffusers"], 2),
                      "peak_memory_mb": round(max(peaks["diffusers"]), 1), "runs_seconds": [round(s, 3) for s in seconds["diffusers"]]},
        "speedup_vs_diffusers": round(per_image["diffusers"] / per_image["synthmed"], 3),
        "max_abs_diff": float((images["synthmed"].float() - images["diffusers"].float()).abs().max()),
        "mean_abs_diff": float((images["synthmed"].float() - images["diffusers"].float()).abs().mean()),
        "fp32_max_abs_diff": float((images.get("fp32", images["synthmed"]).float() - images["diffusers"].float()).abs().max()),
    }


__all__ = ["StockPipeline", "bench_generate", "peak_memory_mb"]
