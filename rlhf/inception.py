"""FID and KID in Inception-v3 feature space, when Inception weights are on this machine.

Nothing is downloaded. The weights are a torchvision ``inception_v3`` state dict, found at
``judges.eval.inception_weights`` or, failing that, in torch hub's cache if torchvision's file
(``inception_v3_google-0cc3c7bd.pth``) is already there. Without them every function here returns
an :class:`InceptionStatus` saying why, so the eval table shows "n/a" with the reason.

Features are the 2048-d pool3 activations (after global average pooling) of torchvision's
architecture: images resized to 299 x 299 (bilinear), grey as three channels, ImageNet
normalisation (the model is built with ``transform_input=True``, as torchvision does for these
weights). torchvision's port of the Google weights differs slightly from the TF-Inception graph of
the original FID code, so values are comparable across synthmed runs, not with published FIDs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from generator.devices import resolve_device

from .config import EvalConfig
from .metrics import frechet_distance, kid
from .scorers import as_image_batch

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299  # pixels, the input size the network was trained at
FEATURE_DIM = 2048  # pool3 width
HUB_FILENAME = "inception_v3_google-0cc3c7bd.pth"  # torchvision's Inception_V3_Weights.IMAGENET1K_V1 file, in <hub>/checkpoints
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

NO_WEIGHTS = "no local Inception weights; set judges.eval.inception_weights to a torchvision inception_v3 state dict"


@dataclass(frozen=True)
class InceptionStatus:
    """Whether Inception metrics can be computed here, and why not."""

    available: bool
    reason: str = ""
    weights_path: str | None = None

    def __str__(self) -> str:
        return f"available ({self.weights_path})" if self.available else f"unavailable: {self.reason}"


def find_inception_weights(configured: str | None = None, hub_dir: str | Path | None = None) -> Path | InceptionStatus:
    """The weights file to use: ``configured`` if given (it must exist), else torchvision's file in
    torch hub's cache (``hub_dir``, default :func:`torch.hub.get_dir`), else an unavailable status."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        return InceptionStatus(False, f"judges.eval.inception_weights={configured!r} is not a file")
    cached = Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / HUB_FILENAME
    if cached.is_file():
        return cached
    return InceptionStatus(False, NO_WEIGHTS)


def _state_dict_from(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class InceptionFeatures:
    """Pool3 features of torchvision's Inception-v3; a :class:`rlhf.metrics.FeatureExtractor`."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", batch_size: int = 32, weights_path: str | None = None):
        self.model = model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.weights_path = weights_path
        self._mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, weights: str | Path, device: str = "cpu", batch_size: int = 32) -> InceptionFeatures | InceptionStatus:
        """Build the architecture and load ``weights``; a status instead of an error when they do not fit."""
        from torchvision.models import inception_v3  # imported here: torchvision.models takes long to import

        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        try:
            state = _state_dict_from(torch.load(weights, map_location="cpu", weights_only=True))
            model.load_state_dict(state, strict=True)
        except Exception as err:  # a wrong or broken file is reported, not raised: the eval goes on without FID
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return InceptionStatus(False, f"{weights} is not a torchvision inception_v3 state dict ({first_line[:200]})")
        model.fc = torch.nn.Identity()  # the output is then the 2048-d pool3 vector
        return cls(model, device=device, batch_size=batch_size, weights_path=str(weights))

    @torch.no_grad()
    def features(self, images: Any) -> np.ndarray:
        """``(B, 2048)`` float64 pool3 features of images in ``[-1, 1]`` (or uint8 arrays)."""
        batch = as_image_batch(images)
        out = []
        for start in range(0, batch.shape[0], self.batch_size):
            x = batch[start : start + self.batch_size].to(self.device)
            x = F.interpolate((x + 1) / 2, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            out.append(self.model((x - self._mean) / self._std).double().cpu())
        return torch.cat(out).numpy()


def load_inception(
    config: EvalConfig | None = None, device: str = "cpu", hub_dir: str | Path | None = None,
) -> InceptionFeatures | InceptionStatus:
    """The Inception feature extractor of ``config`` (``inception_weights`` or the hub cache), or why not."""
    cfg = config or EvalConfig()
    found = find_inception_weights(cfg.inception_weights, hub_dir)
    device = str(resolve_device(device))
    loaded = found if isinstance(found, InceptionStatus) else InceptionFeatures.load(found, device, cfg.inception_batch_size)
    if isinstance(loaded, InceptionStatus):
        log.info("FID/KID (Inception) %s", loaded)
    return loaded


@dataclass
class InceptionScores:
    """FID and KID (Inception); ``None`` values with ``status`` when Inception is unavailable."""

    status: str
    fid: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    n_real: int = 0
    n_generated: int = 0

    @property
    def available(self) -> bool:
        return self.fid is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, value: float | None, digits: int = 3) -> str:
        """A table cell: the number, or ``n/a (<reason>)``."""
        return f"{value:.{digits}f}" if value is not None else f"n/a ({self.status})"


def inception_scores(
    real_images: Any,
    generated_images: Any,
    extractor: InceptionFeatures | InceptionStatus | None = None,
    config: EvalConfig | None = None,
    device: str = "cpu",
) -> InceptionScores:
    """FID and KID between real and generated images in Inception space.

    ``extractor`` is reused across modalities when given (loading Inception takes seconds); by
    default it is loaded from ``config``. Never raises for missing weights: the status says why."""
    cfg = config or EvalConfig()
    if extractor is None:
        extractor = load_inception(cfg, device=device)
    if isinstance(extractor, InceptionStatus):
        return InceptionScores(status=str(extractor))
    real, gen = extractor.features(real_images), extractor.features(generated_images)
    kid_mean, kid_std = kid(real, gen, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    return InceptionScores(
        status=f"available ({extractor.weights_path})", fid=frechet_distance(real, gen), kid_mean=kid_mean, kid_std=kid_std,
        n_real=int(real.shape[0]), n_generated=int(gen.shape[0]),
    )


__all__ = [
    "FEATURE_DIM", "HUB_FILENAME", "INCEPTION_SIZE", "InceptionFeatures", "InceptionScores", "InceptionStatus",
    "NO_WEIGHTS", "find_inception_weights", "inception_scores", "load_inception",
]
