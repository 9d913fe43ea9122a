"""Image metrics of the evaluation and the verifier: distances between feature sets, MS-SSIM
diversity, memorisation, no-reference image statistics, quality checks, finding accuracy, AUROC.

Images are what :func:`rlhf.scorers.as_image_batch` accepts: a float tensor ``(B, 3, H, W)`` in
``[-1, 1]`` (grey modalities carry three equal channels) or a list of uint8 arrays. Features are
arrays ``(N, D)``. Nothing here downloads anything or needs a GPU.

Naming: the Fréchet distance computed in synthmed's own feature space (the held-out evaluator
classifier's penultimate layer) is reported as ``"FD (synthmed features)"``, never as "FID"; FID
proper needs Inception features (:mod:`rlhf.inception`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from generator.errors import UserError
from generator.similarity import SSIM_SIGMA, gaussian_window, ssim_parts

from .config import EvalConfig
from .scorers import as_image_batch

FD_LABEL = "FD (synthmed features)"
KID_LABEL = "KID (synthmed features)"

# ITU-R BT.601 luma weights; they sum to 1, so grey images (three equal channels) keep their value
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps an image batch to one feature vector per image (e.g. the evaluator
    classifier's penultimate layer, or Inception's pool3)."""

    def features(self, images: Any) -> np.ndarray: ...  # (B, D)


