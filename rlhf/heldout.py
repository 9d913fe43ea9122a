"""Held-out evaluation of the loop: fixed prompts, a deterministic sampler, fixed seeds, judged by the
evaluator classifier (which never enters a reward) and the measures of ``synthmed eval``.

Image ``i`` of held-out prompt ``p`` starts from seed ``seed + p * images_per_prompt + i`` and DDIM
runs with eta 0, so every evaluation of a run (and of the base model) sees the same noise: differences
between evaluations are the adapter's doing. The real side of the Fréchet distance is a fresh phantom
set drawn with the evaluation seed (never trained on), or, for a profile of real images (``--config real``),
its data's validation rows (:func:`rlhf.evaluate.manifest_cases`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from generator.errors import UserError

from .config import EvalConfig, HeldoutConfig
from .evaluate import Judges, _batched, holds_request, measure, phantom_cases
from .scorers import as_image_batch

log = logging.getLogger(__name__)

HEADLINE = ("all_requested_shown", "requested_shown", "finding_accuracy", "all_findings_agree", "fd", "ms_ssim", "clip_score",
            "selector_quality", "memorised_share", "quality_ok")


class ReferenceSet:
    """Per modality the real side: evaluator features of a fresh phantom set (and its images), or of ``cases``
    (real images, :func:`rlhf.evaluate.manifest_cases`)."""

    def __init__(self, judges: Judges, modalities: Sequence[str], size: int, per_finding: int, seed: int,
                 cases: Sequence[Any] | None = None):
        self.images: dict[str, torch.Tensor] = {}
        self.features: dict[str, np.ndarray] = {}
        self.kind = "phantoms" if cases is None else "real"
        self.size = size
        cases = list(cases) if cases is not None else phantom_cases(list(modalities), size, per_finding, seed)
        self.cases = cases
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


def _logged(row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The part of a :func:`rlhf.evaluate.measure` row a held-out line keeps: ``keys``, the image count and each requested
    finding's share."""
    return {key: row.get(key) for key in keys} | {"n": row["n"], "requested_shown_by_finding": row["requested_shown_by_finding"]}


