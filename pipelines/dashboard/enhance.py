"""Image enhancement presets for the Enhance page: CLAHE, windowing, unsharp masking, edge enhancement.

Each takes a uint8 image, (H, W) grey or (H, W, 3) RGB, and returns one of the same shape and dtype.
CLAHE is ``generator.data.transforms.clahe`` and windowing ``generator.data.imageio.apply_window``
(the DICOM linear VOI window), so the page shows what the data layer does.
"""

from __future__ import annotations

import cv2
import numpy as np

from generator.data.imageio import apply_window
from generator.data.transforms import clahe

PRESETS = ("clahe", "window", "unsharp", "edges")


def window(image: np.ndarray, centre: float = 128.0, width: float = 128.0) -> np.ndarray:
    """A narrower (or wider) grey-level window around ``centre`` of the 0..255 values; RGB per channel."""
    return apply_window(image.astype(np.float32), centre, width)


def unsharp(image: np.ndarray, amount: float = 1.0, radius: float = 2.0) -> np.ndarray:
    """Unsharp masking: ``image + amount * (image - gaussian_blur(image, radius))``."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=max(radius, 0.1))
    sharp = image.astype(np.float32) + amount * (image.astype(np.float32) - blurred)
    return np.clip(np.round(sharp), 0, 255).astype(np.uint8)


def edges(image: np.ndarray, amount: float = 0.5) -> np.ndarray:
    """Edge enhancement: the image plus ``amount`` times its Sobel gradient magnitude."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(grey.astype(np.float32), cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey.astype(np.float32), cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    if image.ndim == 3:
        magnitude = magnitude[..., None]
    return np.clip(np.round(image.astype(np.float32) + amount * magnitude), 0, 255).astype(np.uint8)


def enhance(image: np.ndarray, preset: str, strength: float = 1.0, centre: float = 128.0, width: float = 128.0) -> np.ndarray:
    """``image`` with one preset applied; ``strength`` is CLAHE's clip limit (x2), unsharp's amount or
    the edges' amount (x0.5); ``centre``/``width`` are the window's."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    if preset == "clahe":
        tiles = max(1, min(8, min(image.shape[:2]) // 8))
        return clahe(np.ascontiguousarray(image), clip_limit=2.0 * strength, tiles=tiles)
    if preset == "window":
        return window(image, centre, width)
    if preset == "unsharp":
        return unsharp(image, amount=strength)
    if preset == "edges":
        return edges(image, amount=0.5 * strength)
    raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "edges", "enhance", "unsharp", "window"]