def _as_features(feats: Any, name: str) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be a 2-D array (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return x


def _check_pair(feats_a: Any, feats_b: Any, min_samples: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}; extract both with the same model")
    for name, x in (("feats_a", a), ("feats_b", b)):
        if x.shape[0] < min_samples:
            raise UserError(f"{what} needs at least {min_samples} feature vectors per set; {name} has {x.shape[0]}")
    return a, b


# --------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)``, float64; needs at least 2 vectors."""
    x = _as_features(feats, "feats")
    if x.shape[0] < 2:
        raise UserError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_eigenvalues_floor(vals: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise zeroed: below the numerical rank
    tolerance they are noise of either sign, and their square roots would add up (1e-14 -> 1e-7)."""
    tol = max(float(vals.max(initial=0.0)), 0.0) * vals.size * np.finfo(np.float64).eps
    return np.where(vals > tol, vals, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (eigen-decomposition, rounding noise zeroed)."""
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * np.sqrt(_psd_eigenvalues_floor(vals))) @ vecs.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` for two Gaussians.

    The eigen-decomposition route: both square roots are of symmetric PSD matrices, so no complex
    parts and no eps offset for singular covariances are needed (``scipy.linalg.sqrtm`` of the
    non-symmetric ``S_a S_b`` is what needs them)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"shapes disagree: mu {mu_a.shape}, {mu_b.shape}; sigma {sigma_a.shape}, {sigma_b.shape}")
    root_a = _sqrt_psd(sigma_a)
    middle = root_a @ sigma_b @ root_a
    vals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(_psd_eigenvalues_floor(vals)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt)
    return max(fd, 0.0)  # tiny negatives are rounding


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, D)``, ``(N_b, D)``.

    With fewer vectors than dimensions (the usual case for evaluation sets against 2048-d
    features) the trace term is computed exactly from the centred samples instead of D x D
    matrices: ``tr sqrt(S_a S_b) = ||A B^T||_* / sqrt((N_a - 1)(N_b - 1))`` (nuclear norm), since the
    non-zero eigenvalues of ``S_a S_b`` are the squared singular values of ``A B^T``. Both routes give
    the same number; the covariance of fewer than D vectors is rank-deficient, so the distance is a
    biased estimate there and should only be compared at equal set sizes."""
    a, b = _check_pair(feats_a, feats_b, 2, "the Fréchet distance")
    (na, d), nb = a.shape, b.shape[0]
    if max(na, nb) >= d:
        return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu_a, b - mu_b
    trace_a = float((ca**2).sum()) / (na - 1)
    trace_b = float((cb**2).sum()) / (nb - 1)
    trace_sqrt = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum()) / math.sqrt((na - 1) * (nb - 1))
    fd = float(((mu_a - mu_b) ** 2).sum()) + trace_a + trace_b - 2.0 * trace_sqrt
    return max(fd, 0.0)


# --------------------------------------------------------------------------- KID


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # the cubic kernel of Binkowski et al. 2018: (x.y / D + 1)^3
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID): mean and standard deviation over ``subsets`` random subsets of the
    unbiased squared MMD with the cubic polynomial kernel.

    ``subset_size`` is clamped to the smaller set (at least 2 vectors each are needed). The
    estimator is unbiased, so for identical distributions it scatters around 0 and can be slightly
    negative; it is not clamped."""
    a, b = _check_pair(feats_a, feats_b, 2, "KID")
    if subsets < 1:
        raise UserError(f"KID needs at least 1 subset, got {subsets}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise UserError(f"KID subset_size must be at least 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    off_diag = m * (m - 1)
    estimates = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        estimates[s] = (
            (k_xx.sum() - np.trace(k_xx)) / off_diag + (k_yy.sum() - np.trace(k_yy)) / off_diag - 2.0 * k_xy.mean()
        )
    return float(estimates.mean()), float(estimates.std())


def feature_distances(
    extractor: FeatureExtractor,
    real_images: Any,
    generated_images: Any,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FD and KID between real and generated images in ``extractor``'s feature space.

    Keys: ``fd``, ``kid_mean``, ``kid_std``, ``n_real``, ``n_generated``; label them with
    :data:`FD_LABEL` / :data:`KID_LABEL` for synthmed features."""
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"{type(extractor).__name__} has no features(images) method")
    real, gen = np.asarray(extractor.features(real_images)), np.asarray(extractor.features(generated_images))
    kid_mean, kid_std = kid(real, gen, kid_subsets, kid_subset_size, seed)
    return {
        "fd": frechet_distance(real, gen), "kid_mean": kid_mean, "kid_std": kid_std,
        "n_real": float(real.shape[0]), "n_generated": float(gen.shape[0]),
    }


# --------------------------------------------------------------------------- SSIM / MS-SSIM

# Wang, Simoncelli, Bovik 2003, "Multi-scale structural similarity for image quality assessment"
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11  # pixels, Gaussian window of the reference implementation


def ms_ssim_plan(height: int, width: int, scales: int | None = None) -> tuple[int, int, float, tuple[float, ...]]:
    """(scales, window, sigma, weights) used for an image of this size.

    The reference needs ``min(H, W) >= 11 * 2^4 = 176`` pixels for 5 scales with the 11-pixel
    window (each scale halves the image by 2x2 averaging). For smaller images synthmed keeps the
    window and drops the coarsest scales: the number of scales is the largest ``k <= 5`` with ``min(H, W) / 2^(k-1) >= 11`` (64 px: 3 scales, at
    64/32/16 px; 32 px: 2 scales), and the first ``k`` Wang weights are renormalised to sum to 1.
    Below 11 pixels one scale (plain SSIM) is used with the window shrunk to the largest odd size
    that fits and sigma scaled with it."""
    side = min(height, width)
    if side < 2:
        raise ValueError(f"MS-SSIM needs images of at least 2x2 pixels, got {height}x{width}")
    window, sigma = SSIM_WINDOW, SSIM_SIGMA
    if side < window:
        window = side if side % 2 else side - 1
        sigma = SSIM_SIGMA * window / SSIM_WINDOW
    fit = 1
    while fit < len(MS_SSIM_WEIGHTS) and (side >> fit) >= window:
        fit += 1
    if scales is None:
        scales = fit
    elif not 1 <= scales <= fit:
        raise UserError(f"{scales} MS-SSIM scales do not fit a {height}x{width} image with an {window}-pixel window; at most {fit}")
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
    return scales, window, sigma, tuple(float(w) for w in weights / weights.sum())


def ms_ssim(a: Any, b: Any, scales: int | None = None) -> torch.Tensor:
    """Multi-scale SSIM ``(B,)`` between paired image batches (1 for identical images).

    Computed per channel on images mapped to [0, 1] and averaged over channels; the number of scales
    follows :func:`ms_ssim_plan`. Negative per-scale terms are clamped to 0 before the fractional
    powers (as in common implementations), so the result lies in [0, 1]."""
    x, y = as_image_batch(a).double(), as_image_batch(b).double()
    if x.shape != y.shape:
        raise ValueError(f"MS-SSIM needs paired batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = (x + 1) / 2, (y + 1) / 2
    n_scales, size, sigma, weights = ms_ssim_plan(x.shape[2], x.shape[3], scales)
    window = gaussian_window(size, sigma)
    result = torch.ones(x.shape[:2], dtype=torch.float64)
    for j, w in enumerate(weights):
        ssim_j, cs_j = ssim_parts(x, y, window)
        if j == n_scales - 1:
            result = result * ssim_j.clamp(min=0) ** w  # luminance enters at the coarsest scale only
        else:
            result = result * cs_j.clamp(min=0) ** w
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result.mean(dim=1).float()


def ssim(a: Any, b: Any) -> torch.Tensor:
    """Single-scale SSIM ``(B,)`` (Gaussian window 11 / sigma 1.5 where it fits)."""
    return ms_ssim(a, b, scales=1)


def _pairwise_ms_ssim(images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
    return torch.cat([ms_ssim(images[i[s : s + chunk]], images[j[s : s + chunk]]) for s in range(0, i.numel(), chunk)])


def diversity_summary(images_by_prompt: Mapping[str, Any]) -> dict[str, float]:
    """Within-prompt MS-SSIM: the mean over all pairs of one prompt's images, averaged over prompts
    (each prompt weighs the same). Prompts with fewer than 2 images are skipped.

    Keys: ``ms_ssim`` (lower = more diverse), ``diversity`` (= 1 - ms_ssim), ``prompts``, ``pairs``."""
    per_prompt, pairs = [], 0
    for images in images_by_prompt.values():
        batch = as_image_batch(images)
        if batch.shape[0] < 2:
            continue
        values = _pairwise_ms_ssim(batch)
        per_prompt.append(float(values.mean()))
        pairs += values.numel()
    if not per_prompt:
        raise UserError("MS-SSIM diversity needs at least 2 images for one prompt (judges.eval.n_per_prompt >= 2)")
    mean = float(np.mean(per_prompt))
    return {"ms_ssim": mean, "diversity": 1.0 - mean, "prompts": float(len(per_prompt)), "pairs": float(pairs)}


def ms_ssim_diversity(images_by_prompt: Mapping[str, Any]) -> float:
    """Mean pairwise MS-SSIM within each prompt's images, averaged over prompts (lower = more
    diverse); ``1 -`` this is the "diversity" of :func:`diversity_summary`."""
    return diversity_summary(images_by_prompt)["ms_ssim"]


# --------------------------------------------------------------------------- memorisation

_NUMPY_SEARCH_LIMIT = 4_000_000  # query x training pairs searched exactly in numpy; above: FAISS


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # a zero vector stays zero: similarity 0 to everything


def _nearest(queries: np.ndarray, base: np.ndarray, k: int, metric: str, use_faiss: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product ("ip", descending) or squared L2 ("l2", ascending): (values, indices)."""
    k = min(k, base.shape[0])
    if use_faiss is None:
        use_faiss = queries.shape[0] * base.shape[0] > _NUMPY_SEARCH_LIMIT
    if use_faiss:
        import faiss  # imported here: only large searches need it

        index = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        values, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return values.astype(np.float64), indices.astype(np.int64)
    if metric == "ip":
        scores = queries @ base.T
    else:
        scores = -((queries**2).sum(1)[:, None] - 2 * queries @ base.T + (base**2).sum(1)[None, :])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(scores, order, axis=1)
    return (values if metric == "ip" else -values), order.astype(np.int64)


def _memorisation_summary(similarity: np.ndarray, index: np.ndarray, threshold: float, key: str) -> dict[str, Any]:
    memorised = similarity > threshold
    return {
        key: similarity, "nearest_index": index, "memorised": memorised,
        "share_memorised": float(memorised.mean()), f"mean_{key}": float(similarity.mean()), "threshold": float(threshold),
    }


def memorisation(gen_feats: Any, train_feats: Any, threshold: float, use_faiss: bool | None = None) -> dict[str, Any]:
    """Nearest training image of each generated one by cosine similarity of features.

    Returns ``max_similarity`` (N,), ``nearest_index`` (N,) into the training set, ``memorised`` (N,)
    (similarity above ``threshold``), ``share_memorised``, ``mean_max_similarity``, ``threshold``.
    Search is exact: numpy for small sets, FAISS ``IndexFlatIP`` on unit vectors for large ones
    (``use_faiss`` forces either)."""
    gen, train = _check_pair(gen_feats, train_feats, 1, "memorisation")
    values, indices = _nearest(_unit_rows(gen), _unit_rows(train), 1, "ip", use_faiss)
    return _memorisation_summary(values[:, 0], indices[:, 0], threshold, "max_similarity")


def _small_luminance(images: Any, size: int, chunk: int = 512) -> torch.Tensor:
    batch = as_image_batch(images)
    out = [
        F.interpolate(luminance(batch[s : s + chunk])[:, None], size=(size, size), mode="area")
        for s in range(0, batch.shape[0], chunk)
    ]
    return torch.cat(out)  # (N, 1, size, size) in [0, 1]


def pixel_memorisation(
    gen_images: Any, train_images: Any, threshold: float = 0.95, size: int = 32, candidates: int = 8,
) -> dict[str, Any]:
    """A second opinion in pixel space: SSIM to the nearest training image on luminance downsampled
    to ``size`` x ``size`` (area averaging).

    The ``candidates`` nearest training images by L2 distance on those small images are shortlisted
    and the best SSIM among them is kept, so the cost stays linear in the training set. Returns
    ``max_ssim``, ``nearest_index``, ``memorised`` (SSIM above ``threshold``), ``share_memorised``,
    ``mean_max_ssim``, ``threshold``."""
    gen, train = _small_luminance(gen_images, size), _small_luminance(train_images, size)
    g, t = gen.flatten(1).double().numpy(), train.flatten(1).double().numpy()
    _, shortlist = _nearest(g, t, candidates, "l2", None)  # (N, k)
    k = shortlist.shape[1]
    candidates_px = train[torch.from_numpy(shortlist.reshape(-1))]  # (N * k, 1, size, size)
    scores = ssim(gen.repeat_interleave(k, 0) * 2 - 1, candidates_px * 2 - 1).double().view(-1, k)
    best = scores.argmax(dim=1).numpy()
    rows = np.arange(shortlist.shape[0])
    return _memorisation_summary(scores.numpy()[rows, best], shortlist[rows, best], threshold, "max_ssim")


# --------------------------------------------------------------------------- no-reference statistics


def luminance(images: Any) -> torch.Tensor:
    """``(B, H, W)`` luminance in [0, 1] (BT.601 luma; grey images keep their grey value)."""
    batch = as_image_batch(images)
    w = torch.tensor(LUMA_WEIGHTS, dtype=batch.dtype).view(1, 3, 1, 1)
    return ((batch + 1) / 2 * w).sum(dim=1)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64).view(1, 1, 3, 3)


def image_stats(images: Any) -> dict[str, np.ndarray]:
    """No-reference statistics per image, each ``np.ndarray (B,)`` (NaN for images with non-finite pixels):

    - ``contrast``: ``p99 - p1`` of luminance in [0, 1] (robust range: 0 flat, 1 full scale);
    - ``rms_contrast``: standard deviation of luminance in [0, 1];
    - ``sharpness``: variance of the 4-neighbour Laplacian of luminance on the [0, 255] scale, valid
      pixels only (no border padding), as OpenCV's ``Laplacian(...).var()`` apart from the border;
    - ``entropy``: Shannon entropy (bits, 0-8) of the 256-bin histogram of luminance rounded to 0-255;
    - ``mean_luminance``: in [0, 1]."""
    lum = luminance(images).double()  # (B, H, W)
    b = lum.shape[0]
    finite = torch.isfinite(lum).flatten(1).all(dim=1)
    safe = torch.where(torch.isfinite(lum), lum, torch.zeros(()))
    flat = safe.flatten(1)
    p1, p99 = torch.quantile(flat, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=1)
    if min(lum.shape[1:]) >= 3:
        sharpness = F.conv2d(safe[:, None] * 255.0, _LAPLACIAN).flatten(1).var(dim=1, unbiased=False)
    else:
        sharpness = torch.full((b,), float("nan"), dtype=torch.float64)
    levels = (flat * 255).round().clamp(0, 255).long()
    offsets = torch.arange(b).view(-1, 1) * 256
    counts = torch.bincount((levels + offsets).flatten(), minlength=256 * b).view(b, 256).double()
    p = counts / counts.sum(dim=1, keepdim=True)
    entropy = -(torch.where(p > 0, p * torch.log2(p), torch.zeros(()))).sum(dim=1)
    stats = {
        "contrast": p99 - p1, "rms_contrast": flat.std(dim=1, unbiased=False), "sharpness": sharpness,
        "entropy": entropy + 0.0, "mean_luminance": flat.mean(dim=1),  # + 0.0 turns -0.0 into 0.0
    }
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {k: torch.where(finite, v, nan).numpy() for k, v in stats.items()}


# --------------------------------------------------------------------------- quality checks

_SATURATION_LEVEL = 1 / 255  # luminance within one grey level of 0 or 1 counts as clipped


def quality_checks(
    images: Any, modalities: Sequence[str] | None = None, config: EvalConfig | None = None,
) -> list[dict[str, Any]]:
    """Per image: flags ``nan``, ``blank``, ``saturated``, ``out_of_field``, ``ok`` (no flag), the
    measured values, and ``reasons`` (one sentence per raised flag). Thresholds come from
    ``config`` (``judges.eval.quality_*``; defaults: :class:`EvalConfig`).

    - ``nan``: any non-finite pixel (``nonfinite_share``); the other values use the finite pixels.
    - ``blank``: luminance std (in [0, 1]) below ``quality_blank_std``.
    - ``saturated``: the share of pixels with luminance at the bright extreme (``bright_share``)
      above ``quality_saturated_share``; the dark extreme (``dark_share``) counts only for
      modalities in ``dark_end_saturation_modalities``, since black background is normal in fundus,
      OCT, MRI and CT (and unknown modalities get the benefit of the doubt).
    - ``out_of_field``: for modalities in ``dark_corner_modalities`` (fundus: outside the circular
      field; brain MRI: air around the head), the brightest of the four corner patches (side 1/8
      of the image; ``corner_brightness``, mean luminance) above ``quality_corner_brightness``."""
    cfg = config or EvalConfig()
    lum = luminance(images).double().numpy()  # (B, H, W)
    b, h, w = lum.shape
    if modalities is not None and len(modalities) != b:
        raise ValueError(f"{b} images but {len(modalities)} modalities; give one per image or None")
    patch = max(1, min(h, w) // 8)
    results = []
    for i in range(b):
        modality = modalities[i] if modalities is not None else None
        img = lum[i]
        finite = np.isfinite(img)
        values = img[finite]
        nonfinite_share = float(1.0 - finite.mean())
        if values.size:
            std = float(values.std())
            bright_share = float((values >= 1 - _SATURATION_LEVEL).mean())
            dark_share = float((values <= _SATURATION_LEVEL).mean())
            masked = np.where(finite, img, np.nan)
            rows, cols = (slice(0, patch), slice(h - patch, h)), (slice(0, patch), slice(w - patch, w))
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN corner is "not measured"
                corners = [np.nanmean(masked[r, c]) for r in rows for c in cols]
            corner_brightness = float(np.nanmax(corners)) if np.isfinite(corners).any() else float("nan")
        else:
            std = bright_share = dark_share = corner_brightness = float("nan")
        saturated_share = bright_share
        if modality in cfg.dark_end_saturation_modalities:
            saturated_share = max(bright_share, dark_share)
        reasons = []
        flags = {
            "nan": nonfinite_share > 0,
            "blank": std < cfg.quality_blank_std,  # NaN compares False: not measured, not flagged
            "saturated": saturated_share > cfg.quality_saturated_share,
            "out_of_field": modality in cfg.dark_corner_modalities and corner_brightness > cfg.quality_corner_brightness,
        }
        if flags["nan"]:
            reasons.append(f"nan: {nonfinite_share:.1%} of pixels are not finite")
        if flags["blank"]:
            reasons.append(f"blank: luminance std {std:.4f} < {cfg.quality_blank_std}")
        if flags["saturated"]:
            reasons.append(f"saturated: {saturated_share:.1%} of pixels at an extreme > {cfg.quality_saturated_share:.0%}")
        if flags["out_of_field"]:
            reasons.append(
                f"out_of_field: a corner of this {modality} image has mean brightness {corner_brightness:.2f}"
                f" > {cfg.quality_corner_brightness}, where it lies outside the field of view and should be dark"
            )
        results.append({
            **{k: bool(v) for k, v in flags.items()}, "ok": not any(flags.values()), "reasons": reasons, "modality": modality,
            "nonfinite_share": nonfinite_share, "std": std, "bright_share": bright_share, "dark_share": dark_share,
            "saturated_share": saturated_share, "corner_brightness": corner_brightness,
        })
    return results


# --------------------------------------------------------------------------- findings and AUROC


def finding_accuracy(probs: Any, expected: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Agreement of predicted findings with the stated ones.

    ``probs`` (N, L) finding probabilities; ``expected`` (N, L) with 1 (present), 0 (stated absent)
    or NaN (not stated: ignored). A finding is predicted present when ``prob >= threshold``.
    Returns ``accuracy`` over all stated labels, ``per_label`` (L,) (NaN where a label is never
    stated), ``all_agree`` (share of images with at least one stated finding where every stated
    finding agrees), ``image_agrees`` (N,) (1/0, NaN for images with nothing stated), ``n_stated``."""
    p, e = np.asarray(probs, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if p.ndim != 2 or p.shape != e.shape:
        raise ValueError(f"probs and expected must both be (N, L), got {p.shape} and {e.shape}")
    stated = ~np.isnan(e)
    if np.any(stated & ~np.isin(e, (0.0, 1.0))):
        raise ValueError("expected must hold 1 (present), 0 (absent) or NaN (not stated)")
    correct = ((p >= threshold) == (e == 1)) & stated
    n_label = stated.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = np.where(n_label > 0, correct.sum(axis=0) / np.maximum(n_label, 1), np.nan)
    any_stated = stated.any(axis=1)
    agrees = (correct | ~stated).all(axis=1)
    image_agrees = np.where(any_stated, agrees.astype(np.float64), np.nan)
    n_stated = int(stated.sum())
    return {
        "accuracy": float(correct.sum() / n_stated) if n_stated else float("nan"),
        "per_label": per_label, "all_agree": float(agrees[any_stated].mean()) if any_stated.any() else float("nan"),
        "image_agrees": image_agrees, "n_stated": n_stated,
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2)[inverse]


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U), ties counted half; entries whose label is
    NaN are dropped; NaN when either class is absent."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    keep = ~np.isnan(y)
    s, y = s[keep], y[keep]
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


__all__ = [
    "FD_LABEL", "KID_LABEL", "FeatureExtractor", "MS_SSIM_WEIGHTS", "auroc", "diversity_summary", "feature_distances",
    "finding_accuracy", "frechet_distance", "frechet_distance_from_stats", "gaussian_stats", "image_stats", "kid",
    "luminance", "memorisation", "ms_ssim", "ms_ssim_diversity", "ms_ssim_plan", "pixel_memorisation", "quality_checks",
    "ssim",
]
