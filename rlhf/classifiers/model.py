"""A trained finding classifier: constants, inference with calibrated probabilities, loading and saving."""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from generator.errors import SynthmedError, UserError
from generator.fileio import atomic_folder, write_json_atomic

from ..config import ClassifierConfig
from ..scorers import as_image_batch
from .layout import ROLES, TRAIN_COMMAND, VERSION
from .networks import DEFAULT_POOL, build_network


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
        thresholds: Sequence[float] | Mapping[str, float] | None = None,
    ):
        self.network = network.to(device).eval()
        self.label_names = list(label_names)
        # each label's operating point: the calibrated probability from which it counts as shown (0.5 where none was fit)
        if isinstance(thresholds, Mapping):
            thresholds = [float(thresholds.get(n, 0.5)) for n in self.label_names]
        self.thresholds = np.full(len(self.label_names), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.shape != (len(self.label_names),) or not np.all((self.thresholds >= 0) & (self.thresholds <= 1)):
            raise UserError(f"{modality} {role} classifier: thresholds must be one probability per label ({len(self.label_names)}), "
                            f"got {list(self.thresholds)}")
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
            "thresholds": {n: float(t) for n, t in zip(self.label_names, self.thresholds)},
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

    def shown(self, probs: np.ndarray) -> np.ndarray:
        """``(B, L)`` booleans: where each label's calibrated probability reaches its operating point."""
        return np.asarray(probs) >= self.thresholds

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
        network, config["label_names"], config["image_size"], config["temperature"], config["role"], config["modality"], config, device,
        thresholds=config.get("thresholds"),  # classifiers saved before operating points: 0.5 for every label
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
