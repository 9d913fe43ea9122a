"""Multi-label finding classifiers with calibrated probabilities, and the finding scorer.

Per modality there are two independent classifiers (``ROLES``):

- ``reward``: serves the verifier and the finding-agreement reward;
- ``evaluator``: held out, never enters a reward; the evaluation reads its probabilities and its
  penultimate-layer features (the project's own image-feature space for a Fréchet distance).

They differ in seed, data split (a hash of each image's path salted with role and seed) and
architecture (``convnet``: plain conv-BatchNorm-ReLU-pool stages with average and max pooling;
``resnet``: residual blocks of another width and depth, average pooling or, with ``resnet_pool``
``avgmax``, average and max), so a generator that learns to fool one has not thereby fooled the other.

Layout of a trained classifier, ``<out>/<role>/<modality>/``::

    model.safetensors   the network's state dict
    config.json         architecture, label names, image size, temperature, role (checked at load)
    metadata.json       version, seed, data, split sizes, epochs, metrics, seconds, device, command

    summaries = train_all(ClassifierConfig(), load_rows(["data/phantoms_64px_seed4242_300pf"]), out="rlhf/weights/classifiers")
    scorer = build_scorer("finding_reward")     # the shipped reward classifiers, every modality
    scores, details = scorer.score(images, prompts, modalities)

Training: AdamW with linear warm-up then cosine decay, BCE with logits (masked where a dataset
does not annotate a label), light augmentation without flips. Of the rows, ``val_fraction`` is
held back: half to fit the temperature, half to report AUROC and calibration error, so neither
number is measured on data that chose it. The shipped classifiers come from
``synthmed judges train classifier``: by default on their own phantom set
(``judges.classifier.phantoms_per_finding`` at ``phantoms_seed``), whose images are neither the
evaluation's reference phantoms, nor the benchmark's, nor the generator's training set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from generator.config import ModalityConfig, default_modalities
from generator.data import ManifestRow, load_row, resize_pad, source_rows, to_channels
from generator.devices import resolve_device
from generator.errors import SynthmedError, UserError
from generator.fileio import atomic_folder, write_json_atomic
from generator.phantoms import NORMAL, PHANTOM_MODULES, get_spec, make_phantom
from generator.phantoms.dataset import study_seed

from .config import ClassifierConfig
from .metrics import auroc
from .scorers import ScoreResult, as_image_batch, check_inputs, register_scorer
from .text_labels import expected_findings

log = logging.getLogger(__name__)

VERSION = "2"  # bump when the saved layout or the architectures change (2: config.json records the resnet's pooling)
ROLES = ("reward", "evaluator")
SPLITS = ("train", "calibration", "test")
DEFAULT_ROOT = Path(__file__).resolve().parent / "weights" / "classifiers"  # the shipped classifiers
TRAIN_COMMAND = "synthmed judges train classifier{data} --roles {role} --modalities {modality} --out {out}"  # the project's CLI
NEUTRAL_AGREEMENT = 0.5  # score of an image whose prompt states no finding the classifier knows: a coin flip's agreement
ECE_BINS = 10


# ---------------------------------------------------------------------------------------------
# Architectures


class ConvNet(nn.Module):
    """Plain: a patchify stem (a ``patch`` x ``patch`` conv of stride ``patch``: every pixel seen once,
    and the later convs cost 1 / patch**2 of full-resolution ones), then per further width a 3x3
    conv-BatchNorm-ReLU and 2x2 max pooling; features are global average and max pooling side by
    side (max keeps a small bright lesion that an average would wash out)."""

    def __init__(self, n_labels: int, widths: Sequence[int], patch: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], patch, stride=patch, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, width in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = 2 * widths[-1]
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, n_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, L) logits
        return self.head(self.dropout(self.features(x)))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """Residual: a patchify stem, then ``blocks`` residual blocks per width (the first block of each
    later stage strided); features are global average pooling (``pool="avg"``) or average and max
    pooling side by side (``"avgmax"``). BatchNorm, not GroupNorm: in the few hundred steps a CPU
    budget allows, the GroupNorm version had learned nothing (cxr test AUROC 0.57 against 0.91
    with BatchNorm, same steps)."""

    def __init__(self, n_labels: int, widths: Sequence[int], blocks: int, patch: int = 4, pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], patch, stride=patch, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                stages.append(ResidualBlock(c_in, width, stride=2 if (i > 0 and b == 0) else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.feature_dim = c_in * (2 if pool == "avgmax" else 1)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, n_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        h = self.stages(self.stem(x))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1) if self.pool == "avgmax" else h.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, L) logits
        return self.head(self.dropout(self.features(x)))


ARCHITECTURES = ("convnet", "resnet")
POOLS = ("avg", "avgmax")  # global pooling into the features: average, or average and max side by side
DEFAULT_POOL = {"convnet": "avgmax", "resnet": "avg"}  # the convnet always pools both; a config.json without "pool" predates the choice


def build_network(arch: str, n_labels: int, widths: Sequence[int], blocks: int = 1, patch: int = 4, pool: str | None = None) -> nn.Module:
    if not widths:
        raise UserError("an architecture needs at least one width")
    if arch == "convnet":
        if pool not in (None, "avgmax"):
            raise UserError("the convnet always pools average and max (pool='avgmax')")
        return ConvNet(n_labels, widths, patch)
    if arch == "resnet":
        return ResNet(n_labels, widths, blocks, patch, pool or DEFAULT_POOL["resnet"])
    raise UserError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def role_settings(cfg: ClassifierConfig, role: str) -> dict[str, Any]:
    """Architecture, widths, blocks and seed of one role, from the config."""
    if role not in ROLES:
        raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
    arch = cfg.reward_arch if role == "reward" else cfg.evaluator_arch
    seed = cfg.reward_seed if role == "reward" else cfg.evaluator_seed
    widths = list(cfg.convnet_widths if arch == "convnet" else cfg.resnet_widths)
    return {"arch": arch, "seed": seed, "widths": widths, "blocks": cfg.resnet_blocks if arch == "resnet" else 1, "patch": cfg.stem_patch,
            "pool": cfg.resnet_pool if arch == "resnet" else DEFAULT_POOL["convnet"]}


# ---------------------------------------------------------------------------------------------
# Inference


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad to square with black (-1, as the data layer pads), then resize to ``size`` pixels."""
    _, _, h, w = images.shape
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        images = F.pad(images, (left, side - w - left, top, side - h - top), value=-1.0)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


