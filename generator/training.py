"""Trainers for the VAE, the UNet (with conditioner) and LoRA adapters, on accelerate.

The same code runs on one CPU, one GPU or several (``accelerate launch``). Every trainer receives
its parts (model, data, run folder) and shares one loop:

- batches come from a seeded permutation per epoch, so step ``s`` always sees the same images and
  a resumed run continues exactly where the killed one stopped;
- warm-up then cosine learning rate, gradient accumulation and clipping, mixed precision where
  the device has it, EMA of the trainable weights;
- ``metrics.jsonl`` gets one JSON object per logged step, appended, never rewritten;
- checkpoints are written to a temporary folder and renamed when complete; the newest complete
  one is where ``--resume`` picks up.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from .config import TrainConfig
from .data.records import ManifestRow
from .data.sources import load_row
from .data.transforms import RecordTransform
from .fileio import append_whole, atomic_folder, write_bytes_atomic
from .models import LatentDiffusion

log = logging.getLogger(__name__)


# -- data -------------------------------------------------------------------------------------
class ImageCache:
    """Decoded, resized images (uint8) and their texts and modalities, held in memory: a phantom or
    meddata training set is a few thousand small images, and decoding once beats decoding per step."""

    def __init__(self, rows: list[ManifestRow], transform: RecordTransform, progress: bool = True):
        self.texts = [r.text for r in rows]
        self.modalities = [r.modality for r in rows]
        self.findings = [list(r.findings) for r in rows]
        self.sources = [r.path for r in rows]
        images = []
        for row in tqdm(rows, desc="loading images", unit=" img", disable=not progress):
            image = transform.image(load_row(row, transform.modalities)["image"], row.modality)
            images.append(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2))
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, list[str], list[str]]:
        images = self.images[torch.from_numpy(indices)].float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        return images, [self.texts[i] for i in indices], [self.modalities[i] for i in indices]


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, micro: int, accum: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The indices of micro-batch ``micro`` of optimiser step ``step`` on process ``rank`` of ``world``: a
    pure function of its arguments, so resuming at a step replays the same data order. The processes take
    consecutive slices of one global batch of ``world * batch_size``, so each sees different images and
    together they see what one process with that batch size would."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    start = ((step * accum + micro) * world + rank) * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    for j in range(batch_size):
        epoch, pos = divmod(start + j, n)
        out[j] = _epoch_order(n, seed, epoch)[pos]
    return out


def process_slot() -> tuple[int, int]:
    """(rank, number of processes) of this process under accelerate (0, 1 when run alone)."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def split_rows(rows: list[ManifestRow], val_fraction: float, seed: int) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """A seeded hold-out split; rows tagged ':val' or ':test' by their dataset always go to validation."""
    held = (":val", ":test")
    tagged_val = [r for r in rows if r.source.endswith(held)]
    rest = [r for r in rows if not r.source.endswith(held)]
    order = np.random.default_rng(seed).permutation(len(rest))
    n_val = int(round(len(rest) * val_fraction))
    val = tagged_val + [rest[i] for i in order[:n_val]]
    train = [rest[i] for i in order[n_val:]]
    return train, val


def augment_prompt(text: str, rng: random.Random) -> str:
    """Reorder the sentences after the first (technique) one, and sometimes drop case: the facts
    stay, the wording varies."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
    if len(sentences) > 2 and rng.random() < 0.5:
        head, tail = sentences[:1], sentences[1:]
        rng.shuffle(tail)
        sentences = head + tail
    out = ". ".join(s.rstrip(".") for s in sentences) + "."
    return out.lower() if rng.random() < 0.2 else out


# -- run folder -------------------------------------------------------------------------------
@dataclass
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def log_metrics(self, record: dict) -> None:
        append_whole(self.root / "metrics.jsonl", (json.dumps(record) + "\n").encode("utf-8"))  # whole line or none

    def trim_metrics(self, step: int) -> int:
        """Keep the whole lines of ``metrics.jsonl`` up to ``step`` (the checkpoint a resume starts from);
        later lines (logged by a killed run after its last checkpoint, and logged again by the resume) and a
        torn last line move to ``metrics.jsonl.orphaned``. Returns the number of lines moved."""
        path = self.root / "metrics.jsonl"
        if not path.is_file():
            return 0
        keep, moved = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                whole = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                whole = False
            (keep if whole else moved).append(line)
        if moved:
            append_whole(path.with_name(path.name + ".orphaned"), b"".join(line if line.endswith(b"\n") else line + b"\n" for line in moved))
            write_bytes_atomic(path, b"".join(keep))
        return len(moved)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob("step_*") if (p / "trainer_state.json").exists())
        return done[-1] if done else None


