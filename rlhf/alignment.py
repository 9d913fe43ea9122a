"""Text-image alignment: a small CLIP (open_clip) trained contrastively on image-report pairs.

The default model is built from a small open_clip config (a ResNet image tower at 64 px, a
two-block text transformer over open_clip's bundled BPE tokenizer) and trained here on phantom or
real image-report pairs; any open_clip model (e.g. BiomedCLIP, on a machine with network) can
stand in by name (``judges.alignment.model``).

It gives the pipeline three things: unit embeddings of images and texts (the selector's
features), the CLIP score of an image against its prompt (the ``alignment`` scorer, a reward
component) and retrieval recall@k on held-back pairs (how well it was trained).

A trained model is a folder: ``model.safetensors`` (fp16), ``config.json`` (the open_clip model
config, tokenizer, context length, image size, normalisation) and ``metadata.json`` (data, seed,
epochs, metrics, seconds, device, command), written to a temporary folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from generator.config import DataConfig
from generator.data import iter_manifest
from generator.data.records import ManifestRow
from generator.devices import resolve_device
from generator.errors import SynthmedError, UserError
from generator.fileio import atomic_folder

from .config import AlignmentConfig
from .scorers import ScoreResult, as_image_batch, check_inputs, register_scorer

if TYPE_CHECKING:
    from generator.training import ImageCache

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_FOLDER = Path(__file__).resolve().parent / "weights" / "clip"
TRAIN_COMMAND = "synthmed judges train clip"
TOKENIZER = "open_clip.SimpleTokenizer"  # open_clip's bundled OpenAI BPE (49,408 tokens): works offline
VOCAB_SIZE = 49408
CLIP_SCORE_WEIGHT = 2.5  # CLIPScore (Hessel et al. 2021): w * max(cos, 0), w = 2.5 stretches the usual cosines towards [0, 1]
MAX_LOGIT_SCALE = 100.0  # as in CLIP: beyond this the contrastive softmax becomes unstable


class AlignmentNotFoundError(SynthmedError, FileNotFoundError):
    """The alignment model folder is missing or incomplete."""


def resolve_folder(folder: str | os.PathLike) -> Path:
    """A relative folder is looked up in the working directory, then beside the installed packages (shipped weights)."""
    from generator.paths import shipped

    return shipped(folder)


# -- model ------------------------------------------------------------------------------------
def model_config(cfg: AlignmentConfig) -> dict:
    """The open_clip model config (as in open_clip's ``model_configs/*.json``) of the custom model."""
    if isinstance(cfg.vision_layers, int):  # ViT
        vision = {"image_size": cfg.image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                  "patch_size": cfg.vision_patch, "head_width": max(8, cfg.vision_width // 4)}
    else:  # ModifiedResNet: stem /4, stages /1 /2 /2 /2, attention pool over (image_size / 32)^2 cells
        if cfg.image_size % 32:
            raise UserError(f"a ResNet image tower needs judges.alignment.image_size divisible by 32, got {cfg.image_size}")
        vision = {"image_size": cfg.image_size, "layers": list(cfg.vision_layers), "width": cfg.vision_width}
    text = {"context_length": cfg.context_length, "vocab_size": VOCAB_SIZE, "width": cfg.text_width,
            "heads": cfg.text_heads, "layers": cfg.text_layers}
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}


def build_clip(config: dict) -> torch.nn.Module:
    return open_clip.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"])


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the weights (names and float32 values): what a selector checks its backbone against."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class AlignmentModel:
    """A CLIP model with its tokenizer and image normalisation; inputs as the pipeline has them.

    ``images``: ``(B, 3, H, W)`` float in ``[-1, 1]`` (resized to the model's size when they differ)
    or a list of uint8 arrays. Embeddings are unit vectors on the CPU.
    """

    def __init__(self, clip: torch.nn.Module, tokenizer: Any, *, context_length: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], config: dict, folder: Path | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 256):
        self.device = torch.device(device)
        self.clip = clip.to(self.device).eval()
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.config = config  # what config.json holds
        self.folder = folder
        self.batch_size = batch_size
        self._hash: str | None = None
        self._embed_dim: int | None = None

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:  # asked of the model: named models differ in where they keep it
            self._embed_dim = int(self.encode_texts(["x"]).shape[1])
        return self._embed_dim

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.clip)
        return self._hash

    # inputs
    def pixels(self, images: Any) -> torch.Tensor:
        """[-1, 1] images -> the tensor the image tower expects (size, normalisation)."""
        x = as_image_batch(images)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)

    # embeddings (with gradients: training; without: everything else)
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels.to(self.device)).float(), dim=-1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Any) -> torch.Tensor:
        """(B, D) unit vectors."""
        was_training = self.clip.training
        self.clip.eval()
        pixels = self.pixels(images)
        out = torch.cat([self.image_features(pixels[i : i + self.batch_size]).cpu() for i in range(0, len(pixels), self.batch_size)])
        self.clip.train(was_training)
        return out

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) unit vectors; texts longer than the context length are truncated."""
        texts = list(texts)
        if not texts:
            raise ValueError("no texts")
        was_training = self.clip.training
        self.clip.eval()
        out = torch.cat([self.text_features(self.tokens(texts[i : i + self.batch_size])).cpu() for i in range(0, len(texts), self.batch_size)])
        self.clip.train(was_training)
        return out

    def cosine(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """(B,) cosine similarity of image i and text i."""
        return (self.encode_images(images) * self.encode_texts(texts)).sum(-1).numpy().astype(np.float64)

    def clip_score(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """(B,) CLIPScore: 2.5 * max(cos, 0) between image i and text i."""
        return CLIP_SCORE_WEIGHT * np.clip(self.cosine(images, texts), 0.0, None)

    def retrieval_recall(self, images: Any, texts: Sequence[str], ks: Sequence[int] = (1, 5),
                         labels: Sequence[str] | None = None) -> dict[str, float]:
        """Image->text and text->image recall@k among these pairs (pair i is image i with text i).

        A retrieved text identical to the paired one counts as a hit (duplicate reports). With
        ``labels`` (e.g. :func:`finding_label`), also the "same label" recall: a hit is any item
        whose label equals the query's, which is what near-identical reports allow to measure."""
        texts = list(texts)
        sim = (self.encode_images(images) @ self.encode_texts(texts).T).numpy()  # (N images, N texts)
        same_text = np.asarray(texts)[:, None] == np.asarray(texts)[None, :]
        out = recall_at_k(sim, same_text, ks)
        if labels is not None:
            labels = np.asarray(list(labels))
            out.update({k.replace("recall", "same_label_recall"): v for k, v in recall_at_k(sim, labels[:, None] == labels[None, :], ks).items()})
        return out


