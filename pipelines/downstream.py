"""`synthmed bench downstream`: does synthetic data help a classifier trained on it?

The project's finding classifier (:func:`rlhf.classifiers.fit_classifier`, the ``evaluator`` role's
architecture, as `synthmed judges train classifier` trains it) is trained three times per modality, with
the same settings (``judges.classifier``):

- ``real``: the training manifest (``--train``; default ``judges.classifier.data``, else the classifiers'
  own phantom set);
- ``real+synthetic``: those rows and a synthetic set balanced over the modality's labels (``N`` images
  per label and ``N`` normal studies), drawn by :func:`pipelines.synthesize.synthesize` from a spec written
  here (a YAML mix where every modality has a phantom catalogue, else a CSV of one sentence per label),
  with the training manifest as the memorisation gate's reference;
- ``synthetic``: the synthetic set alone.

Each is judged on the held-out test manifest: AUROC per label (:func:`rlhf.metrics.auroc`), macro over the
labels that every arm predicts and that have both classes among the test images, with a 95% percentile
bootstrap interval over test images (``bootstrap`` resamples, seeded). ``--out`` keeps the spec, the
synthetic set (reused by a later run of the same spec), ``table.md`` and ``metadata.json``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from generator.errors import UserError
from generator.fileio import write_json_atomic, write_text_atomic

log = logging.getLogger("synthmed.downstream")

ARMS = ("real", "real+synthetic", "synthetic")
ROLE = "evaluator"  # whose architecture, seed and split salt the three arms share


def default_train(cfg, progress: bool = True) -> list[str]:
    """``judges.classifier.data``, else the classifiers' own phantom set (drawn when absent), as `synthmed judges train classifier` finds them."""
    cc = cfg.judges.classifier
    if cc.data:
        return list(cc.data)
    from pipelines.commands.common import classifier_phantoms

    return [classifier_phantoms(cfg, progress)]


def _rows(sources: Sequence[str], what: str, modalities, split: str | None = None) -> list:
    from generator.data import split_of
    from rlhf.classifiers import load_rows

    for source in sources:
        if not Path(source).is_file():
            raise UserError(f"{what} manifest {source} not found; give a manifest CSV (path,text,modality,findings)")
    rows = load_rows(sources, modalities)
    if split:
        found = sorted({split_of(r) for r in rows})
        rows = [r for r in rows if split_of(r) == split]
        if not rows:
            raise UserError(f"{what} manifest {', '.join(sources)} holds no rows of split '{split}' (their sources name: "
                            f"{', '.join(f or '(none)' for f in found)}); give a split they have, or none")
    if not rows:
        raise UserError(f"{what} manifest {', '.join(sources)} holds no rows")
    return rows


def encode_test(train_rows: Sequence, test_rows: Sequence, cc, modalities) -> dict[str, Any]:
    """modality -> the test images encoded with the labels the real training rows teach, kept to the labels that have
    both classes among them (:class:`rlhf.classifiers.LabelledImages`, ``label_names``)."""
    from rlhf.classifiers import LabelledImages, annotated_labels, encode_rows, is_phantom_row, label_space

    test_modalities = {r.modality for r in test_rows}
    shared = [m for m in dict.fromkeys(r.modality for r in train_rows) if m in test_modalities]
    if not shared:
        raise UserError(f"the training manifest ({', '.join(sorted({r.modality for r in train_rows}))}) and the test manifest "
                        f"({', '.join(sorted(test_modalities))}) share no modality")
    encoded = {}
    for modality in shared:
        labels = label_space(modality, train_rows, cc.labels, cc.min_positives)  # what the real arm's classifier learns
        own = [r for r in test_rows if r.modality == modality]
        data = encode_rows(own, labels, cc.image_size, annotated_labels(own), modalities, closed_world=all(is_phantom_row(r) for r in own))
        known, positive = data.known.numpy(), data.targets.numpy() > 0.5
        both = [j for j in range(len(labels)) if (known[:, j] & positive[:, j]).any() and (known[:, j] & ~positive[:, j]).any()]
        if not both:
            raise UserError(f"{modality}: no label of the training rows ({', '.join(labels)}) has both positive and negative "
                            "images in the test manifest; give a test manifest with those findings")
        encoded[modality] = (LabelledImages(data.images, data.targets[:, both], data.known[:, both], data.keys), [labels[j] for j in both])
    return encoded


