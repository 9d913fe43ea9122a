"""Image metrics: distances between feature sets, MS-SSIM diversity, memorisation, statistics,
quality checks, finding accuracy, AUROC, and the Inception paths (random weights, no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from generator.phantoms import make_phantom, phantom_modalities
from rlhf.config import EvalConfig
from rlhf.inception import (
    FEATURE_DIM, HUB_FILENAME, NO_WEIGHTS, InceptionFeatures, InceptionStatus, find_inception_weights, inception_scores,
    load_inception,
)
from rlhf.metrics import (
    FeatureExtractor, auroc, diversity_summary, feature_distances, finding_accuracy, frechet_distance,
    frechet_distance_from_stats, gaussian_stats, image_stats, kid, memorisation, ms_ssim, ms_ssim_diversity, ms_ssim_plan,
    pixel_memorisation, quality_checks,
)
from rlhf.scorers import as_image_batch



pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (tests/conftest.py)


def phantom_batch(modality: str, seeds, size: int = 64) -> torch.Tensor:
    return as_image_batch([make_phantom(modality, [], size=size, seed=s).image for s in seeds])


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    m = rng.normal(size=(d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    for n, d in ((300, 8), (20, 64)):  # covariance route and sample (nuclear norm) route
        feats = rng.normal(size=(n, d))
        assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
        direction = rng.normal(size=d)
        distances = [frechet_distance(feats, feats + s * direction) for s in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
        assert all(b > a for a, b in zip(distances, distances[1:]))
        # a pure shift leaves the covariance alone: the distance is the squared shift
        assert distances[-1] == pytest.approx(16.0 * float(direction @ direction), rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    rng = np.random.default_rng(1)
    d = 4
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    sigma_a, sigma_b = random_spd(rng, d), random_spd(rng, d)
    # the textbook formula with scipy's general matrix square root
    closed = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * scipy.linalg.sqrtm(sigma_a @ sigma_b).real))
    assert frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(closed, rel=1e-9)
    # commuting (diagonal) covariances: sum of (sqrt(s_a) - sqrt(s_b))^2
    s_a, s_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([4.0, 1.0, 0.25, 0.5])
    diag = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(s_a) - np.sqrt(s_b)) ** 2).sum())
    assert frechet_distance_from_stats(mu_a, np.diag(s_a), mu_b, np.diag(s_b)) == pytest.approx(diag, rel=1e-12)
    # estimated from samples, the distance converges to the closed form
    n = 40_000
    a = rng.multivariate_normal(mu_a, sigma_a, size=n)
    b = rng.multivariate_normal(mu_b, sigma_b, size=n)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)


def test_frechet_distance_routes_agree_and_singular_covariances_are_fine():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 50)), rng.normal(size=(15, 50)) + 0.3  # N < D: rank-deficient covariances
    via_samples = frechet_distance(a, b)
    via_stats = frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
    assert np.isfinite(via_samples) and via_samples == pytest.approx(via_stats, rel=1e-8)


def test_frechet_distance_errors_say_what_is_needed():
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="width"):
        frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 3)))


# ------------------------------------------------------------------ KID


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=200, seed=0)
    shifted_mean, shifted_std = kid(a, b + 0.5, subsets=20, subset_size=200, seed=0)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.1 and shifted_mean > 10 * shifted_std
    assert kid(a, b, subsets=5, subset_size=50, seed=7) == kid(a, b, subsets=5, subset_size=50, seed=7)
    # the subset size is clamped to the smaller set
    assert np.isfinite(kid(a[:10], b, subsets=3, subset_size=1000)[0])


class MeanColourFeatures:
    """A toy FeatureExtractor: mean and std of each channel."""

    def features(self, images) -> np.ndarray:
        x = as_image_batch(images).double()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).numpy()


def test_feature_distances_accepts_any_object_with_features():
    extractor = MeanColourFeatures()
    assert isinstance(extractor, FeatureExtractor)
    real, other = phantom_batch("cxr", range(6)), phantom_batch("fundus", range(6))
    same = feature_distances(extractor, real, real, kid_subsets=3, kid_subset_size=6)
    apart = feature_distances(extractor, real, other, kid_subsets=3, kid_subset_size=6)
    assert same["fd"] == pytest.approx(0.0, abs=1e-9) and apart["fd"] > 0.1 and apart["kid_mean"] > 0
    with pytest.raises(TypeError, match="features"):
        feature_distances(object(), real, real)


# ------------------------------------------------------------------ MS-SSIM and diversity


def test_ms_ssim_of_an_image_with_itself_is_one_and_drops_with_noise():
    images = phantom_batch("brain_mri", range(2))
    assert ms_ssim(images, images) == pytest.approx(torch.ones(2), abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    values = [float(ms_ssim(images, (images + s * noise).clamp(-1, 1)).mean()) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2] >= 0.0


def test_ms_ssim_plan_fits_small_images():
    assert ms_ssim_plan(256, 256)[0] == 5
    scales, window, sigma, weights = ms_ssim_plan(64, 64)
    assert (scales, window, sigma) == (3, 11, 1.5) and sum(weights) == pytest.approx(1.0)
    assert ms_ssim_plan(32, 32)[0] == 2
    assert ms_ssim_plan(8, 8)[:2] == (1, 7)
    tiny = torch.rand(2, 3, 8, 8) * 2 - 1
    assert ms_ssim(tiny, tiny) == pytest.approx(torch.ones(2), abs=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        ms_ssim_plan(64, 64, scales=5)


def test_diversity_is_zero_for_identical_images_and_higher_for_random_ones():
    image = phantom_batch("fundus", [0])
    identical = diversity_summary({"normal fundus": image.repeat(3, 1, 1, 1)})
    assert identical["diversity"] == pytest.approx(0.0, abs=1e-6) and identical["pairs"] == 3
    gen = torch.Generator().manual_seed(1)
    random = {p: torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1 for p in ("a", "b")}
    assert diversity_summary(random)["diversity"] > 0.5
    assert ms_ssim_diversity(random) == pytest.approx(1 - diversity_summary(random)["diversity"])
    with pytest.raises(ValueError, match="at least 2 images"):
        ms_ssim_diversity({"lonely": image})


# ------------------------------------------------------------------ memorisation


@pytest.mark.parametrize("use_faiss", [False, True])
def test_memorisation_flags_an_exact_copy_and_not_a_fresh_sample(use_faiss):
    rng = np.random.default_rng(4)
    train = rng.normal(size=(200, 32))
    gen = np.stack([3.0 * train[17], rng.normal(size=32)])  # a rescaled copy has cosine 1
    result = memorisation(gen, train, threshold=0.95, use_faiss=use_faiss)
    assert result["memorised"].tolist() == [True, False]
    assert result["nearest_index"][0] == 17 and result["max_similarity"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["share_memorised"] == 0.5
    assert result["mean_max_similarity"] == pytest.approx(result["max_similarity"].mean())


def test_pixel_memorisation_flags_a_copied_phantom():
    train = phantom_batch("brain_mri", range(8))
    gen = torch.cat([train[3:4], phantom_batch("brain_mri", [100])])
    result = pixel_memorisation(gen, train)
    assert result["memorised"].tolist() == [True, False]
    assert result["nearest_index"][0] == 3 and result["max_ssim"][0] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ statistics


def test_image_stats_sharpness_entropy_contrast():
    sharp = phantom_batch("cxr", [0])
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False)
    constant = torch.full((1, 3, 64, 64), 0.2)
    ramp = (torch.arange(256.0).view(1, 1, 16, 16) / 127.5 - 1).expand(1, 3, 16, 16)
    stats = image_stats(torch.cat([sharp, blurred, constant]))
    assert set(stats) == {"contrast", "rms_contrast", "sharpness", "entropy", "mean_luminance"}
    assert all(v.shape == (3,) for v in stats.values())
    assert stats["sharpness"][0] > 2 * stats["sharpness"][1]
    assert stats["entropy"][2] == 0.0 and stats["contrast"][2] == 0.0 and stats["sharpness"][2] == 0.0
    assert image_stats(ramp)["entropy"][0] == pytest.approx(8.0)  # 256 equally common grey levels
    with_nan = sharp.clone()
    with_nan[0, :, 0, 0] = float("nan")
    assert np.isnan(image_stats(with_nan)["entropy"][0])


# ------------------------------------------------------------------ quality checks


def test_quality_checks_pass_normal_phantoms():
    modalities = phantom_modalities()
    images = [make_phantom(m, [], size=64, seed=0).image for m in modalities]
    results = [quality_checks(as_image_batch([im]), [m])[0] for im, m in zip(images, modalities)]
    for m, r in zip(modalities, results):
        assert r["ok"], (m, r["reasons"])
        assert r["reasons"] == [] and r["modality"] == m


def test_quality_checks_flag_nan_blank_saturated_and_out_of_field():
    fundus = phantom_batch("fundus", [0])
    nan = fundus.clone()
    nan[0, :, 10:12, 10:12] = float("nan")
    blank = torch.full_like(fundus, -0.4)
    saturated = fundus.clone()
    saturated[0, :, 12:52, 8:56] = 1.0  # 47% white, clear of the corners
    bright_corner = fundus.clone()
    bright_corner[0, :, :8, :8] = 1.0
    checks = quality_checks(torch.cat([fundus, nan, blank, saturated, bright_corner]), ["fundus"] * 5)
    flags = [{k for k in ("nan", "blank", "saturated", "out_of_field") if c[k]} for c in checks]
    assert flags == [set(), {"nan"}, {"blank"}, {"saturated"}, {"out_of_field"}]
    assert [c["ok"] for c in checks] == [True, False, False, False, False]
    assert checks[1]["nonfinite_share"] == pytest.approx(4 / 64**2)
    assert checks[4]["corner_brightness"] == pytest.approx(1.0) and "corner" in checks[4]["reasons"][0]
    # corners are only checked where the modality's field of view leaves them dark
    assert quality_checks(bright_corner, ["cxr"])[0]["ok"]
    assert quality_checks(bright_corner)[0]["ok"]
    # black background is not saturation for fundus, but clipped black is for a chest X-ray
    black_half = phantom_batch("cxr", [0])
    black_half[0, :, :, :40] = -1.0
    assert quality_checks(black_half, ["fundus"])[0]["ok"] and quality_checks(black_half, ["cxr"])[0]["saturated"]
    # thresholds come from the config
    assert quality_checks(fundus, ["fundus"], EvalConfig(quality_blank_std=0.5))[0]["blank"]
    with pytest.raises(ValueError, match="modalities"):
        quality_checks(fundus, ["fundus", "cxr"])


# ------------------------------------------------------------------ findings and AUROC


def test_finding_accuracy_ignores_unstated_findings():
    nan = float("nan")
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.3], [0.6, 0.6, 0.6]])
    expected = np.array([[1, 0, nan], [1, 1, 0], [nan, nan, nan]])
    result = finding_accuracy(probs, expected)
    assert result["n_stated"] == 5
    assert result["accuracy"] == pytest.approx(4 / 5)
    np.testing.assert_allclose(result["per_label"], [0.5, 1.0, 1.0])
    assert result["all_agree"] == pytest.approx(0.5)  # image 3 states nothing and is left out
    np.testing.assert_array_equal(result["image_agrees"], [1.0, 0.0, nan])
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        finding_accuracy(probs, expected[:, :2])


def test_auroc_matches_a_hand_computation_with_ties():
    scores = [0.1, 0.4, 0.4, 0.8]
    labels = [0, 0, 1, 1]
    # positive/negative pairs: (0.4 > 0.1) 1, (0.4 = 0.4) 0.5, (0.8 > 0.1) 1, (0.8 > 0.4) 1  ->  3.5 / 4
    assert auroc(scores, labels) == pytest.approx(0.875)
    assert auroc([0.3, 0.2, 0.1], [1, 1, 0]) == 1.0 and auroc([0.3, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert np.isnan(auroc([0.2, 0.9], [1, 1]))
    assert auroc(scores + [0.0], labels + [float("nan")]) == pytest.approx(0.875)  # unstated labels dropped


# ------------------------------------------------------------------ Inception


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> str:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_v3_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_inception_features_and_scores_with_local_weights(random_inception_weights):
    config = EvalConfig(inception_weights=random_inception_weights, kid_subsets=2, kid_subset_size=2)
    extractor = load_inception(config)
    assert isinstance(extractor, InceptionFeatures) and isinstance(extractor, FeatureExtractor)
    # tiny grey images, upsampled to 299 inside
    tiny = as_image_batch([make_phantom("oct", [], size=32, seed=s).image for s in range(2)])
    feats = extractor.features(tiny[:1])
    assert feats.shape == (1, FEATURE_DIM) and np.isfinite(feats).all()
    scores = inception_scores(tiny, tiny.flip(0), extractor=extractor, config=config)
    assert scores.available and scores.status.startswith("available")
    assert scores.fid == pytest.approx(0.0, abs=1e-6)  # the same two images, in another order
    assert scores.n_real == scores.n_generated == 2 and np.isfinite(scores.kid_mean)


def test_inception_unavailable_without_local_weights(tmp_path):
    status = load_inception(EvalConfig(), hub_dir=tmp_path)
    assert isinstance(status, InceptionStatus) and not status.available
    assert str(status) == f"unavailable: {NO_WEIGHTS}"
    assert "judges.eval.inception_weights" in str(status)
    scores = inception_scores(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), extractor=status)
    assert scores.fid is None and not scores.available
    assert scores.cell(scores.fid) == f"n/a (unavailable: {NO_WEIGHTS})"
    # a configured file that is missing, or that is not an Inception state dict
    missing = load_inception(EvalConfig(inception_weights=str(tmp_path / "nope.pth")), hub_dir=tmp_path)
    assert isinstance(missing, InceptionStatus) and "is not a file" in missing.reason
    broken = tmp_path / "broken.pth"
    torch.save({"conv.weight": torch.zeros(1)}, broken)
    wrong = load_inception(EvalConfig(inception_weights=str(broken)), hub_dir=tmp_path)
    assert isinstance(wrong, InceptionStatus) and "not a torchvision inception_v3 state dict" in wrong.reason


def test_inception_weights_are_found_in_the_hub_cache(tmp_path):
    from torchvision.models import Inception_V3_Weights

    assert HUB_FILENAME == Inception_V3_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # the name torch hub saves it under
    cached = tmp_path / "checkpoints" / HUB_FILENAME
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert find_inception_weights(None, hub_dir=tmp_path) == cached


def test_builtin_scorers_resolve_without_importing_their_modules_first():
    """build_scorer finds the project's scorers in a fresh interpreter that imported only rlhf.scorers."""
    import subprocess
    import sys

    code = ("import sys; from rlhf.scorers import SCORER_FACTORIES, build_scorer\n"
            "assert 'rlhf.selector' not in sys.modules\n"
            "try:\n    build_scorer('no_such_scorer')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("alignment", "finding_evaluator", "finding_reward", "selector"):
        assert name in out