def recall_at_k(sim: np.ndarray, match: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``sim[i, j]``: image i against text j; ``match[i, j]``: text j is a correct answer for image i
    (symmetric). Recall@k: share of queries with a correct answer among their top k."""
    out: dict[str, float] = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = np.take_along_axis(match, order, axis=1)  # match is symmetric, so one table serves both ways
        for k in ks:
            out[f"{direction}_recall@{k}"] = float(hits[:, : min(k, hits.shape[1])].any(axis=1).mean())
    return out


def finding_label(row: ManifestRow) -> str:
    """What a report says is present: ``"<modality>:<finding>+<finding>"`` or ``"<modality>:normal"``."""
    present = sorted({f["name"] for f in row.findings if f.get("present", True)})
    return f"{row.modality}:{'+'.join(present) or 'normal'}"


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit vectors: pair i is the positive, the rest negatives."""
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def build_alignment(cfg: AlignmentConfig, device: str | torch.device | None = None) -> AlignmentModel:
    """A fresh (untrained) custom model, or the named open_clip model with its pretrained weights."""
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    if cfg.model is not None:
        return _named_model(cfg.model, cfg.pretrained, device)
    torch.manual_seed(cfg.seed)
    config = model_config(cfg)
    return AlignmentModel(
        build_clip(config), open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length),
        context_length=cfg.context_length, image_size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        config=_config_json(config, None, cfg.context_length, cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), device=device,
    )


def _named_model(name: str, pretrained: str | None, device: torch.device, load_weights: bool = True) -> AlignmentModel:
    clip = open_clip.create_model(name, pretrained=pretrained if load_weights else None, device=device)
    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(name)
    context = int(getattr(tokenizer, "context_length", None) or getattr(clip, "context_length", 77))
    return AlignmentModel(clip, tokenizer, context_length=context, image_size=size, mean=mean, std=std,
                          config=_config_json(None, name, context, size, mean, std, pretrained), device=device)