class FindingClassifier:
    """A trained multi-label classifier of one modality and role, ready for inference."""

    def __init__(
        self,
        network: nn.Module,
        label_names: Sequence[str],
        image_size: int,
        temperature: float,
        role: str,
        modality: str,
        architecture: Mapping[str, Any],
        device: str | torch.device = "cpu",
    ):
        self.network = network.to(device).eval()
        self.label_names = list(label_names)
        self.image_size = int(image_size)
        self.temperature = float(temperature)
        self.role = role
        self.modality = modality
        # what build_network needs to rebuild the network: arch, widths, blocks, patch, pool
        self.architecture = {k: architecture[k] for k in ("arch", "widths", "blocks", "patch")}
        self.architecture["pool"] = architecture.get("pool") or DEFAULT_POOL[self.architecture["arch"]]
        self.device = torch.device(device)

    @property
    def arch(self) -> str:
        return self.architecture["arch"]

    @property
    def config(self) -> dict[str, Any]:
        return {
            "kind": "synthmed finding classifier",
            "version": VERSION,
            "role": self.role,
            "modality": self.modality,
            **self.architecture,
            "label_names": self.label_names,
            "image_size": self.image_size,
            "temperature": self.temperature,
            "feature_dim": int(self.network.feature_dim),
            "input": "(B, 3, H, W) float in [-1, 1], resized to image_size; grey images as three equal channels",
        }

    def prepare(self, images: Any) -> torch.Tensor:
        """``(B, 3, image_size, image_size)`` on the model's device from any scorer image input."""
        return _resize_batch(as_image_batch(images), self.image_size).to(self.device)

    @torch.no_grad()
    def _run(self, images: Any, what: str, batch_size: int = 256) -> torch.Tensor:
        batch = self.prepare(images)
        self.network.eval()
        fn = self.network.features if what == "features" else self.network
        return torch.cat([fn(batch[i : i + batch_size]).float().cpu() for i in range(0, len(batch), batch_size)])

    def differentiable_logits(self, images: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Logits ``(B, L)`` of a ``(B, 3, H, W)`` [-1, 1] tensor *with* the graph to ``images`` (for reward-gradient
        training; the network's own weights stay frozen), temperature-scaled unless ``calibrated=False``."""
        self.network.eval()
        self.network.requires_grad_(False)
        out = self.network(_resize_batch(images.to(self.device), self.image_size)).float()
        return out / self.temperature if calibrated else out

    def logits(self, images: Any) -> torch.Tensor:
        """Uncalibrated logits ``(B, L)``."""
        return self._run(images, "logits")

    def predict_proba(self, images: Any, calibrated: bool = True) -> np.ndarray:
        """Probability of each label ``(B, L)``, temperature-scaled unless ``calibrated=False``."""
        logits = self.logits(images)
        return torch.sigmoid(logits / (self.temperature if calibrated else 1.0)).numpy()

    def features(self, images: Any) -> np.ndarray:
        """Penultimate-layer features ``(B, D)``."""
        return self._run(images, "features").numpy()


class ClassifierNotFoundError(SynthmedError, FileNotFoundError):
    pass


def train_command(role: str = "all", modality: str = "all", out: str | os.PathLike | None = None, data: Sequence[str] = ()) -> str:
    """The ``synthmed`` command that trains the ``role`` classifier of ``modality`` (``all``: every one)
    into ``<out>/<role>/<modality>/``; without ``data``, on the classifiers' default phantom set."""
    text = TRAIN_COMMAND.format(data=" --data " + " ".join(shlex.quote(str(d)) for d in data) if data else "", role=role,
                                modality=modality, out=shlex.quote(str(out if out is not None else ClassifierConfig().out)))
    return text.replace(" --roles all", "").replace(" --modalities all", "")


def _train_hint(folder: Path) -> str:
    role, modality = folder.parent.name, folder.name
    if role not in ROLES:
        role = "<role>"
    return train_command(role, modality, folder.parent.parent)


def load_classifier(folder: str | os.PathLike, role: str | None = None, device: str | torch.device = "cpu") -> FindingClassifier:
    """The classifier saved in ``folder``; with ``role`` given, refuse weights of another role."""
    from generator.paths import shipped

    folder = shipped(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            what = "folder does not exist" if not folder.is_dir() else f"{name} missing"
            raise ClassifierNotFoundError(f"no finding classifier in {folder} ({what}); train it with: {_train_hint(folder)}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("kind") != "synthmed finding classifier":
        raise UserError(f"{folder / 'config.json'} is not a synthmed finding classifier config")
    if role is not None and config.get("role") != role:
        raise UserError(
            f"{folder} holds a {config.get('role')!r} classifier, but a {role!r} one was asked for; "
            f"the reward must never be built from evaluator weights (nor the evaluator from reward weights). "
            f"Point at <out>/{role}/{config.get('modality')} instead."
        )
    try:
        network = build_network(config["arch"], len(config["label_names"]), config["widths"], config["blocks"], config["patch"],
                                config.get("pool"))
        network.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{folder}: the weights do not fit config.json ({exc}); retrain with: {_train_hint(folder)}") from None
    return FindingClassifier(
        network, config["label_names"], config["image_size"], config["temperature"], config["role"], config["modality"], config, device
    )


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so metadata.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def save_classifier(classifier: FindingClassifier, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the classifier atomically: a temporary folder beside ``folder``, renamed at the end."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in classifier.network.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", classifier.config, ensure_ascii=False)
        write_json_atomic(tmp / "metadata.json", _finite({**(metadata or {}), **{k: classifier.config[k] for k in ("version", "role", "modality", "arch")}}),
                          ensure_ascii=False)
    return folder


# ---------------------------------------------------------------------------------------------
# Data: label space, role-salted split, images and targets


def _dataset_of(row: ManifestRow) -> str:
    return row.source.split(":", 1)[0] if row.source else "manifest"


def is_phantom_row(row: ManifestRow) -> bool:
    return _dataset_of(row) == "phantom"


def label_space(modality: str, rows: Sequence[ManifestRow], mode: str = "auto") -> list[str]:
    """The labels a classifier of ``modality`` predicts.

    ``phantom``: the phantom catalogue's findings (every finding the phantoms can draw, in their
    order); ``manifest``: the finding names stated present in the rows, sorted; ``auto``: phantom
    when every row of the modality is a phantom."""
    own = [r for r in rows if r.modality == modality]
    phantom = modality in PHANTOM_MODULES and bool(own) and all(is_phantom_row(r) for r in own)
    if mode == "phantom" or (mode == "auto" and phantom):
        if modality not in PHANTOM_MODULES:
            raise UserError(f"labels=phantom but there is no phantom catalogue for modality {modality!r}; use labels=manifest")
        return list(get_spec(modality).findings)
    names = sorted({f["name"] for r in own for f in r.findings if f.get("present", True) and f["name"] != NORMAL})
    if not names:
        raise UserError(
            f"no finding is stated present in the {len(own)} {modality} rows, so there is nothing to learn; "
            "give rows with a findings column (or phantoms)"
        )
    return names


def split_key(row: ManifestRow) -> str:
    """The part of a path that names an image on every machine (its last four components)."""
    return "/".join(Path(row.path).as_posix().split("/")[-4:])


def split_of_row(row: ManifestRow, role: str, seed: int, val_fraction: float) -> str:
    """``train``, ``calibration`` or ``test``, from a hash of the path salted with role and seed:
    the reward and the evaluator of a modality hold back different images."""
    digest = hashlib.sha256(f"{role}/{seed}/{split_key(row)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < val_fraction / 2:
        return "calibration"
    return "test" if u < val_fraction else "train"


def split_rows(rows: Sequence[ManifestRow], role: str, seed: int, val_fraction: float) -> dict[str, list[ManifestRow]]:
    out: dict[str, list[ManifestRow]] = {s: [] for s in SPLITS}
    for row in rows:
        out[split_of_row(row, role, seed, val_fraction)].append(row)
    return out


class LabelledImages:
    """Images of one split as uint8 ``(N, 3, S, S)``, with targets and a known-label mask ``(N, L)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, keys: list[str]):
        self.images, self.targets, self.known, self.keys = images, targets, known, keys

    def __len__(self) -> int:
        return len(self.keys)

    def as_float(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.images[index].float().div(127.5).sub(1.0)


def annotated_labels(rows: Sequence[ManifestRow]) -> dict[str, set[str]]:
    """dataset -> the finding names it ever states (present or absent).

    A label counts as known (0 when not present) only for rows of a dataset that annotates it:
    a paediatric pneumonia set says nothing about effusions, so its rows do not teach "no effusion"."""
    stated: dict[str, set[str]] = {}
    for row in rows:
        stated.setdefault(_dataset_of(row), set()).update(f["name"] for f in row.findings)
    return stated


def encode_rows(
    rows: Sequence[ManifestRow],
    label_names: Sequence[str],
    image_size: int,
    annotated: Mapping[str, set[str]],
    modalities: Mapping[str, ModalityConfig] | None = None,
    closed_world: bool = False,
) -> LabelledImages:
    """Load, convert and resize every image; targets from the rows' present findings.

    ``closed_world``: every label is known for every row (phantoms: the truth is complete)."""
    modalities = modalities or default_modalities()
    index = {name: j for j, name in enumerate(label_names)}
    images = torch.empty((len(rows), 3, image_size, image_size), dtype=torch.uint8)
    targets = torch.zeros((len(rows), len(label_names)))
    known = torch.zeros((len(rows), len(label_names)), dtype=torch.bool)
    for i, row in enumerate(rows):
        image = load_row(row, modalities)["image"]
        spec = modalities.get(row.modality)
        image = to_channels(image, spec.channels if spec else (3 if image.ndim == 3 else 1))
        image = resize_pad(image, image_size)
        array = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else image.transpose(2, 0, 1)
        images[i] = torch.from_numpy(np.ascontiguousarray(array))
        dataset_labels = annotated.get(_dataset_of(row), set())
        for j, name in enumerate(label_names):
            known[i, j] = closed_world or name in dataset_labels
        for f in row.findings:
            j = index.get(f["name"])
            if j is not None:
                known[i, j] = True
                targets[i, j] = 1.0 if f.get("present", True) else 0.0
    return LabelledImages(images, targets, known, [split_key(r) for r in rows])


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small rotation (5 degrees), zoom (5 %), shift (4 % of the side), brightness and contrast jitter (5 %).

    Never a flip: a flip would swap laterality. Pixels moved in from outside are black (-1)."""
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2 - 1) * scale

    angle, zoom = uniform(math.radians(5.0)), 1.0 + uniform(0.05)
    shift = torch.stack([uniform(0.08), uniform(0.08)], dim=1)  # 4 % of the side in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    contrast = (1.0 + uniform(0.05)).to(x).view(b, 1, 1, 1)
    brightness = uniform(0.1).to(x).view(b, 1, 1, 1)  # 5 % of the [0, 1] range
    return (x * contrast + brightness).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Metrics and calibration


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, known: np.ndarray | None = None, bins: int = ECE_BINS) -> float:
    """ECE over every known (image, label) pair: the count-weighted mean |accuracy - confidence|
    over ``bins`` equal-width bins of predicted probability (a multi-label model's probabilities
    are each a binary forecast, so they are pooled)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    mask = np.ones_like(probs, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    p, y = probs[mask], labels[mask]
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - p[sel].mean())
    return float(total / p.size)


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy over known labels, of ``logits / temperature``."""
    if not known.any():
        return float("nan")
    loss = F.binary_cross_entropy_with_logits(logits / temperature, targets, reduction="none")
    return float(loss[known].mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> float:
    """One temperature for the whole model, minimising the NLL on the calibration split.

    One per model, not one per label: the calibration split holds a few dozen positives per label
    at most, and a per-label fit on that would mostly fit noise. A log-spaced grid over
    [0.05, 20] that contains exactly 1 means the fit can never raise the calibration NLL above the
    uncalibrated one."""
    if not known.any():
        return 1.0
    z, y = logits[known].double(), targets[known].double()
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(20.0), 241, dtype=torch.float64))  # index 120 is exactly 1
    losses = torch.stack([F.binary_cross_entropy_with_logits(z / t, y) for t in grid])
    return float(grid[int(torch.argmin(losses))])


def classification_metrics(logits: torch.Tensor, data: LabelledImages, label_names: Sequence[str], temperature: float) -> dict[str, Any]:
    """AUROC per label and macro, ECE and NLL before and after temperature scaling."""
    targets, known = data.targets.numpy(), data.known.numpy()
    before = torch.sigmoid(logits).numpy()
    after = torch.sigmoid(logits / temperature).numpy()
    per_label = {name: auroc(after[known[:, j], j], targets[known[:, j], j]) for j, name in enumerate(label_names)}
    defined = [v for v in per_label.values() if math.isfinite(v)]
    return {
        "images": len(data),
        "auroc_macro": float(np.mean(defined)) if defined else float("nan"),
        "auroc": per_label,
        "positives": {name: int(targets[known[:, j], j].sum()) for j, name in enumerate(label_names)},
        "ece_before": expected_calibration_error(before, targets, known),
        "ece_after": expected_calibration_error(after, targets, known),
        "nll_before": masked_nll(logits, data.targets, data.known),
        "nll_after": masked_nll(logits, data.targets, data.known, temperature),
    }


# ---------------------------------------------------------------------------------------------
# Training


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def _logits_of(network: nn.Module, data: LabelledImages, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    network.eval()
    out = [network(data.as_float(slice(i, i + batch_size)).to(device)).float().cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, network.head.out_features))


def _default_command(cfg: ClassifierConfig, role: str, modality: str, out: Path | None) -> str:
    return train_command(role, modality, out or cfg.out, cfg.data or ["<manifest>"])


def fit_classifier(
    cfg: ClassifierConfig,
    role: str,
    modality: str,
    rows: Sequence[ManifestRow],
    progress: bool = True,
    command: str | None = None,
    benchmark_rows: Sequence[ManifestRow] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
    data_description: Any = None,
    out: str | os.PathLike | None = None,
) -> tuple[FindingClassifier, dict[str, Any]]:
    """Train, calibrate and evaluate the ``role`` classifier of ``modality`` on ``rows`` (others ignored).

    ``benchmark_rows`` (e.g. fresh phantoms from :func:`phantom_benchmark_rows`) are an extra test
    set that no split has seen. Returns the classifier and its metadata (metrics, split sizes,
    seconds, ...); ``out`` only goes into the recorded command. Saves nothing: see :func:`train_classifier`."""
    settings = role_settings(cfg, role)
    if settings["arch"] == (cfg.evaluator_arch if role == "reward" else cfg.reward_arch):
        log.warning("reward and evaluator classifiers share the architecture %r: they are less independent", settings["arch"])
    start, start_cpu = time.perf_counter(), time.process_time()
    own = [r for r in rows if r.modality == modality]
    if not own:
        present = sorted({r.modality for r in rows})
        raise UserError(f"no {modality} rows to train on; the rows hold: {', '.join(present) or 'nothing'}")
    label_names = label_space(modality, own, cfg.labels)
    closed_world = all(is_phantom_row(r) for r in own)
    splits = split_rows(own, role, settings["seed"], cfg.val_fraction)
    sizes = {k: len(v) for k, v in splits.items()}
    if min(sizes.values()) == 0:
        raise UserError(
            f"{modality}: {len(own)} rows split into {sizes} (val_fraction {cfg.val_fraction}); every split needs "
            "images: give more rows or a larger val_fraction"
        )
    annotated = annotated_labels(own)
    data = {k: encode_rows(v, label_names, cfg.image_size, annotated, modalities, closed_world) for k, v in splits.items()}

    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, cfg.num_threads))
    try:
        torch.manual_seed(settings["seed"])
        network = build_network(settings["arch"], len(label_names), settings["widths"], settings["blocks"], settings["patch"],
                                settings["pool"]).to(device)
        optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train = data["train"]
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        warmup = max(1, min(50, total // 20))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
        generator = torch.Generator().manual_seed(settings["seed"])
        bar = tqdm(total=total, desc=f"classifier {role}/{modality}", unit=" step", disable=not progress, leave=False)
        losses: list[float] = []
        for _ in range(cfg.epochs):
            network.train()
            order = torch.randperm(len(train), generator=generator)
            for i in range(0, len(train), cfg.batch_size):
                index = order[i : i + cfg.batch_size]
                x = train.as_float(index)
                if cfg.augment:
                    x = augment_batch(x, generator)
                logits = network(x.to(device))
                known = train.known[index].to(device)
                loss_all = F.binary_cross_entropy_with_logits(logits, train.targets[index].to(device), reduction="none")
                loss = (loss_all * known).sum() / known.sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.3f}")
        bar.close()

        cal_logits = _logits_of(network, data["calibration"], device)
        temperature = fit_temperature(cal_logits, data["calibration"].targets, data["calibration"].known)
        test_logits = _logits_of(network, data["test"], device)
        metrics: dict[str, Any] = {
            "test": classification_metrics(test_logits, data["test"], label_names, temperature),
            "calibration": {
                "images": sizes["calibration"],
                "nll_before": masked_nll(cal_logits, data["calibration"].targets, data["calibration"].known),
                "nll_after": masked_nll(cal_logits, data["calibration"].targets, data["calibration"].known, temperature),
            },
            "train_loss_last_epoch": float(np.mean(losses[-steps_per_epoch:])),
        }
        if benchmark_rows:
            bench_own = [r for r in benchmark_rows if r.modality == modality]
            bench = encode_rows(bench_own, label_names, cfg.image_size, annotated_labels(bench_own), modalities, closed_world=True)
            metrics["benchmark"] = classification_metrics(_logits_of(network, bench, device), bench, label_names, temperature)
    finally:
        torch.set_num_threads(threads)

    classifier = FindingClassifier(
        network.cpu(), label_names, cfg.image_size, temperature, role, modality, settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    metadata = {
        "kind": "synthmed finding classifier",
        "version": VERSION,
        "role": role,
        "modality": modality,
        "arch": settings["arch"],
        "widths": settings["widths"],
        "blocks": settings["blocks"],
        "patch": settings["patch"],
        "pool": settings["pool"],
        "parameters": sum(p.numel() for p in network.parameters()),
        "seed": settings["seed"],
        "label_names": label_names,
        "label_space": "phantom" if closed_world and cfg.labels != "manifest" else cfg.labels,
        "data": data_description if data_description is not None else (list(cfg.data) or "rows given in-process"),
        "datasets": sorted(annotated),
        "split": {"sizes": sizes, "val_fraction": cfg.val_fraction, "salt": f"{role}/{settings['seed']}", "key": "last four path components"},
        "epochs": cfg.epochs,
        "steps": total,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "augment": cfg.augment,
        "image_size": cfg.image_size,
        "temperature": temperature,
        "temperature_scope": "one per model",
        "metrics": metrics,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: the compute, whatever else shares the machine
        "device": str(device),
        "threads": min(threads, cfg.num_threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or _default_command(cfg, role, modality, Path(out) if out is not None else None),
        "config": cfg.model_dump(),
    }
    log.info("classifier %s/%s: test AUROC %.3f, ECE %.3f -> %.3f, T=%.2f, %.0f s", role, modality,
             metrics["test"]["auroc_macro"], metrics["test"]["ece_before"], metrics["test"]["ece_after"], temperature, seconds)
    return classifier, metadata


def train_classifier(
    cfg: ClassifierConfig,
    role: str,
    modality: str,
    rows: Sequence[ManifestRow],
    out: str | os.PathLike | None = None,
    progress: bool = True,
    command: str | None = None,
    benchmark_rows: Sequence[ManifestRow] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
    data_description: Any = None,
) -> dict[str, Any]:
    """:func:`fit_classifier`, then save to ``<out>/<role>/<modality>/`` (``out`` defaults to cfg.out).

    Returns the metadata written beside the weights, with ``folder`` added."""
    out = Path(out if out is not None else cfg.out)
    classifier, metadata = fit_classifier(cfg, role, modality, rows, progress, command, benchmark_rows, modalities, data_description, out)
    folder = save_classifier(classifier, out / role / modality, metadata)
    return {**metadata, "folder": str(folder)}


def phantom_benchmark_rows(modality: str, per_finding: int, size: int, seed: int) -> list[ManifestRow]:
    """Fresh in-memory phantoms, ``per_finding`` per finding and for the normal study, at another seed."""
    spec = get_spec(modality)
    rows = []
    for finding in [NORMAL, *spec.findings]:
        for i in range(per_finding):
            study = make_phantom(modality, [finding], size=max(32, size), seed=study_seed(seed, modality, finding, i))
            rows.append(ManifestRow(
                f"phantom-benchmark/{seed}/{modality}/{finding}_{i:04d}", study.text, modality,
                [f.to_dict() for f in study.findings], f"phantom:{modality}", image=study.image,
            ))
    return rows


def load_rows(sources: Iterable[str | os.PathLike], modalities: Mapping[str, ModalityConfig] | None = None) -> list[ManifestRow]:
    """Every row of the given sources (manifest CSV or folder, ../shared/meddata folder, ...)."""
    modalities = modalities or default_modalities()
    return [row for source in sources for row in source_rows(source, modalities)]


def train_all(
    cfg: ClassifierConfig,
    rows: Sequence[ManifestRow],
    out: str | os.PathLike | None = None,
    roles: Sequence[str] = ROLES,
    modalities: Sequence[str] | None = None,
    progress: bool = True,
    command: str | None = None,
    data_description: Any = None,
) -> list[dict[str, Any]]:
    """Train every (role, modality) classifier into ``<out>/<role>/<modality>/`` (``out`` defaults to cfg.out).

    ``modalities`` defaults to those in the rows. With phantom labels, a fresh phantom benchmark of
    ``cfg.benchmark_per_finding`` studies per finding is drawn once per modality and scored by both roles."""
    rows = list(rows)
    out = Path(out if out is not None else cfg.out)
    modalities = list(modalities) if modalities is not None else list(dict.fromkeys(r.modality for r in rows))
    summaries = []
    for modality in modalities:
        own = [r for r in rows if r.modality == modality]
        bench = None
        if cfg.benchmark_per_finding and own and modality in PHANTOM_MODULES and all(is_phantom_row(r) for r in own) and cfg.labels != "manifest":
            bench = phantom_benchmark_rows(modality, cfg.benchmark_per_finding, cfg.image_size, cfg.benchmark_seed)
        for role in roles:
            summaries.append(train_classifier(cfg, role, modality, own, out, progress, command, bench, data_description=data_description))
    return summaries


def format_summary(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: one line per classifier with AUROC, ECE before/after, wall-clock and CPU seconds."""
    def num(value: Any) -> float:  # metadata read back from JSON has None for NaN
        return float("nan") if value is None else float(value)

    lines = [f"{'modality':<10} {'role':<9} {'arch':<7} {'AUROC':>6} {'bench':>6} {'ECE':>6} {'ECE(T)':>6} {'T':>5} {'s':>6} {'cpu s':>6}"]
    for s in summaries:
        test, bench = s["metrics"]["test"], s["metrics"].get("benchmark", {})
        lines.append(
            f"{s['modality']:<10} {s['role']:<9} {s['arch']:<7} {num(test['auroc_macro']):>6.3f} {num(bench.get('auroc_macro')):>6.3f} "
            f"{num(test['ece_before']):>6.3f} {num(test['ece_after']):>6.3f} {num(s['temperature']):>5.2f} {num(s['seconds']):>6.0f} "
            f"{num(s.get('cpu_seconds')):>6.0f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The scorer


class FindingScorer:
    """Agreement between the findings a prompt asks for and what the ``role`` classifiers see.

    For image ``i`` with stated findings ``S_i`` (``expected[i]``, or read from the prompt by
    :func:`rlhf.text_labels.expected_findings`) and calibrated probabilities ``p``::

        agreement_i = mean over f in S_i of ( p_f if f is stated present else 1 - p_f )

    Findings the prompt does not state, and stated findings the classifier does not know, do not
    count. An image with none counts ``NEUTRAL_AGREEMENT`` (0.5) and ``n_expected`` 0, so it
    neither rewards nor punishes. Details: ``agreement``, ``n_expected`` and ``prob/<finding>``
    for every label of every loaded modality (NaN where the finding is not the image's modality's).
    """

    def __init__(self, classifiers: Mapping[str, FindingClassifier], role: str, name: str | None = None):
        if role not in ROLES:
            raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
        if not classifiers:
            raise UserError("a finding scorer needs at least one classifier")
        for modality, classifier in classifiers.items():
            if classifier.role != role:
                raise UserError(
                    f"the {modality} classifier has role {classifier.role!r}, but this scorer is the {role!r} scorer; "
                    "the reward must never be built from evaluator weights"
                )
            if classifier.modality != modality:
                raise ValueError(f"classifier of modality {classifier.modality!r} given for modality {modality!r}")
        self.classifiers = dict(classifiers)
        self.role = role
        self.name = name or f"finding_{role}"
        self.label_names = list(dict.fromkeys(n for c in self.classifiers.values() for n in c.label_names))

    def expected_for(self, prompt: str, modality: str) -> dict[str, bool]:
        """What the prompt states about each of the modality's labels (see rlhf/text_labels.py)."""
        return expected_findings(prompt, modality, self.classifiers[modality].label_names)

    def score(
        self,
        images: Any,
        prompts: Sequence[str],
        modalities: Sequence[str],
        expected: Sequence[Mapping[str, bool]] | None = None,
    ) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        n = batch.shape[0]
        if expected is not None and len(expected) != n:
            raise ValueError(f"{n} images but {len(expected)} expected-finding dicts; give one per image (or None to read the prompts)")
        scores = np.full(n, NEUTRAL_AGREEMENT, dtype=np.float64)
        n_expected = np.zeros(n, dtype=np.float64)
        probs = {name: np.full(n, np.nan, dtype=np.float64) for name in self.label_names}
        for modality in dict.fromkeys(modalities):
            if modality not in self.classifiers:
                known = ", ".join(self.classifiers)
                raise UserError(f"no {self.role} finding classifier for modality {modality!r}; loaded: {known}")
            classifier = self.classifiers[modality]
            index = np.array([i for i, m in enumerate(modalities) if m == modality])
            p = classifier.predict_proba(batch[torch.from_numpy(index)]).astype(np.float64)
            column = {name: j for j, name in enumerate(classifier.label_names)}
            for name, j in column.items():
                probs[name][index] = p[:, j]
            for row, i in enumerate(index):
                stated = expected[i] if expected is not None else self.expected_for(prompts[i], modality)
                terms = [p[row, column[f]] if bool(present) else 1.0 - p[row, column[f]] for f, present in stated.items() if f in column]
                if terms:
                    scores[i] = float(np.mean(terms))
                    n_expected[i] = len(terms)
        details = {"agreement": scores.copy(), "n_expected": n_expected, **{f"prob/{k}": v for k, v in probs.items()}}
        return scores, details


def load_finding_scorer(
    role: str, root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu"
) -> FindingScorer:
    """The ``role`` scorer over the classifiers in ``<root>/<role>/`` (every modality there, or ``modalities``)."""
    if role not in ROLES:
        raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
    from generator.paths import shipped

    folder = shipped(root) if root is not None else DEFAULT_ROOT
    if modalities is None:
        modalities = sorted(p.name for p in (folder / role).glob("*") if (p / "config.json").is_file())
        if not modalities:
            raise ClassifierNotFoundError(
                f"no {role} finding classifiers in {folder / role}; train them with: " + train_command(role, "all", folder)
            )
    classifiers = {m: load_classifier(folder / role / m, role=role, device=device) for m in modalities}
    return FindingScorer(classifiers, role)


@register_scorer("finding_reward")
def finding_reward_scorer(root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu") -> FindingScorer:
    """The reward's finding scorer, from the shipped ``reward`` classifiers by default."""
    return load_finding_scorer("reward", root, modalities, device)


@register_scorer("finding_evaluator")
def finding_evaluator_scorer(root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu") -> FindingScorer:
    """The held-out evaluator's finding scorer; never part of a reward."""
    return load_finding_scorer("evaluator", root, modalities, device)


# ---------------------------------------------------------------------------------------------
# Command line: a bare entry point on given manifests; the shipped classifiers are trained (and
# their metadata.json records) `synthmed judges train classifier` (pipelines/commands/judges.py)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.classifiers", description="Train the finding classifiers.")
    parser.add_argument("--data", nargs="+", required=True, help="manifest CSVs or data folders (e.g. data/phantoms_64px)")
    parser.add_argument("--out", default=ClassifierConfig().out, help="output root: <out>/<role>/<modality>/")
    parser.add_argument("--role", default="all", choices=["all", *ROLES])
    parser.add_argument("--modality", default="all", help="a modality id, or all")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = ClassifierConfig(data=[str(d) for d in args.data], **({"epochs": args.epochs} if args.epochs else {}))
    rows = load_rows(cfg.data)
    roles = ROLES if args.role == "all" else (args.role,)
    modalities = None if args.modality == "all" else [args.modality]
    command = "python -m rlhf.classifiers " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    summaries = train_all(cfg, rows, args.out, roles, modalities, progress=not args.no_progress, command=command, data_description=cfg.data)
    print(format_summary(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ARCHITECTURES", "ClassifierNotFoundError", "ConvNet", "DEFAULT_ROOT", "FindingClassifier", "FindingScorer", "ROLES",
    "ResNet", "auroc", "build_network", "classification_metrics", "expected_calibration_error", "finding_evaluator_scorer",
    "finding_reward_scorer", "fit_classifier", "fit_temperature", "format_summary", "label_space", "load_classifier", "load_finding_scorer",
    "load_rows", "phantom_benchmark_rows", "role_settings", "save_classifier", "split_of_row", "split_rows", "train_all",
    "train_classifier", "train_command",
]
