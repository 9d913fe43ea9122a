"""SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) with a Gaussian window, valid filtering (no padding),
per channel on images mapped to [0, 1]. One implementation for the VAE's reconstruction score
(:func:`generator.trainers.evaluate_reconstruction`, window 7) and the judges' SSIM and MS-SSIM
(:mod:`rlhf.metrics`, window 11 as in the reference implementation); each caller keeps its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5  # pixels, standard deviation of the Gaussian window
C1, C2 = 0.01**2, 0.03**2  # stabilisers for a data range of 1 (images mapped to [0, 1])


def gaussian_window(size: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size,) float64 weights summing to 1, centred on the middle pixel."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim_parts(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per (image, channel) ``(B, C)`` of images in [0, 1]
    ``(B, C, H, W)``; the separable ``window`` is cast to the images' dtype."""
    c = x.shape[1]
    k = window.numel()
    window = window.to(x)
    wx = window.view(1, 1, 1, k).expand(c, 1, 1, k)
    wy = window.view(1, 1, k, 1).expand(c, 1, k, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + C2) / (var_x + var_y + C2)
    lum = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
    return (lum * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM ``(B,)`` of paired image batches in [-1, 1] ``(B, C, H, W)``, averaged over channels,
    computed in the images' dtype with a ``window``-pixel Gaussian window."""
    value, _ = ssim_parts((a + 1) / 2, (b + 1) / 2, gaussian_window(window, sigma))
    return value.mean(dim=1)


__all__ = ["C1", "C2", "SSIM_SIGMA", "gaussian_window", "ssim", "ssim_parts"]