def _config_json(model_cfg: dict | None, model_name: str | None, context_length: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], pretrained: str | None = None) -> dict:
    return {
        "version": FORMAT_VERSION,
        "model_cfg": model_cfg,  # open_clip model config of the custom model; None for a named one
        "model_name": model_name,  # open_clip model name, rebuilt by name before loading the weights
        "pretrained": pretrained,
        "tokenizer": TOKENIZER if model_name is None else f"open_clip.get_tokenizer({model_name!r})",
        "context_length": context_length,  # tokens
        "image_size": image_size,  # pixels, square
        "mean": list(mean), "std": list(std),  # normalisation of [0, 1] pixels, per RGB channel
        "input_range": "[-1, 1] images are mapped to [0, 1], then (x - mean) / std",
    }


# -- save / load ------------------------------------------------------------------------------
@torch.no_grad()
def round_to_fp16(model: AlignmentModel) -> AlignmentModel:
    """Round the weights (in place) to what fp16 storage keeps, so a saved and reloaded model
    gives the same embeddings as this one."""
    for tensor in model.clip.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.half().float())
    model._hash = None
    return model


def save_alignment(model: AlignmentModel, folder: str | os.PathLike, metadata: dict) -> Path:
    """Write the model folder atomically (a temporary sibling renamed into place when complete).
    Weights are stored in fp16 (see :func:`round_to_fp16`)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous() for k, v in model.clip.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config, indent=2) + "\n", encoding="utf-8")
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return folder


def load_alignment(source: str | os.PathLike | AlignmentConfig | None = None, device: str | torch.device = "auto") -> AlignmentModel:
    """The model in a folder (default: the shipped one), or per a config: its ``model`` by name,
    otherwise the folder ``cfg.out``."""
    if isinstance(source, AlignmentConfig):
        if source.model is not None:
            return _named_model(source.model, source.pretrained, resolve_device(source.device if device == "auto" else str(device)))
        device = source.device if device == "auto" else device
        source = source.out
    folder = resolve_folder(SHIPPED_FOLDER if source is None else source)
    missing = [name for name in ("model.safetensors", "config.json") if not (folder / name).is_file()]
    if missing:
        raise AlignmentNotFoundError(
            f"no alignment model in {folder} ({', '.join(missing)} missing); train one with `{TRAIN_COMMAND}` "
            f"(writes judges.alignment.out, default rlhf/weights/clip) or point judges.alignment.out at a trained model folder"
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dev = resolve_device(str(device))
    if config.get("model_name"):
        model = _named_model(config["model_name"], None, dev, load_weights=False)
    else:
        clip = build_clip(config["model_cfg"])
        model = AlignmentModel(clip, open_clip.tokenizer.SimpleTokenizer(context_length=config["context_length"]),
                               context_length=config["context_length"], image_size=config["image_size"],
                               mean=config["mean"], std=config["std"], config=config, device=dev)
    reference = model.clip.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in load_file(str(folder / "model.safetensors")).items()}
    try:
        model.clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{folder}/model.safetensors does not fit its config.json: {exc}") from None
    model.clip.to(dev).eval()
    model.config, model.folder = config, folder
    return model


def read_metadata(folder: str | os.PathLike) -> dict:
    path = resolve_folder(folder) / "metadata.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# -- data -------------------------------------------------------------------------------------
def default_manifests(image_size: int) -> list[Path]:
    """The phantom set drawn at the model's size (``synthmed data phantoms --size N --out data/phantoms_Npx``)."""
    path = resolve_folder(f"data/phantoms_{image_size}px") / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest given and no phantoms at {path}; draw them with "
            f"`synthmed data phantoms --size {image_size} --per-finding 60 --out data/phantoms_{image_size}px` "
            "or list manifests in judges.alignment.data"
        )
    return [path]


def manifest_rows(manifests: Sequence[str | os.PathLike], data: DataConfig | None = None) -> list[ManifestRow]:
    data = data or DataConfig()
    rows: list[ManifestRow] = []
    for manifest in manifests:
        path = resolve_folder(manifest)
        rows.extend(iter_manifest(path / "manifest.csv" if path.is_dir() else path, data.modalities))
    if not rows:
        raise UserError(f"no image-report pairs in {', '.join(map(str, manifests))}")
    return rows


def alignment_rows(cfg: AlignmentConfig, data: DataConfig | None = None) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train, held-back) pairs per the config: its manifests (default: phantoms), a seeded split."""
    from generator.training import split_rows

    rows = manifest_rows(cfg.data or default_manifests(cfg.image_size), data)
    return split_rows(rows, cfg.val_fraction, cfg.seed)


def load_images(rows: Sequence[ManifestRow], image_size: int, data: DataConfig | None = None, progress: bool = True) -> ImageCache:
    """Rows decoded into memory at ``image_size`` (channels, CLAHE and padding per modality)."""
    from generator.data.transforms import RecordTransform
    from generator.training import ImageCache  # training-only imports (accelerate, diffusers) stay out of scoring

    data = (data or DataConfig()).model_copy(update={"image_size": image_size})
    return ImageCache(list(rows), RecordTransform(data, train=False), progress=progress)


def _shifted(images: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels, the uncovered border black."""
    if max_shift <= 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(images), 2))
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