def make_run_dir(runs_dir: str, name: str) -> RunDir:
    """A new ``<runs_dir>/<name>-<time>`` (``-1``, ``-2``, ... when another run started in the same second)."""
    from .fileio import claim_new_folder

    root = claim_new_folder(Path(runs_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    (root / "checkpoints").mkdir()
    (root / "samples").mkdir()
    return RunDir(root)


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class LoopResult:
    steps: int
    seconds: float
    last_loss: float
    resumed_from: int


def run_loop(
    run: RunDir,
    cfg: TrainConfig,
    modules: list[torch.nn.Module],
    parameters: list[torch.nn.Parameter],
    loss_fn: Callable[[int, int], tuple[torch.Tensor, dict]],
    validate: Callable[[int], dict] | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    stop_after: int | None = None,
    generators: Sequence[torch.Generator | random.Random] = (),
) -> LoopResult:
    """Optimise ``parameters`` with ``loss_fn(step, micro)`` for ``cfg.max_steps`` steps.

    ``generators`` are the random generators ``loss_fn`` draws from: their states go into every
    checkpoint, so a resumed run draws what the uninterrupted one would have.
    ``stop_after`` ends the run early (tests use it to simulate a kill between checkpoints).
    """
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    ema = EMAModel(parameters, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    prepared = accelerator.prepare(*modules, optimizer, lr_schedule)
    optimizer, lr_schedule = prepared[-2], prepared[-1]
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start_step = 0
    checkpoint = run.latest_checkpoint() if resume else None
    if checkpoint is not None:
        start_step = checkpoint_step(checkpoint)
        accelerator.load_state(str(checkpoint))
        load_generators(checkpoint, generators)
        log.info("resumed from %s (step %d)", checkpoint, start_step)
    if resume and run.trim_metrics(start_step):
        log.warning("resume: metrics.jsonl lines logged after step %d (before the kill) moved to metrics.jsonl.orphaned", start_step)

    started = time.perf_counter()
    last = float("nan")
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"train {run.root.name}", unit=" step", disable=not progress)
    step = start_step
    for step in range(start_step, cfg.max_steps):
        if stop_after is not None and step >= stop_after:
            break
        total, details = 0.0, {}
        for micro in range(cfg.grad_accum_steps):
            with accelerator.autocast():
                loss, details = loss_fn(step, micro)
            accelerator.backward(loss / cfg.grad_accum_steps)
            total += float(loss.detach()) / cfg.grad_accum_steps
        grad_norm = accelerator.clip_grad_norm_(parameters, cfg.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parameters)
        last = total
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if done % 10 == 0 or done == cfg.max_steps:
            run.log_metrics({"step": done, "loss": round(total, 6), "lr": lr_schedule.get_last_lr()[0],
                             "grad_norm": round(float(grad_norm), 4), **{k: round(float(v), 6) for k, v in details.items()},
                             "time": round(time.perf_counter() - started, 2)})
        if validate is not None and (done % cfg.validate_every == 0 or done == cfg.max_steps):
            with ema_weights(ema, parameters):
                run.log_metrics({"step": done, **validate(done)})
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            save_checkpoint(accelerator, run, done, cfg.keep_checkpoints, generators)
    else:
        step = cfg.max_steps
    bar.close()
    if ema is not None and step >= cfg.max_steps:
        ema.copy_to(parameters)  # the exported model carries the averaged weights
    return LoopResult(step, time.perf_counter() - started, last, start_step)


class ema_weights:
    """Evaluate with the EMA weights, then put the training weights back."""

    def __init__(self, ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
        self.ema, self.parameters = ema, parameters

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.parameters)


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a training checkpoint, after loading each of its files with ``weights_only=True``:
    ``accelerator.load_state`` would unpickle the EMA state with ``weights_only=False``."""
    from .errors import UserError
    from .safeload import check_checkpoint_folder

    fix = f"delete {checkpoint} to resume from the checkpoint before it, or start a new run"
    check_checkpoint_folder(checkpoint, fix)
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{checkpoint / 'trainer_state.json'} is damaged ({exc!r}); {fix}") from None


GENERATORS_FILE = "generators.pt"


def load_generators(checkpoint: Path, generators: Sequence[torch.Generator | random.Random]) -> None:
    """Put back the generator states a checkpoint saved (checkpoints written before they were saved have none)."""
    path = checkpoint / GENERATORS_FILE
    if not generators or not path.is_file():
        return
    states = torch.load(path, map_location="cpu", weights_only=True)
    if len(states) != len(generators):
        raise ValueError(f"{path} holds {len(states)} generator states, the trainer has {len(generators)}")
    for generator, state in zip(generators, states):
        if isinstance(generator, torch.Generator):
            generator.set_state(state)
        else:
            generator.setstate((state[0], tuple(state[1]), state[2]))


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int,
                    generators: Sequence[torch.Generator | random.Random] = ()) -> Path:
    final = run.checkpoints / f"step_{step:07d}"
    with atomic_folder(final, run.checkpoints / f".tmp_step_{step:07d}") as tmp:  # complete or absent, never half-written
        accelerator.save_state(str(tmp))
        if generators:
            torch.save([g.get_state() if isinstance(g, torch.Generator) else g.getstate() for g in generators], tmp / GENERATORS_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    for old in sorted(p for p in run.checkpoints.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- losses -----------------------------------------------------------------------------------
def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1 = F.l1_loss(recon, images)
    mse = F.mse_loss(recon, images)
    kl = posterior.kl().mean()  # per image, summed over latent elements
    return l1 + mse + kl_weight * kl, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach() / images[0].numel()}


def diffusion_loss(model: LatentDiffusion, latents: torch.Tensor, texts: list[str], modalities: list[str],
                   generator: torch.Generator, findings: list[list[dict] | None] | None = None) -> tuple[torch.Tensor, dict]:
    """Noise-prediction (or v-prediction) loss at uniformly drawn timesteps; ``findings`` feed a finding table."""
    scheduler = model.scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    cond = model.conditioner(texts, modalities, findings)
    prediction = model.unet(noisy, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                            class_labels=cond.class_emb).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    return F.mse_loss(prediction.float(), target.float()), {}


def latent_scaling_factor(vae, images: torch.Tensor, batch: int = 64) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (as SD does)."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])
    return float(1.0 / latents.flatten().std().clamp(min=1e-6))


def environment() -> dict:
    return {
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(n: int, cfg: TrainConfig) -> float:
    return n / (cfg.batch_size * cfg.grad_accum_steps)


__all__ = [
    "ImageCache", "LoopResult", "RunDir", "augment_prompt", "batch_indices", "process_slot", "diffusion_loss", "environment",
    "latent_scaling_factor", "make_run_dir", "run_loop", "save_checkpoint", "seed_everything", "split_rows",
    "steps_per_epoch", "vae_loss",
]