def write_spec(folder: Path, labels: Mapping[str, Sequence[str]], per_label: int, mix: bool = True) -> Path:
    """A spec of ``per_label`` images per label and ``per_label`` normal studies per modality: a YAML mix when ``mix`` and
    every label is a finding of its modality's phantom catalogue, else a CSV with one sentence per label (a generator
    trained on reports, e.g. the real profile, whose labels the phantoms do not have: synthesize words them as its
    captions do)."""
    from generator.phantoms import PHANTOM_MODULES, get_spec

    folder.mkdir(parents=True, exist_ok=True)
    if mix and all(m in PHANTOM_MODULES and set(names) <= set(get_spec(m).findings) for m, names in labels.items()):
        import yaml

        mix = {"modalities": {m: {"findings": {n: per_label for n in names}, "normal": per_label} for m, names in labels.items()}}
        path = folder / "spec.yaml"
        write_text_atomic(path, yaml.safe_dump(mix, sort_keys=False))
        return path
    path = folder / "spec.csv"
    lines = [["text", "modality", "n"]]
    for m, names in labels.items():
        lines += [[f"{n.replace('_', ' ').capitalize()}.", m, per_label] for n in names] + [["Normal study.", m, per_label]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    return path


def bootstrap_auroc(probs: np.ndarray, targets: np.ndarray, rounds: int, seed: int) -> tuple[float, float, float, dict[str, float]]:
    """Macro AUROC over the columns of ``probs`` / ``targets`` ``(N, L)`` (NaN target: unknown), its 95% percentile bootstrap
    interval over rows, and the per-column AUROC."""
    from rlhf.metrics import auroc

    def macro(index: np.ndarray) -> float:
        values = [auroc(probs[index, j], targets[index, j]) for j in range(probs.shape[1])]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    everyone = np.arange(len(probs))
    point = macro(everyone)
    rng = np.random.default_rng(seed)
    draws = np.array([macro(rng.integers(0, len(probs), len(probs))) for _ in range(rounds)])
    draws = draws[np.isfinite(draws)]
    lo, hi = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if draws.size else (float("nan"),) * 2
    per_label = [auroc(probs[:, j], targets[:, j]) for j in range(probs.shape[1])]
    return point, lo, hi, per_label


def _judge(classifier, data, labels: Sequence[str], common: Sequence[str], rounds: int, seed: int) -> dict[str, Any]:
    """AUROC of one trained classifier on the encoded test images (columns ``labels``), over the ``common`` labels."""
    targets = np.where(data.known.numpy(), data.targets.numpy(), np.nan)[:, [labels.index(n) for n in common]]
    probs = classifier.predict_proba(data.as_float(slice(None)))[:, [classifier.label_names.index(n) for n in common]]
    point, lo, hi, per_label = bootstrap_auroc(probs, targets, rounds, seed)
    return {"auroc": point, "ci95": [lo, hi], "per_label": dict(zip(common, per_label)), "test_images": len(data)}


def run_downstream(
    cfg,
    test: str | Sequence[str],
    train: Sequence[str] | None = None,
    synthetic_per_label: int = 20,
    out: str | os.PathLike | None = None,
    bootstrap: int = 1000,
    progress: bool = True,
    train_split: str | None = None,
    test_split: str | None = None,
) -> dict[str, Any]:
    """Train the three arms per modality and judge them on ``test`` (one or more manifests); the result (also
    ``<out>/metadata.json``). ``train_split`` / ``test_split`` keep only the rows whose source names that split (e.g.
    the ``train`` and ``val`` rows of the same `synthmed data meddata` manifests)."""
    from tqdm import tqdm

    from rlhf.classifiers import LabelledImages, fit_classifier

    from .synthesize import label_names, synthesize

    if synthetic_per_label < 1:
        raise UserError(f"--synthetic-per-label must be at least 1, got {synthetic_per_label}")
    started = time.perf_counter()
    cc, modalities = cfg.judges.classifier, cfg.data.modalities
    test = [test] if isinstance(test, (str, os.PathLike)) else list(test)
    test_rows = _rows(test, "test", modalities, test_split)
    train = list(train) if train else default_train(cfg, progress)
    train_rows = _rows(train, "training", modalities, train_split)
    shared = {r.path for r in train_rows} & {r.path for r in test_rows}
    if shared:
        raise UserError(f"the test manifest shares {len(shared)} image(s) with the training rows (e.g. {min(shared)}); "
                        "give a held-out test manifest (or --train without those images)")
    encoded = encode_test(train_rows, test_rows, cc, modalities)
    # the synthetic set asks only for what a request may name (the profile's reward classifier's labels): a label the
    # real arm learns beyond those is judged in no arm (the synthetic ones cannot learn it), and said so
    not_drawn = {}
    for modality, (data, labels) in list(encoded.items()):
        askable = label_names(modality, cfg)
        if askable is not None and any(n not in askable for n in labels):
            not_drawn[modality] = [n for n in labels if n not in askable]
            keep = [j for j, n in enumerate(labels) if n in askable]
            if keep:
                encoded[modality] = (LabelledImages(data.images, data.targets[:, keep], data.known[:, keep], data.keys), [labels[j] for j in keep])
            else:
                del encoded[modality]
    if not encoded:
        raise UserError(f"no label of the training rows can be asked of the generator ({not_drawn}): nothing to compare")
    plan = {m: labels for m, (_, labels) in encoded.items()}
    out = Path(out) if out is not None else Path("runs") / f"bench-downstream-{time.strftime('%Y%m%d-%H%M%S')}"
    from generator.data.wording import read_wording
    from generator.paths import shipped

    spec = write_spec(out, plan, synthetic_per_label, mix=read_wording(shipped(cfg.train.out)) is None)
    synthetic_dir = out / "synthetic"
    drawn = synthesize(cfg, spec, synthetic_dir, train_data=train, resume=(synthetic_dir / "synthesize.json").is_file(),
                       progress=progress)
    synthetic_rows = _rows([drawn["manifest"]], "synthetic", modalities)

    arms = {"real": train_rows, "real+synthetic": train_rows + synthetic_rows, "synthetic": synthetic_rows}
    result: dict[str, Any] = {arm: {} for arm in ARMS}
    jobs = [(m, arm) for m in plan for arm in ARMS]
    bar = tqdm(jobs, desc="downstream", unit=" classifier", disable=not progress)
    trained: dict[tuple[str, str], Any] = {}
    for modality, arm in bar:
        bar.set_postfix_str(f"{modality} {arm}")
        classifier, meta = fit_classifier(cc, ROLE, modality, arms[arm], progress=False, modalities=modalities,
                                          data_description=f"bench downstream arm {arm}")
        trained[modality, arm] = classifier
        result[arm][modality] = {"train_images": sum(1 for r in arms[arm] if r.modality == modality), "seconds": meta["seconds"]}
    for modality, (data, labels) in encoded.items():
        common = [n for n in labels if all(n in trained[modality, arm].label_names for arm in ARMS)]
        if not common:
            raise UserError(f"{modality}: the three arms' classifiers share no label the test manifest can judge "
                            f"({', '.join(labels)}); the synthetic set holds none of them")
        plan[modality] = common
        for arm in ARMS:
            result[arm][modality] |= _judge(trained[modality, arm], data, labels, common, bootstrap, cc.evaluator_seed)

    metadata = {
        "kind": "synthmed bench downstream", "arms": result, "labels": plan, "not_drawn": not_drawn, "test": [str(t) for t in test], "train": [str(t) for t in train],
        "splits": {"train": train_split, "test": test_split},
        "synthetic": {"spec": str(spec), "per_label": synthetic_per_label, "folder": str(synthetic_dir), "images": drawn["accepted"],
                      "acceptance_rate": drawn["acceptance_rate"]},
        "classifier": {"role": ROLE, "epochs": cc.epochs, "image_size": cc.image_size, "batch_size": cc.batch_size, "lr": cc.lr},
        "bootstrap": {"resamples": bootstrap, "interval": "95% percentile, test images resampled", "seed": cc.evaluator_seed},
        "seconds": round(time.perf_counter() - started, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.model_dump(mode="json"), "out": str(out),
    }
    write_text_atomic(out / "table.md", markdown_table(metadata) + "\n")
    write_json_atomic(out / "metadata.json", metadata)
    return metadata


def markdown_table(result: Mapping[str, Any]) -> str:
    """One row per modality, one column per arm: macro AUROC [95% interval] (training images)."""
    arms = result["arms"]
    lines = ["| modality | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for modality in result["labels"]:
        cells = []
        for arm in ARMS:
            r = arms[arm][modality]
            cells.append(f"{r['auroc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] (n={r['train_images']})")
        lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    for modality, names in (result.get("not_drawn") or {}).items():
        lines.append(f"\n{modality}: not judged ({', '.join(names)}): the real arm learns them, but no request may ask the generator "
                     "for them (the profile's reward classifier does not know them)")
    return "\n".join(lines)


__all__ = ["ARMS", "bootstrap_auroc", "default_train", "encode_test", "markdown_table", "run_downstream", "write_spec"]
