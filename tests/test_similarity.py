"""One SSIM for the VAE's reconstruction score (window 7) and the judges' SSIM / MS-SSIM (window 11)."""

import pytest
import torch

from generator.similarity import C1, ssim
from generator.trainers import ssim as reconstruction_ssim
from rlhf.metrics import ssim as judges_ssim


def test_identical_images_score_one_and_flat_images_match_the_formula():
    a = torch.rand(2, 3, 24, 24) * 2 - 1
    assert torch.allclose(ssim(a, a, window=7), torch.ones(2), atol=1e-5)
    # flat images: no variance, so SSIM is the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    x, y = torch.full((1, 1, 16, 16), -0.2, dtype=torch.float64), torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)  # 0.4, 0.8
    expected = (2 * 0.4 * 0.8 + C1) / (0.4**2 + 0.8**2 + C1)
    assert ssim(x, y, window=11).item() == pytest.approx(expected, rel=1e-5)


def test_each_caller_keeps_its_window():
    torch.manual_seed(0)
    a = torch.rand(3, 3, 40, 40) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.equal(reconstruction_ssim(a, b), ssim(a, b, window=7))
    assert torch.allclose(judges_ssim(a, b), ssim(a.double(), b.double(), window=11).float(), atol=1e-6)
    assert not torch.allclose(ssim(a, b, window=7), ssim(a, b, window=11), atol=1e-4)  # the windows differ