# -- training ---------------------------------------------------------------------------------
def train_alignment(cfg: AlignmentConfig, train_rows: Sequence[ManifestRow], val_rows: Sequence[ManifestRow],
                    out_dir: str | os.PathLike | None = None, progress: bool = True, data: DataConfig | None = None) -> dict:
    """Train contrastively on ``train_rows``, measure retrieval on ``val_rows``, save to ``out_dir``
    (default ``cfg.out``). Returns the summary also written to ``metadata.json``."""
    if len(train_rows) < 2:
        raise UserError(f"contrastive training needs at least 2 image-report pairs, got {len(train_rows)}")
    if not val_rows:
        raise UserError("no held-back pairs: raise judges.alignment.val_fraction or pass val_rows")
    from generator.training import augment_prompt, environment

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    model = build_alignment(cfg, device)
    train = load_images(train_rows, model.image_size, data, progress)
    val = load_images(val_rows, model.image_size, data, progress)
    val_labels = [finding_label(r) for r in val_rows]

    clip = model.clip.train()
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "positional_embedding" not in n]
    no_decay = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "positional_embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    batch = min(cfg.batch_size, len(train))
    per_epoch = max(1, len(train) // batch)  # whole batches only: a tiny last batch is a weak contrastive task
    total = per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, total // 4)
    prompt_rng = random.Random(cfg.seed)
    history = [{"epoch": 0, **_validate(model, val, cfg.batch_size)}]
    bar = tqdm(total=total, desc="train alignment", unit=" step", disable=not progress)
    loop_started, step, out_of_time = time.perf_counter(), 0, False
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(train))
        losses = []
        for i in range(per_epoch):
            done = training_progress(step, total, time.perf_counter() - loop_started, cfg.time_budget_s)
            if done >= 1.0:
                out_of_time = True
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * learning_rate_factor(step, warmup, done)
            idx = order[i * batch : (i + 1) * batch]
            images, texts, _ = train.batch(idx)
            images = _shifted(images, cfg.max_shift, rng)
            if cfg.augment_prompts:
                texts = [augment_prompt(t, prompt_rng) for t in texts]
            loss = contrastive_loss(model.image_features(model.pixels(images)), model.text_features(model.tokens(texts)), clip.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
        if losses:
            history.append({"epoch": epoch + 1, "steps": step, "train_loss": round(float(np.mean(losses)), 5)})
            log.info("alignment epoch %d: train loss %.4f", epoch + 1, history[-1]["train_loss"])
        if out_of_time:
            log.warning("alignment training stopped by judges.alignment.time_budget_s=%s after %d of %d steps", cfg.time_budget_s, step, total)
            break
    bar.close()
    recalibrate_batchnorm(model, train.images, cfg.batch_size)
    round_to_fp16(model)  # the saved weights are fp16: evaluate (and hash) exactly what is shipped
    history[-1].update(_validate(model, val, cfg.batch_size))
    metrics = evaluate_alignment(model, val.images, val.texts, val.modalities, val_labels)
    seconds = round(time.perf_counter() - started, 1)
    summary = {
        "version": FORMAT_VERSION,
        "kind": "synthmed alignment model",
        "data": {"manifests": list(cfg.data) or [f"data/phantoms_{cfg.image_size}px/manifest.csv"],
                 "sources": dict(Counter(r.source for r in [*train_rows, *val_rows])),
                 "train_pairs": len(train_rows), "val_pairs": len(val_rows), "val_fraction": cfg.val_fraction, "split_seed": cfg.seed,
                 "split": "generator.training.split_rows(rows of the manifests, val_fraction, split_seed)"},
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "epochs_done": round(step / per_epoch, 2),
        "steps": step,
        "steps_planned": total,
        "stopped_by_time_budget": out_of_time,
        "batch_size": batch,
        "config": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "history": history,
        "logit_scale": round(float(clip.logit_scale.detach().exp()), 3),
        "parameters": sum(p.numel() for p in clip.parameters()),
        "weights_sha256": model.weights_hash,
        "seconds": seconds,
        "device": str(device),
        "environment": environment(),
        "command": " ".join(sys.argv),
    }
    out = Path(out_dir if out_dir is not None else cfg.out)
    save_alignment(model, out, summary)
    model.folder = out
    summary["folder"] = str(out)
    return summary


def training_progress(step: int, total: int, elapsed_s: float, budget_s: float | None) -> float:
    """Share of the run done: by steps, or by wall-clock time when a budget is set, whichever is further."""
    done = step / max(1, total)
    return max(done, elapsed_s / budget_s) if budget_s else done


def learning_rate_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero as ``progress`` reaches 1."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def recalibrate_batchnorm(model: AlignmentModel, images: torch.Tensor, batch_size: int, max_images: int = 8192) -> None:
    """Recompute BatchNorm statistics of the image tower with the final weights (one pass, equal
    weight per batch). The running averages kept during training trail the weights, and in a
    short run the lag alone can undo what the contrastive loss learned."""
    norms = [m for m in model.clip.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.clip.visual.train()
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:max_images]]  # all kinds, not the first rows
    for i in range(0, len(subset), batch_size):
        chunk = subset[i : i + batch_size]
        chunk = chunk.float().div(127.5).sub(1.0) if chunk.dtype == torch.uint8 else chunk
        model.clip.visual(model.pixels(chunk).to(model.device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.clip.eval()
    model._hash = None


@torch.no_grad()
def _validate(model: AlignmentModel, val: ImageCache, batch_size: int) -> dict:
    images = val.images.float().div(127.5).sub(1.0)
    img, txt = model.encode_images(images), model.encode_texts(val.texts)
    losses = [float(contrastive_loss(img[i : i + batch_size], txt[i : i + batch_size], model.clip.logit_scale.cpu()))
              for i in range(0, len(img), batch_size) if len(img[i : i + batch_size]) > 1]
    same_text = np.asarray(val.texts)[:, None] == np.asarray(val.texts)[None, :]
    recall = recall_at_k((img @ txt.T).numpy(), same_text, (1, 5))
    return {"val_loss": round(float(np.mean(losses)), 5) if losses else None, **{k: round(v, 4) for k, v in recall.items()}}


def evaluate_alignment(model: AlignmentModel, images: torch.Tensor, texts: Sequence[str], modalities: Sequence[str],
                       labels: Sequence[str] | None = None, ks: Sequence[int] = (1, 5)) -> dict:
    """Retrieval recall@k over all held-back pairs, then within each modality's pairs.

    ``images``: uint8 ``(N, 3, H, W)`` (an ImageCache's) or float in [-1, 1]."""
    x = images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images
    out: dict[str, Any] = {"pairs": len(texts), **model.retrieval_recall(x, texts, ks, labels)}
    per_modality = {}
    modalities = np.asarray(list(modalities))
    for modality in sorted(set(modalities)):
        idx = np.flatnonzero(modalities == modality)
        sub_labels = None if labels is None else [labels[i] for i in idx]
        per_modality[modality] = {"pairs": int(len(idx)), **model.retrieval_recall(x[torch.from_numpy(idx)], [texts[i] for i in idx], ks, sub_labels)}
    out["per_modality"] = per_modality
    out["clip_score_mean"] = float(model.clip_score(x, texts).mean())
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


# -- command line -----------------------------------------------------------------------------
# -- scorer -----------------------------------------------------------------------------------
class AlignmentScorer:
    """Reward component: the CLIP score between each image and the prompt it was drawn from."""

    name = "alignment"

    def __init__(self, model: AlignmentModel):
        self.model = model

    def score(self, images: Any, prompts: Sequence[str], modalities: Sequence[str]) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        cosine = self.model.cosine(batch, prompts)
        return CLIP_SCORE_WEIGHT * np.clip(cosine, 0.0, None), {"cosine": cosine}


@register_scorer("alignment")
def alignment_scorer(folder: str | os.PathLike | None = None, device: str = "auto", model: AlignmentModel | None = None) -> AlignmentScorer:
    """The alignment scorer on ``model``, or on the model in ``folder`` (default: the shipped one)."""
    return AlignmentScorer(model if model is not None else load_alignment(folder, device=device))


__all__ = [
    "AlignmentModel", "AlignmentNotFoundError", "AlignmentScorer", "CLIP_SCORE_WEIGHT", "alignment_rows", "alignment_scorer",
    "build_alignment", "contrastive_loss", "evaluate_alignment", "finding_label", "load_alignment", "load_images",
    "manifest_rows", "model_config", "recall_at_k", "recalibrate_batchnorm", "round_to_fp16", "save_alignment", "train_alignment", "weights_hash",
]


