"""`synthmed eval`: generated images against real ones, per modality, judged by scorers the
training never sees.

For each modality:

- a **reference set** of real images (by default fresh phantoms drawn with the evaluation seed,
  which no model was trained on; or the rows of ``--data`` manifests);
- **prompts**: ``prompts_per_modality`` reports taken from the reference set, spread evenly over
  its finding labels; the generator draws ``n_per_prompt`` images for each;
- the same measures on both sides, so every generated figure has a real baseline next to it:
  Fréchet distance and KID in synthmed's own feature space (the held-out **evaluator**
  classifier's penultimate layer: it never enters a reward), Inception FID/KID where weights are
  on disk, MS-SSIM within a prompt (for real images: within a finding label), CLIP score, finding
  accuracy by the evaluator, memorisation (nearest training image), no-reference statistics, and
  the selector's quality.

The real row's FD is between two disjoint halves of the reference set (the estimator's floor at
this sample size); the generated row's FD is between the generated set and the same second half.
Both are small-sample estimates: compare rows of one table, never with published FIDs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.errors import UserError

from . import metrics
from .config import EvalConfig, JudgesConfig
from .scorers import as_image_batch

log = logging.getLogger(__name__)


# -- the set to evaluate against -------------------------------------------------------------
@dataclass
class EvalCase:
    image: np.ndarray  # (H, W) or (H, W, 3) uint8 at the model's size
    text: str
    modality: str
    findings: list[dict]  # {"name", "present", ...}
    complete_truth: bool  # phantoms: every unlisted finding is absent; real data: unlisted = unknown

    @property
    def label(self) -> str:
        present = sorted(f["name"] for f in self.findings if f.get("present"))
        return "+".join(present) if present else "normal"


def phantom_cases(modalities: list[str], size: int, per_finding: int, seed: int) -> list[EvalCase]:
    """Fresh phantoms drawn with the evaluation seed: per modality the normal study and every
    finding, ``per_finding`` studies each."""
    from generator.phantoms import NORMAL, get_spec, make_phantom
    from generator.phantoms.dataset import study_seed

    cases = []
    for modality in modalities:
        for name in [NORMAL, *get_spec(modality).findings]:
            for i in range(per_finding):
                study = make_phantom(modality, [] if name == NORMAL else [name], size=size, seed=study_seed(seed, modality, name, i))
                findings = [{"name": f.name, "present": f.present, "side": f.side, "location": f.location,
                             "severity": f.severity} for f in study.findings]
                cases.append(EvalCase(study.image, study.text, modality, findings, complete_truth=True))
    return cases


def manifest_cases(manifests: list[str], data_cfg, size: int, modalities: list[str] | None, limit_per_modality: int,
                   seed: int) -> list[EvalCase]:
    """Rows of real manifests (``validation`` rows first where an adapter tagged them), at most
    ``limit_per_modality`` per modality, chosen with the evaluation seed."""
    from generator.data import iter_manifest
    from generator.data.sources import load_row
    from generator.data.transforms import RecordTransform

    transform = RecordTransform(data_cfg.model_copy(update={"image_size": size}), as_tensor=False)
    rows = []
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"evaluation manifest {manifest} not found; build it with `synthmed data manifest` or `synthmed data meddata`")
        rows += [r for r in iter_manifest(manifest, data_cfg.modalities) if not modalities or r.modality in modalities]
    by_modality: dict[str, list] = defaultdict(list)
    for r in rows:
        by_modality[r.modality].append(r)
    rng = np.random.default_rng(seed)
    cases = []
    for modality, group in by_modality.items():
        val = [r for r in group if r.source.endswith(":val")]
        pool = val if len(val) >= limit_per_modality else group
        chosen = [pool[i] for i in sorted(rng.permutation(len(pool))[:limit_per_modality])]
        for r in chosen:
            image = transform.image(load_row(r, transform.modalities)["image"], r.modality)
            cases.append(EvalCase(image, r.text, r.modality, r.findings, complete_truth=r.source.startswith("phantom")))
    return cases


def holds_request(findings: Sequence[dict], present: Sequence[str]) -> bool:
    """Whether an image with these labelled ``findings`` shows a request for the ``present`` findings: its present labels
    hold every one of them, or, for a normal request, it has none."""
    labels = {f["name"] for f in findings if f.get("present")}
    return set(present) <= labels if present else not labels


def request_cases(manifests: list[str], data_cfg, size: int, items: Sequence[Any], per_request: int, seed: int) -> list[EvalCase]:
    """Real validation images that show each request (``items``: the loop's held-out requests): per request, up to
    ``per_request`` validation rows whose present labels hold every finding it asks for (a normal request: rows with
    none), chosen with ``seed``, each image read once. Only validation rows: the generator never trained on them."""
    from generator.data import iter_manifest
    from generator.data.sources import load_row
    from generator.data.transforms import RecordTransform

    modalities = {it.modality for it in items}
    rows = [r for manifest in manifests for r in iter_manifest(manifest, data_cfg.modalities)
            if r.modality in modalities and r.source.endswith(":val")]
    rng = np.random.default_rng(seed)
    chosen: dict[int, Any] = {}
    for it in items:
        fits = [i for i, r in enumerate(rows) if r.modality == it.modality and holds_request(r.findings, it.present)]
        for i in sorted(rng.permutation(fits)[:per_request].tolist()):
            chosen.setdefault(i, rows[i])
    transform = RecordTransform(data_cfg.model_copy(update={"image_size": size}), as_tensor=False)
    return [EvalCase(transform.image(load_row(r, transform.modalities)["image"], r.modality), r.text, r.modality, r.findings,
                     complete_truth=False) for _, r in sorted(chosen.items())]


def choose_prompts(cases: list[EvalCase], k: int, seed: int) -> list[EvalCase]:
    """``k`` cases of one modality, round-robin over finding labels so every label is asked for."""
    by_label: dict[str, list[EvalCase]] = defaultdict(list)
    for c in cases:
        by_label[c.label].append(c)
    rng = np.random.default_rng(seed)
    queues = {label: [group[i] for i in rng.permutation(len(group))] for label, group in sorted(by_label.items())}
    chosen: list[EvalCase] = []
    while len(chosen) < k and any(queues.values()):
        for label in list(queues):
            if queues[label] and len(chosen) < k:
                chosen.append(queues[label].pop(0))
    return chosen


def expected_matrix(cases: list[EvalCase], labels: list[str]) -> np.ndarray:
    """(N, L): 1 present, 0 absent (stated, or unlisted under complete truth), NaN unknown."""
    out = np.full((len(cases), len(labels)), np.nan)
    index = {name: j for j, name in enumerate(labels)}
    for i, case in enumerate(cases):
        if case.complete_truth:
            out[i] = 0.0
        for f in case.findings:
            if f["name"] in index:
                out[i, index[f["name"]]] = 1.0 if f.get("present") else 0.0
    return out


# -- judges ----------------------------------------------------------------------------------
@dataclass
class Judges:
    evaluator: dict[str, Any]  # modality -> held-out FindingClassifier
    alignment: Any | None = None
    selector: Any | None = None
    inception: Any | None = None  # InceptionFeatures, or an InceptionStatus saying why not
    missing: dict[str, str] = field(default_factory=dict)  # judge -> why it is absent


def load_judges(cfg: JudgesConfig, modalities: list[str], device: str = "cpu") -> Judges:
    """The evaluator classifiers (required), and the alignment model, selector and Inception where
    they exist; a missing optional judge leaves its columns as n/a with the reason."""
    from .classifiers import load_classifier
    from .inception import load_inception

    evaluator = {}
    for modality in modalities:
        folder = Path(cfg.classifier.out) / "evaluator" / modality
        evaluator[modality] = load_classifier(folder, role="evaluator", device=device)
    judges = Judges(evaluator=evaluator, inception=load_inception(cfg.eval, device=device))
    try:
        from .alignment import load_alignment

        judges.alignment = load_alignment(cfg.alignment.out, device=device)
    except FileNotFoundError as exc:
        judges.missing["alignment"] = str(exc)
    if judges.alignment is not None:
        try:
            from .selector import load_selector

            judges.selector = load_selector(cfg.selector.out, judges.alignment, device=device)
        except FileNotFoundError as exc:
            judges.missing["selector"] = str(exc)
    return judges


# -- measuring one side (real or generated) ---------------------------------------------------
def requested_shown_by_finding(shown: np.ndarray, present: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per finding requested at least once: ``{"asked": images asking for it, "shown": the share of them showing it}``
    (``shown``, ``present``: (N, L) booleans). Which findings a generator draws, and which it never does."""
    out = {}
    for j, name in enumerate(labels):
        asked = int(present[:, j].sum())
        if asked:
            out[name] = {"asked": asked, "shown": float((shown[:, j] & present[:, j]).sum() / asked)}
    return out


def _batched(fn, images: torch.Tensor, *args, batch: int = 128):
    parts = [fn(images[i:i + batch], *(a[i:i + batch] for a in args)) for i in range(0, images.shape[0], batch)]
    return np.concatenate([np.asarray(p) for p in parts])


def measure(images: torch.Tensor, texts: list[str], modality: str, groups: list[str], expected: np.ndarray,
            reference_feats: np.ndarray, train_feats: np.ndarray | None, judges: Judges, cfg: EvalConfig,
            reference_images: torch.Tensor, train_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Every measure of one set of images of one modality. ``groups`` says which images share a
    prompt (generated) or a finding label (real) for the MS-SSIM diversity."""
    evaluator = judges.evaluator[modality]
    n = images.shape[0]
    feats = _batched(evaluator.features, images)
    row: dict[str, Any] = {"n": n}
    row["fd"] = metrics.frechet_distance(feats, reference_feats)
    row["kid"], row["kid_std"] = metrics.kid(feats, reference_feats, subsets=100, subset_size=min(n, len(reference_feats), 1000), seed=cfg.seed)
    if judges.inception is not None and not isinstance(judges.inception, str) and hasattr(judges.inception, "features"):
        from .inception import inception_scores

        scores = inception_scores(reference_images, images, judges.inception, cfg)
        row["fid_inception"], row["kid_inception"] = scores.fid, scores.kid_mean
    else:
        row["fid_inception"] = row["kid_inception"] = None
        row["inception_status"] = str(judges.inception)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    multi = {g: images[idx] for g, idx in by_group.items() if len(idx) >= 2}
    if multi:
        row |= {"ms_ssim": metrics.diversity_summary(multi)["ms_ssim"]}
    else:
        row["ms_ssim"] = None
    probs = _batched(evaluator.predict_proba, images)
    # a finding counts as shown from its label's operating point (fit on the evaluator's calibration split; 0.5 without one)
    accuracy = metrics.finding_accuracy(probs, expected, evaluator.thresholds)
    row["finding_accuracy"] = accuracy["accuracy"]
    row["all_findings_agree"] = accuracy["all_agree"]
    present = expected == 1
    shown = evaluator.shown(probs)
    row["requested_shown"] = float((shown & present).sum() / present.sum()) if present.any() else None
    asks = present.any(axis=1)  # images whose prompt requests at least one finding
    row["all_requested_shown"] = float((shown | ~present).all(axis=1)[asks].mean()) if asks.any() else None
    row["requested_shown_by_finding"] = requested_shown_by_finding(shown, present, evaluator.label_names)
    if judges.alignment is not None:
        row["clip_score"] = float(np.mean(judges.alignment.clip_score(images, texts)))
    else:
        row["clip_score"] = None
    if judges.selector is not None:
        quality = judges.selector.quality(images, texts, [modality] * n)
        row["selector_quality"] = float(np.mean(quality))
        row["selector_pass"] = float(np.mean(quality >= judges.selector.threshold))
    else:
        row["selector_quality"] = row["selector_pass"] = None
    # memorisation in pixel space (SSIM to the nearest training image): cosine similarity of the
    # classifier's post-ReLU features is near 1 for every pair of one modality and cannot tell a
    # copy from a new image; it is kept as a second column
    if train_images is not None and len(train_images):
        mem = metrics.pixel_memorisation(images, train_images, cfg.memorisation_pixel_threshold, cfg.memorisation_pixel_size)
        row["nearest_train_ssim"] = mem["mean_max_ssim"]
        row["memorised_share"] = mem["share_memorised"]
        # the distribution, not only its mean: these may be patients, and a tail near the threshold matters
        row["nearest_train_ssim_quantiles"] = {q: float(np.quantile(mem["max_ssim"], v)) for q, v in
                                               (("p5", 0.05), ("p50", 0.5), ("p95", 0.95), ("max", 1.0))}
        row["memorisation_threshold"] = float(mem["threshold"])
    else:
        row["nearest_train_ssim"] = row["memorised_share"] = row["nearest_train_ssim_quantiles"] = None
    if train_feats is not None and len(train_feats):
        row["nearest_train_feature_cosine"] = metrics.memorisation(feats, train_feats, cfg.memorisation_threshold)["mean_max_similarity"]
    else:
        row["nearest_train_feature_cosine"] = None
    stats = metrics.image_stats(images)
    for key in ("contrast", "sharpness", "entropy"):
        row[key] = float(np.nanmean(stats[key]))
    checks = metrics.quality_checks(images, [modality] * n)
    row["quality_ok"] = float(np.mean([c["ok"] for c in checks]))
    return row


# -- the whole evaluation ----------------------------------------------------------------------
COLUMNS = [  # (key, header, digits); None cells print as n/a
    ("n", "n", 0), ("fd", "FD (synthmed features) ↓", 2), ("kid", "KID (synthmed) ↓", 4),
    ("fid_inception", "FID (Inception) ↓", 2), ("ms_ssim", "MS-SSIM within prompt ↓", 3),
    ("clip_score", "CLIP score ↑", 3), ("finding_accuracy", "finding acc. (evaluator) ↑", 3),
    ("all_findings_agree", "all findings agree ↑", 3), ("requested_shown", "requested shown ↑", 3),
    ("all_requested_shown", "every requested shown ↑", 3),
    ("nearest_train_ssim", "nearest-train SSIM", 3), ("memorised_share", "memorised", 3),
    ("selector_quality", "selector quality", 3), ("contrast", "contrast", 3), ("sharpness", "sharpness", 1),
    ("entropy", "entropy", 2), ("quality_ok", "quality ok", 3),
]


def evaluate(model, cases: list[EvalCase], judges: Judges, cfg: EvalConfig, train_images: dict[str, torch.Tensor] | None = None,
             channels: dict[str, int] | None = None, sample_dir: Path | None = None, progress: bool = True,
             batch_size: int = 8) -> dict[str, Any]:
    """Generate for each modality's prompts and measure generated against real. Returns
    ``{"modalities": {m: {"real": row, "generated": row, "prompts": [...]}}, "seconds": ...}``."""
    from tqdm import tqdm

    from generator.sampling import sample

    started = time.perf_counter()
    by_modality: dict[str, list[EvalCase]] = defaultdict(list)
    for c in cases:
        by_modality[c.modality].append(c)
    unknown = sorted(set(by_modality) - set(model.modalities))
    if unknown:
        raise UserError(f"the model has no embedding for {', '.join(unknown)}; it knows {', '.join(model.modalities)}")
    missing = sorted(set(by_modality) - set(judges.evaluator))
    if missing:
        raise UserError(f"no evaluator classifier for {', '.join(missing)}; train one with `synthmed judges train classifier`")
    total = sum(min(cfg.prompts_per_modality, len(v)) * cfg.n_per_prompt for v in by_modality.values())
    bar = tqdm(total=total, desc="eval: generating", unit=" img", disable=not progress)
    result: dict[str, Any] = {"modalities": {}}
    for modality, group in by_modality.items():
        evaluator = judges.evaluator[modality]
        labels = list(evaluator.label_names)
        real = as_image_batch([c.image for c in group])
        half_a, half_b = real[0::2], real[1::2]
        ref_feats = _batched(evaluator.features, half_b)
        train_set = train_images.get(modality) if train_images else None
        train_feats = _batched(evaluator.features, train_set) if train_set is not None else None
        prompts = choose_prompts(group, cfg.prompts_per_modality, cfg.seed)
        texts = [p.text for p in prompts for _ in range(cfg.n_per_prompt)]
        gen_cases = [p for p in prompts for _ in range(cfg.n_per_prompt)]
        generated = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                out = sample(model, chunk, [modality] * len(chunk), guidance=cfg.guidance, steps=cfg.steps,
                             seed=cfg.seed + start, sampler=cfg.sampler,
                             findings=[c.findings for c in gen_cases[start:start + batch_size]])
                generated.append(out.images.float().cpu())
                bar.update(len(chunk))
        generated = torch.cat(generated)
        real_a_cases = group[0::2]
        real_row = measure(half_a, [c.text for c in real_a_cases], modality, [c.label for c in real_a_cases],
                           expected_matrix(real_a_cases, labels), ref_feats, train_feats, judges, cfg, half_b, train_set)
        gen_row = measure(generated, texts, modality, [str(i // cfg.n_per_prompt) for i in range(len(texts))],
                          expected_matrix(gen_cases, labels), ref_feats, train_feats, judges, cfg, half_b, train_set)
        result["modalities"][modality] = {"real": real_row, "generated": gen_row,
                                          "prompts": [{"text": p.text, "label": p.label} for p in prompts]}
        if sample_dir is not None:
            _save_grid(generated, prompts, cfg.n_per_prompt, modality, channels or {}, sample_dir)
    bar.close()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["judges_missing"] = judges.missing
    return result


def _save_grid(images: torch.Tensor, prompts, per_prompt: int, modality: str, channels: dict[str, int], folder: Path) -> None:
    from generator.sampling import SampleOutput
    from generator.trainers import save_grid

    tiles = SampleOutput(images).to_uint8([modality] * len(images), channels)
    save_grid(tiles, Path(folder) / f"{modality}.png", per_prompt * 4)


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if digits == 0:
        return str(int(value))
    return f"{value:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    header = ["modality", "images", *[h for _, h, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for modality, sides in result["modalities"].items():
        for side in ("real", "generated"):
            row = sides[side]
            lines.append("| " + " | ".join([modality, side, *[_cell(row.get(k), d) for k, _, d in COLUMNS]]) + " |")
    notes = []
    first = next(iter(result["modalities"].values()), None)
    if first and first["generated"].get("inception_status"):
        notes.append(f"FID (Inception): {first['generated']['inception_status']}")
    for judge, why in result.get("judges_missing", {}).items():
        notes.append(f"{judge}: not available ({why})")
    notes.append("memorised: share of images whose nearest training image (SSIM on 32 px luminance) is above "
                 "judges.eval.memorisation_pixel_threshold; the real row shows what new images, never trained on, score")
    spread = [f"{m} {side} {' / '.join(f'{v:.3f}' for v in q.values())}" for m, sides in result["modalities"].items()
              for side in ("real", "generated") if (q := sides[side].get("nearest_train_ssim_quantiles"))]
    if spread:
        threshold = next(sides[side]["memorisation_threshold"] for sides in result["modalities"].values() for side in ("real", "generated")
                         if sides[side].get("nearest_train_ssim_quantiles"))
        notes.append(f"nearest-train SSIM, p5 / p50 / p95 / max (memorised above {threshold:.2f}): " + "; ".join(spread))
    notes.append("FD/KID: synthmed features = the held-out evaluator classifier's penultimate layer; the real row's FD is "
                 "between two halves of the reference set (the floor at this sample size)")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def to_json(result: dict[str, Any]) -> str:
    def default(o):
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(result, indent=2, default=default, allow_nan=True)


__all__ = ["EvalCase", "Judges", "choose_prompts", "evaluate", "holds_request", "request_cases", "expected_matrix", "load_judges", "manifest_cases", "model_training_images",
           "read_training_images",
           "markdown_table", "measure", "phantom_cases"]


# ---------------------------------------------------------------------------------------------
# The generator's training images, for the memorisation check


def model_training_images(model_dir: Path, size: int, cfg, progress: bool = True, manifests: list[str] | None = None) -> dict:
    """The generator's training images per modality, for the memorisation check: ``manifests`` when
    given, else the manifests its metadata names, or, for a model trained on phantoms, that phantom
    set (drawn again if absent)."""
    meta_path = model_dir / "metadata.json"
    manifests = list(manifests or [])
    if manifests:
        missing = [m for m in manifests if not Path(m).is_file()]
        if missing:
            raise FileNotFoundError(f"--train-data manifest {missing[0]} not found")
    elif meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        manifests = [m for m in meta.get("manifests", []) if Path(m).is_file()]
        # where its training rows are: the manifests it was trained from, else (another folder, a fresh clone) the profile's
        trained = [m for m in (meta.get("config") or {}).get("data", {}).get("manifests", []) if Path(m).is_file()] or \
            [m for m in cfg.data.manifests if Path(m).is_file()]
        if not manifests and trained and meta.get("data"):
            # trained on a profile's manifests (--config real): the rows of the splits it trained on, by their source tags
            return read_training_images(trained, cfg, size, sources=set(meta["data"]))
        if not manifests and meta.get("data") and all(str(d).startswith("phantom") for d in meta["data"]):
            # trained on phantoms: draw the same set again (seeded, so identical) where it is not on disk
            from generator.config import PhantomConfig

            pc = PhantomConfig.model_validate(meta["config"]["phantoms"]) if "config" in meta else cfg.phantoms
            from generator.phantoms.dataset import phantom_manifest

            manifests = [phantom_manifest(pc, size, progress)]
    return read_training_images(manifests, cfg, size)


def read_training_images(manifests: list[str], cfg, size: int, modalities: list[str] | None = None, limit: int | None = None,
                         first_wins: bool = False, sources: set[str] | None = None) -> dict:
    """Images of ``manifests`` per modality at ``size`` pixels, (N, 3, size, size) in [-1, 1], for the
    memorisation check: every modality (or ``modalities``), at most ``limit`` images each; with
    ``first_wins`` a modality is taken from the first manifest that has it, else from all of them; with
    ``sources`` only rows of those source tags (a model's training splits, e.g. ``brain_tumor_mri:train``)."""
    from generator.data import iter_manifest
    from generator.data.sources import load_row
    from generator.data.transforms import RecordTransform
    from rlhf.scorers import as_image_batch

    transform = RecordTransform(cfg.data.model_copy(update={"image_size": size}), as_tensor=False)
    by_modality: dict[str, list] = {}
    for manifest in manifests:
        done = set(by_modality) if first_wins else set()
        for row in iter_manifest(manifest, cfg.data.modalities):
            if row.modality in done or (modalities is not None and row.modality not in modalities) or \
                    (sources is not None and row.source not in sources):
                continue
            images = by_modality.setdefault(row.modality, [])
            if limit is None or len(images) < limit:
                images.append(transform.image(load_row(row, transform.modalities)["image"], row.modality))
    return {m: as_image_batch(images) for m, images in by_modality.items()} if by_modality else {}
