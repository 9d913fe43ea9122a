"""Seeded image degradations: the "bad" half of the selector's bootstrap (no people needed).

Each degradation is an artefact a reader would mark down: blur (motion, defocus), noise (low dose),
contrast collapse (wrong window), JPEG blocking (lossy export), clipping (saturated detector),
occlusion (a foreign body or missing data) and Gibbs ringing (truncated k-space in MRI). Every
kind has three severities: 1 mild, 2 moderate, 3 severe.

Images are ``(B, 3, H, W)`` float tensors in ``[-1, 1]`` (grey images as three equal channels,
which stay equal: noise on a grey image is grey). Strengths are set for 64 pixels and scale with
the image side, so a degradation looks the same at 256 pixels. The same ``seed`` gives the same
output; kinds that draw nothing at random (blur, contrast, blocking, ringing) ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from generator.errors import UserError

DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "contrast", "blocking", "clipping", "occlusion", "ringing")
SEVERITIES: tuple[int, ...] = (1, 2, 3)

# Per severity 1, 2, 3.
BLUR_SIGMA = (0.8, 1.4, 2.2)  # pixels at 64 px
NOISE_STD = (0.08, 0.16, 0.30)  # in [-1, 1] units (a range of 2)
CONTRAST_FACTOR = (0.45, 0.25, 0.12)  # remaining share of the deviation from the image mean
JPEG_QUALITY = (20, 10, 4)  # OpenCV JPEG quality (100 best)
CLIP_GAIN = (1.8, 2.6, 3.6)  # contrast gain before clipping to [-1, 1]
OCCLUDED_AREA = (0.08, 0.16, 0.28)  # share of the image hidden by one rectangle
RINGING_KEEP = (0.55, 0.40, 0.28)  # share of the frequency band kept (sharp cut-off: Gibbs ringing)


def _check(images: torch.Tensor, kind: str, severity: int) -> None:
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES} (1 mild, 2 moderate, 3 severe), got {severity!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")


def _is_grey(images: torch.Tensor) -> torch.Tensor:
    """(B,) True where all three channels are equal."""
    return (images[:, :1] == images).flatten(1).all(dim=1)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    colour = torch.randn((b, 3, h, w), generator=generator, dtype=images.dtype)
    grey = _is_grey(images).view(b, 1, 1, 1)
    field = torch.where(grey, colour[:, :1].expand(-1, 3, -1, -1), colour)  # grey stays grey
    return (images + std * field).clamp(-1, 1)


def _contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (images - mean) * factor


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image, grey in zip(images, _is_grey(images).tolist()):
        pixels = image.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
        pixels = np.ascontiguousarray(pixels[..., 0] if grey else pixels)
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG-encode an image")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_UNCHANGED)
        decoded = np.repeat(decoded[..., None], 3, axis=2) if grey else decoded
        out.append(torch.from_numpy(decoded).permute(2, 0, 1).float().div(127.5).sub(1.0))
    return torch.stack(out).to(images.dtype)


def _clipping(images: torch.Tensor, gain: float, generator: torch.Generator) -> torch.Tensor:
    # the pivot moves up or down at random: burnt-out highlights or crushed shadows
    b = images.shape[0]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    pivot = mean + 0.25 * (torch.rand((b, 1, 1, 1), generator=generator, dtype=images.dtype) * 2 - 1)
    return ((images - pivot) * gain + pivot).clamp(-1, 1)


def _occlusion(images: torch.Tensor, area: float, generator: torch.Generator) -> torch.Tensor:
    out = images.clone()
    b, _, h, w = images.shape
    for i in range(b):
        aspect = float(torch.empty(1).uniform_(0.5, 2.0, generator=generator))
        rh = max(1, min(h, int(round((area * h * w * aspect) ** 0.5))))
        rw = max(1, min(w, int(round(area * h * w / rh))))
        top = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
        fill = -1.0 if float(torch.rand(1, generator=generator)) < 0.5 else 1.0  # black (missing data) or white (metal)
        out[i, :, top : top + rh, left : left + rw] = fill
    return out


def _ringing(images: torch.Tensor, keep: float) -> torch.Tensor:
    # a sharp low-pass in k-space: the truncation rings around every edge, as in MRI
    _, _, h, w = images.shape
    fy = torch.fft.fftfreq(h).abs().view(-1, 1) / 0.5
    fx = torch.fft.fftfreq(w).abs().view(1, -1) / 0.5
    mask = ((fy <= keep) & (fx <= keep)).to(images.dtype)
    spectrum = torch.fft.fft2(images.float())
    return torch.fft.ifft2(spectrum * mask).real.clamp(-1, 1).to(images.dtype)


def degrade(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` with one artefact at one severity; the input is not modified."""
    _check(images, kind, severity)
    images = images.detach().float().cpu()
    level = severity - 1
    scale = images.shape[-1] / 64.0  # strengths are set for 64 px
    generator = torch.Generator().manual_seed(int(seed))
    if kind == "blur":
        return _gaussian_blur(images, BLUR_SIGMA[level] * scale)
    if kind == "noise":
        return _noise(images, NOISE_STD[level], generator)
    if kind == "contrast":
        return _contrast(images, CONTRAST_FACTOR[level])
    if kind == "blocking":
        return _jpeg(images, JPEG_QUALITY[level])
    if kind == "clipping":
        return _clipping(images, CLIP_GAIN[level], generator)
    if kind == "occlusion":
        return _occlusion(images, OCCLUDED_AREA[level], generator)
    return _ringing(images, RINGING_KEEP[level])


def degrade_each(images: torch.Tensor, kinds: Sequence[str], severities: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Image ``i`` degraded by ``kinds[i]`` at ``severities[i]``. Images sharing a (kind, severity)
    are degraded together, with a seed drawn from ``seed`` and that pair."""
    if len(kinds) != len(images) or len(severities) != len(images):
        raise ValueError(f"{len(images)} images but {len(kinds)} kinds and {len(severities)} severities; give one of each per image")
    out = torch.empty_like(images.detach().float().cpu())
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (kind, severity) in enumerate(zip(kinds, severities)):
        _check(images[:1], kind, int(severity))
        groups.setdefault((kind, int(severity)), []).append(i)
    for (kind, severity), idx in groups.items():
        group_seed = int(np.random.SeedSequence([seed, DEGRADATIONS.index(kind), severity]).generate_state(1)[0])
        out[idx] = degrade(images[idx], kind, severity, seed=group_seed)
    return out


def draw_degradations(n: int, copies: int, kinds: Sequence[str], severities: Sequence[int], seed: int) -> list[tuple[int, str, int]]:
    """``copies`` (image index, kind, severity) per image: kinds in turn from a seeded offset, severity drawn."""
    for kind in kinds:
        if kind not in DEGRADATIONS:
            raise UserError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    if not kinds or not severities:
        raise UserError("give at least one degradation kind and one severity")
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(n):
        offset = int(rng.integers(len(kinds)))
        for c in range(copies):
            plan.append((i, kinds[(offset + c) % len(kinds)], int(rng.choice(list(severities)))))
    return plan


__all__ = ["DEGRADATIONS", "SEVERITIES", "degrade", "degrade_each", "draw_degradations"]
