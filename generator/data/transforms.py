"""Image transforms: small functions on arrays, and one keyed record transform built from config.

Order for a record: channels for its modality -> optional CLAHE -> aspect-preserving resize with
padding -> (training) light augmentation -> float tensor (C, H, W) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from ..config import AugmentConfig, DataConfig, ModalityConfig
from ..modalities import UnknownModalityError, describe_modalities
from .records import Record


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grey (H, W) or RGB (H, W, 3) as the modality asks; RGB -> grey uses ITU-R 601 luma."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if channels == 1:
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3:
        return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation; on colour images, of the lightness only."""
    op = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    if image.ndim == 2:
        return op.apply(image)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = op.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def resize_pad(image: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Fit the longer side to ``size`` pixels, keep the aspect ratio, centre on a ``fill`` square."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    out = np.full((size, size, *image.shape[2:]), fill, dtype=image.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = image
    return out


def augment(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Small rotation, zoom and shift, then brightness and contrast jitter. Never a flip: a flip
    would silently turn a left-sided finding into a right-sided one."""
    h, w = image.shape[:2]
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
    zoom = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    matrix[:, 2] += rng.uniform(-cfg.translate, cfg.translate, size=2) * (w, h)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    values = image.astype(np.float32) / 255.0
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    values = (values - 0.5) * contrast + 0.5 + brightness
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    array = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)).float().div(127.5).sub(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """float (C, H, W) in [-1, 1] -> uint8 (H, W) or (H, W, C): the inverse of :func:`to_tensor`."""
    array = tensor.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


class RecordTransform:
    """The keyed transform for records: reads ``record["modality"]``, rewrites ``record["image"]``."""

    def __init__(
        self,
        data: DataConfig,
        train: bool = False,
        seed: int = 0,
        modalities: Mapping[str, ModalityConfig] | None = None,
        as_tensor: bool = True,
    ):
        self.data = data
        self.modalities = dict(modalities if modalities is not None else data.modalities)
        self.train = train and data.augment.enabled
        self.as_tensor = as_tensor
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Give each DataLoader worker its own augmentation stream."""
        self.rng = np.random.default_rng(seed)

    def image(self, image: np.ndarray, modality: str) -> np.ndarray:
        spec = self.modalities.get(modality)
        if spec is None:
            raise UnknownModalityError(
                f"unknown modality {modality!r}; known modalities: {describe_modalities(self.modalities)}"
            )
        image = to_channels(image, spec.channels)
        if spec.clahe:
            image = clahe(image, self.data.clahe_clip_limit, self.data.clahe_tiles)
        image = resize_pad(image, self.data.image_size)
        if self.train:
            image = augment(image, self.data.augment, self.rng)
        return image

    def __call__(self, record: Record) -> Record:
        image = self.image(record["image"], record["modality"])
        return {**record, "image": to_tensor(image) if self.as_tensor else image}