def _mean_over_modalities(per_modality: dict[str, dict]) -> dict[str, float | None]:
    out = {}
    for key in HEADLINE:
        values = [r[key] for r in per_modality.values() if r.get(key) is not None and np.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else None
    return out


def phantom_of_request(item: Any, size: int, seed: int | tuple[int, ...], tries: int = 50):
    """A phantom study drawn to a request: its stated findings with their severity, side and location (a finding
    another implies is drawn by that one, or asked for when it was not), and none the request says is absent (a
    renderer may draw one alongside: such a draw is made again with the next seed). None when ``tries`` draws all
    hold a finding the request denies (its renderer always draws them together)."""
    from generator.phantoms import Finding, make_phantom

    stated = [Finding(f["name"], side=f.get("laterality"), location=f.get("location"), severity=f.get("severity"))
              for f in item.findings if f["present"] and f.get("stated", True)]
    absent = {f["name"] for f in item.findings if not f["present"]}
    base = list(seed) if isinstance(seed, tuple) else [int(seed)]
    for attempt in range(tries):
        study_seed = tuple(base + [attempt]) if attempt else seed
        study = make_phantom(item.modality, stated, size=size, seed=study_seed)
        missing = set(item.present) - {f.name for f in study.findings if f.present}
        if missing:
            study = make_phantom(item.modality, stated + [Finding(n) for n in sorted(missing)], size=size, seed=study_seed)
        if not absent & {f.name for f in study.findings if f.present}:
            return study
    return None


def request_references(items: Sequence[Any], reference: ReferenceSet, per_request: int, seed: int,
                       cases: Sequence[Any] | None = None) -> tuple[list[Any], list[np.ndarray]]:
    """Images that truly show each held-out request, ``per_request`` each: ``(items, images)``, request-major.

    On phantoms they are drawn to the request (its stated findings with their severity, side and location; a
    finding another implies is drawn by it), with seeds of their own. On real images they are the reference's
    images whose labels hold every finding the request asks for (up to ``per_request``; a request no image matches
    has none; ``cases``: where to look instead of the reference's own images, e.g. :func:`rlhf.evaluate.request_cases`).
    Judged like the generated images, they say what the evaluator gives images that show the request: the share the
    generator can be asked to reach."""
    out_items, out_images = [], []
    for p, it in enumerate(items):
        if reference.kind == "phantoms":
            for i in range(per_request):
                study = phantom_of_request(it, reference.size, (seed, p, i))
                if study is None:
                    log.warning("no phantom shows the held-out request %s: its renderer always draws one of the findings "
                                "it denies (%s); the reference leaves it out", it.key,
                                ", ".join(f["name"] for f in it.findings if not f["present"]))
                    break
                out_items.append(it)
                out_images.append(study.image)
        else:
            matches = [c for c in (reference.cases if cases is None else cases)
                       if c.modality == it.modality and holds_request(c.findings, it.present)]
            for c in matches[:per_request]:
                out_items.append(it)
                out_images.append(c.image)
    return out_items, out_images


def reference_evaluation(items: Sequence[Any], judges: Judges, reference: ReferenceSet, eval_cfg: EvalConfig,
                         per_request: int, seed: int, cases: Sequence[Any] | None = None) -> dict[str, Any]:
    """The held-out table of :func:`request_references`' images: ``{"overall", "per_modality", "source", "per_request",
    "missing", "seconds"}``, in the same metrics as :func:`heldout_evaluation` (memorisation left out: these images are
    no model's). ``missing``: modalities with fewer than 2 such images (real images: none holds the requests' labels);
    with any, ``overall`` is None throughout, since a mean over fewer modalities bounds nothing."""
    started = time.perf_counter()
    ref_items, images = request_references(items, reference, per_request, seed, cases)
    index = {id(it): p for p, it in enumerate(items)}
    per_modality: dict[str, dict] = {}
    for m in dict.fromkeys(it.modality for it in items):
        idx = [i for i, it in enumerate(ref_items) if it.modality == m]
        if len(idx) < 2:  # a real reference with no (or one) image of these requests' labels: nothing to measure
            continue
        labels = list(judges.evaluator[m].label_names)
        sub_items = [ref_items[i] for i in idx]
        row = measure(as_image_batch([images[i] for i in idx]), [it.prompt for it in sub_items], m,
                      [str(index[id(it)]) for it in sub_items], expected_rows(sub_items, labels), reference.features[m], None,
                      judges, eval_cfg, reference.images[m], None)
        per_modality[m] = _logged(row, [key for key in HEADLINE if key != "memorised_share"])
    missing = [m for m in dict.fromkeys(it.modality for it in items) if m not in per_modality]
    # a mean over fewer modalities than the generated images' is no ceiling of theirs: left out, the rows stand
    overall = {key: None for key in HEADLINE} if missing else _mean_over_modalities(per_modality)
    return {"overall": overall, "per_modality": per_modality, "source": reference.kind, "per_request": per_request,
            "missing": missing, "seconds": round(time.perf_counter() - started, 2)}


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
                     progress: bool = True, label: str = "held-out eval") -> torch.Tensor:
    """(N * images_per_prompt, 3, H, W): the held-out images, prompt-major, deterministic."""
    from generator.sampling import sample

    k = cfg.images_per_prompt
    expanded = [it for it in items for _ in range(k)]
    out = []
    bar = tqdm(total=len(expanded), desc=label, unit=" img", disable=not progress, leave=False)
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start:start + batch_size]
        images = sample(model, [it.prompt for it in chunk], [it.modality for it in chunk], negative=[it.negative for it in chunk],
                        guidance=guidance, steps=cfg.steps, seed=cfg.seed + start, eta=0.0,
                        findings=[it.generator_findings for it in chunk]).images
        out.append(images.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def heldout_evaluation(model, items: Sequence[Any], judges: Judges, reference: ReferenceSet, cfg: HeldoutConfig,
                       eval_cfg: EvalConfig, guidance: float, train_images: dict[str, torch.Tensor] | None = None,
                       batch_size: int = 20, progress: bool = True, label: str = "held-out eval",
                       images: torch.Tensor | None = None) -> dict[str, Any]:
    """``{"overall": {metric: mean over modalities}, "per_modality": {m: row}, "seconds", "images"}``; the
    rows are :func:`rlhf.evaluate.measure`'s (FD, MS-SSIM within a prompt, CLIP, selector, memorisation,
    evaluator finding accuracy, ``all_requested_shown``: the share of images showing every requested finding).
    ``images`` (prompt-major, ``images_per_prompt`` each) are judged instead of the model's deterministic draws."""
    if not items:
        raise UserError("the held-out prompt set is empty; raise improve.prompts.heldout_per_modality")
    started = time.perf_counter()
    if images is None:
        images = generate_heldout(model, items, cfg, guidance, batch_size, progress, label)
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
        per_modality[m] = _logged(row, HEADLINE)
    overall = _mean_over_modalities(per_modality)
    return {"overall": overall, "per_modality": per_modality, "seconds": round(time.perf_counter() - started, 2),
            "images": images}


__all__ = ["HEADLINE", "ReferenceSet", "expected_rows", "generate_heldout", "heldout_evaluation", "phantom_of_request",
           "reference_evaluation", "request_references"]
