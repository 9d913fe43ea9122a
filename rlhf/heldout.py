"""Held-out evaluation of the loop: fixed prompts, a deterministic sampler, fixed seeds, judged by the
evaluator classifier (which never enters a reward) and the measures of ``synthmed eval``.

Image ``i`` of held-out prompt ``p`` starts from seed ``seed + p * images_per_prompt + i`` and DDIM
runs with eta 0, so every evaluation of a run (and of the base model) sees the same noise: differences
between evaluations are the adapter's doing. The real side of the Fréchet distance is a fresh phantom
set drawn with the evaluation seed (never trained on), or, for a profile of real images (``--config real``),
its data's validation rows (:func:`rlhf.evaluate.manifest_cases`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from generator.errors import UserError

from .config import EvalConfig, HeldoutConfig
from .evaluate import Judges, _batched, measure, phantom_cases
from .scorers import as_image_batch

HEADLINE = ("all_requested_shown", "requested_shown", "finding_accuracy", "all_findings_agree", "fd", "ms_ssim", "clip_score",
            "selector_quality", "memorised_share", "quality_ok")


class ReferenceSet:
    """Per modality the real side: evaluator features of a fresh phantom set (and its images), or of ``cases``
    (real images, :func:`rlhf.evaluate.manifest_cases`)."""

    def __init__(self, judges: Judges, modalities: Sequence[str], size: int, per_finding: int, seed: int,
                 cases: Sequence[Any] | None = None):
        self.images: dict[str, torch.Tensor] = {}
        self.features: dict[str, np.ndarray] = {}
        cases = list(cases) if cases is not None else phantom_cases(list(modalities), size, per_finding, seed)
        missing = sorted(set(modalities) - {c.modality for c in cases})
        if missing:
            raise UserError(f"the reference images hold no {', '.join(missing)} image: add its manifest to data.manifests "
                            "or leave it out of improve.prompts.modalities")
        by_modality = defaultdict(list)
        for c in cases:
            by_modality[c.modality].append(c.image)
        for m, images in by_modality.items():
            batch = as_image_batch(images)
            self.images[m] = batch
            self.features[m] = _batched(judges.evaluator[m].features, batch)


def expected_rows(items: Sequence[Any], labels: Sequence[str]) -> np.ndarray:
    """(N, L): 1 requested present, 0 requested absent, NaN not asked (the structured expectation only)."""
    out = np.full((len(items), len(labels)), np.nan)
    index = {name: j for j, name in enumerate(labels)}
    for i, it in enumerate(items):
        for name, present in it.expected.items():
            if name in index:
                out[i, index[name]] = 1.0 if present else 0.0
    return out


@torch.no_grad()
def generate_heldout(model, items: Sequence[Any], cfg: HeldoutConfig, guidance: float, batch_size: int = 20,
                     progress: bool = True) -> torch.Tensor:
    """(N * images_per_prompt, 3, H, W): the held-out images, prompt-major, deterministic."""
    from generator.sampling import sample

    k = cfg.images_per_prompt
    expanded = [it for it in items for _ in range(k)]
    out = []
    bar = tqdm(total=len(expanded), desc="held-out eval", unit=" img", disable=not progress, leave=False)
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start:start + batch_size]
        images = sample(model, [it.prompt for it in chunk], [it.modality for it in chunk], negative=[it.negative for it in chunk],
                        guidance=guidance, steps=cfg.steps, seed=cfg.seed + start, eta=0.0).images
        out.append(images.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def heldout_evaluation(model, items: Sequence[Any], judges: Judges, reference: ReferenceSet, cfg: HeldoutConfig,
                       eval_cfg: EvalConfig, guidance: float, train_images: dict[str, torch.Tensor] | None = None,
                       batch_size: int = 20, progress: bool = True) -> dict[str, Any]:
    """``{"overall": {metric: mean over modalities}, "per_modality": {m: row}, "seconds", "images"}``; the
    rows are :func:`rlhf.evaluate.measure`'s (FD, MS-SSIM within a prompt, CLIP, selector, memorisation,
    evaluator finding accuracy, ``all_requested_shown``: the share of images showing every requested finding)."""
    if not items:
        raise UserError("the held-out prompt set is empty; raise improve.prompts.heldout_per_modality")
    started = time.perf_counter()
    images = generate_heldout(model, items, cfg, guidance, batch_size, progress)
    k = cfg.images_per_prompt
    expanded = [it for it in items for _ in range(k)]
    groups = [str(i // k) for i in range(len(expanded))]
    per_modality: dict[str, dict] = {}
    for m in dict.fromkeys(it.modality for it in items):
        idx = [i for i, it in enumerate(expanded) if it.modality == m]
        if m not in judges.evaluator:
            raise UserError(f"no evaluator classifier for {m}; train one with `synthmed judges train classifier`")
        labels = list(judges.evaluator[m].label_names)
        sub = images[torch.as_tensor(idx)]
        sub_items = [expanded[i] for i in idx]
        train_set = (train_images or {}).get(m)
        row = measure(sub, [it.prompt for it in sub_items], m, [groups[i] for i in idx], expected_rows(sub_items, labels),
                      reference.features[m], None, judges, eval_cfg, reference.images[m], train_set)
        per_modality[m] = {key: row.get(key) for key in HEADLINE} | {"n": row["n"]}
    overall = {}
    for key in HEADLINE:
        values = [r[key] for r in per_modality.values() if r.get(key) is not None and np.isfinite(r[key])]
        overall[key] = float(np.mean(values)) if values else None
    return {"overall": overall, "per_modality": per_modality, "seconds": round(time.perf_counter() - started, 2),
            "images": images}


__all__ = ["HEADLINE", "ReferenceSet", "expected_rows", "generate_heldout", "heldout_evaluation"]
