"""Training the finding classifiers: one (fit_classifier, train_classifier) or every role and modality (train_all)."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from generator.config import ModalityConfig, default_modalities
from generator.data import ManifestRow, source_rows
from generator.devices import resolve_device
from generator.errors import UserError
from generator.phantoms import NORMAL, PHANTOM_MODULES, compatible_pairs, get_spec, make_phantom
from generator.phantoms.dataset import study_seed

from ..config import ClassifierConfig
from .calibration import classification_metrics, fit_operating_points, fit_temperature, masked_nll
from .data import LabelledImages, annotated_labels, augment_batch, encode_rows, is_phantom_row, label_counts, label_space, split_rows
from .layout import ROLES, VERSION
from .model import FindingClassifier, save_classifier, train_command
from .networks import build_network, role_settings

log = logging.getLogger(__name__)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 1 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def _logits_of(network: nn.Module, data: LabelledImages, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    network.eval()
    out = [network(data.as_float(slice(i, i + batch_size)).to(device)).float().cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, network.head.out_features))


def _default_command(cfg: ClassifierConfig, role: str, modality: str, out: Path | None) -> str:
    return train_command(role, modality, out or cfg.out, cfg.data or ["<manifest>"])


def fit_classifier(
    cfg: ClassifierConfig,
    role: str,
    modality: str,
    rows: Sequence[ManifestRow],
    progress: bool = True,
    command: str | None = None,
    benchmark_rows: Sequence[ManifestRow] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
    data_description: Any = None,
    out: str | os.PathLike | None = None,
) -> tuple[FindingClassifier, dict[str, Any]]:
    """Train, calibrate and evaluate the ``role`` classifier of ``modality`` on ``rows`` (others ignored).

    ``benchmark_rows`` (e.g. fresh phantoms from :func:`phantom_benchmark_rows`) are an extra test
    set that no split has seen. Returns the classifier and its metadata (metrics, split sizes,
    seconds, ...); ``out`` only goes into the recorded command. Saves nothing: see :func:`train_classifier`."""
    settings = role_settings(cfg, role)
    judged_by = [r for r in ROLES if r != role and "evaluator" in (r, role)]  # the evaluator must differ from every other role
    for other in judged_by:
        if settings["arch"] == role_settings(cfg, other)["arch"]:
            log.warning("%s and %s classifiers share the architecture %r: they are less independent", role, other, settings["arch"])
    start, start_cpu = time.perf_counter(), time.process_time()
    own = [r for r in rows if r.modality == modality]
    if not own:
        present = sorted({r.modality for r in rows})
        raise UserError(f"no {modality} rows to train on; the rows hold: {', '.join(present) or 'nothing'}")
    label_names = label_space(modality, own, cfg.labels, cfg.min_positives)
    closed_world = all(is_phantom_row(r) for r in own)
    splits = split_rows(own, role, settings["seed"], cfg.val_fraction)
    sizes = {k: len(v) for k, v in splits.items()}
    if min(sizes.values()) == 0:
        raise UserError(
            f"{modality}: {len(own)} rows split into {sizes} (val_fraction {cfg.val_fraction}); every split needs "
            "images: give more rows or a larger val_fraction"
        )
    annotated = annotated_labels(own)
    data = {k: encode_rows(v, label_names, cfg.image_size, annotated, modalities, closed_world) for k, v in splits.items()}

    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, cfg.num_threads))
    try:
        torch.manual_seed(settings["seed"])
        network = build_network(settings["arch"], len(label_names), settings["widths"], settings["blocks"], settings["patch"],
                                settings["pool"]).to(device)
        optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train = data["train"]
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        warmup = max(1, min(50, total // 20))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
        generator = torch.Generator().manual_seed(settings["seed"])
        bar = tqdm(total=total, desc=f"classifier {role}/{modality}", unit=" step", disable=not progress, leave=False)
        losses: list[float] = []
        for _ in range(cfg.epochs):
            network.train()
            order = torch.randperm(len(train), generator=generator)
            for i in range(0, len(train), cfg.batch_size):
                index = order[i : i + cfg.batch_size]
                x = train.as_float(index)
                if cfg.augment:
                    x = augment_batch(x, generator)
                logits = network(x.to(device))
                known = train.known[index].to(device)
                loss_all = F.binary_cross_entropy_with_logits(logits, train.targets[index].to(device), reduction="none")
                loss = (loss_all * known).sum() / known.sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.3f}")
        bar.close()

        cal = data["calibration"]
        cal_logits = _logits_of(network, cal, device)
        temperature = fit_temperature(cal_logits, cal.targets, cal.known)
        thresholds = fit_operating_points(torch.sigmoid(cal_logits / temperature).numpy(), cal.targets.numpy(), cal.known.numpy(),
                                          cfg.operating_max_fpr)
        test_logits = _logits_of(network, data["test"], device)
        metrics: dict[str, Any] = {
            "test": classification_metrics(test_logits, data["test"], label_names, temperature, thresholds),
            "calibration": {
                "images": sizes["calibration"],
                "nll_before": masked_nll(cal_logits, data["calibration"].targets, data["calibration"].known),
                "nll_after": masked_nll(cal_logits, data["calibration"].targets, data["calibration"].known, temperature),
            },
            "train_loss_last_epoch": float(np.mean(losses[-steps_per_epoch:])),
        }
        if benchmark_rows:
            bench_own = [r for r in benchmark_rows if r.modality == modality and pair_of(r) is None]
            bench = encode_rows(bench_own, label_names, cfg.image_size, annotated_labels(bench_own), modalities, closed_world=True)
            metrics["benchmark"] = classification_metrics(_logits_of(network, bench, device), bench, label_names, temperature, thresholds)
            pairs = [r for r in benchmark_rows if r.modality == modality and pair_of(r) is not None]
            if pairs:
                encoded = encode_rows(pairs, label_names, cfg.image_size, annotated_labels(pairs), modalities, closed_world=True)
                probs = torch.sigmoid(_logits_of(network, encoded, device) / temperature).numpy()
                metrics["benchmark_pairs"] = pair_metrics(probs, [pair_of(r) for r in pairs], label_names, thresholds)
    finally:
        torch.set_num_threads(threads)

    classifier = FindingClassifier(
        network.cpu(), label_names, cfg.image_size, temperature, role, modality, settings, thresholds=thresholds)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    metadata = {
        "kind": "synthmed finding classifier",
        "version": VERSION,
        "role": role,
        "modality": modality,
        "arch": settings["arch"],
        "widths": settings["widths"],
        "blocks": settings["blocks"],
        "patch": settings["patch"],
        "pool": settings["pool"],
        "parameters": sum(p.numel() for p in network.parameters()),
        "seed": settings["seed"],
        "label_names": label_names,
        "label_space": "phantom" if closed_world and cfg.labels != "manifest" else cfg.labels,
        "labels_dropped": {n: c for n, c in label_counts(modality, own).items() if n not in label_names},  # too few positives
        "min_positives": cfg.min_positives,
        "data": data_description if data_description is not None else (list(cfg.data) or "rows given in-process"),
        "datasets": sorted(annotated),
        "split": {"sizes": sizes, "val_fraction": cfg.val_fraction, "salt": f"{role}/{settings['seed']}", "key": "last four path components",
                  "held_out": "rows tagged :val or :test by their dataset (by patient where it knows them); untagged rows by the salted hash"},
        "epochs": cfg.epochs,
        "steps": total,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "augment": cfg.augment,
        "image_size": cfg.image_size,
        "temperature": temperature,
        "temperature_scope": "one per model",
        "thresholds": dict(zip(label_names, map(float, thresholds))),
        "operating_max_fpr": cfg.operating_max_fpr,
        "metrics": metrics,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: the compute, whatever else shares the machine
        "device": str(device),
        "threads": min(threads, cfg.num_threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or _default_command(cfg, role, modality, Path(out) if out is not None else None),
        "config": cfg.model_dump(),
    }
    log.info("classifier %s/%s: test AUROC %.3f, ECE %.3f -> %.3f, T=%.2f, %.0f s", role, modality,
             metrics["test"]["auroc_macro"], metrics["test"]["ece_before"], metrics["test"]["ece_after"], temperature, seconds)
    return classifier, metadata


def train_classifier(
    cfg: ClassifierConfig,
    role: str,
    modality: str,
    rows: Sequence[ManifestRow],
    out: str | os.PathLike | None = None,
    progress: bool = True,
    command: str | None = None,
    benchmark_rows: Sequence[ManifestRow] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
    data_description: Any = None,
) -> dict[str, Any]:
    """:func:`fit_classifier`, then save to ``<out>/<role>/<modality>/`` (``out`` defaults to cfg.out).

    Returns the metadata written beside the weights, with ``folder`` added."""
    out = Path(out if out is not None else cfg.out)
    classifier, metadata = fit_classifier(cfg, role, modality, rows, progress, command, benchmark_rows, modalities, data_description, out)
    folder = save_classifier(classifier, out / role / modality, metadata)
    return {**metadata, "folder": str(folder)}


PAIRS_FOLDER = "pairs"  # benchmark rows of two findings: phantom-benchmark/<seed>/<modality>/pairs/<a>+<b>_<index>


def pair_of(row: ManifestRow) -> tuple[str, str] | None:
    """The two findings a pair benchmark row was drawn with; None for any other row."""
    parts = row.path.split("/")
    if len(parts) < 2 or parts[-2] != PAIRS_FOLDER or not row.path.startswith("phantom-benchmark/"):
        return None
    a, _, b = parts[-1].rsplit("_", 1)[0].partition("+")
    return a, b


def pair_metrics(probs: np.ndarray, pairs: Sequence[tuple[str, str]], label_names: Sequence[str], thresholds: np.ndarray) -> dict[str, Any]:
    """On images drawn with two findings each: the share in which both are shown (each at its operating point, and at a
    flat 0.5), and the share of the findings shown, per finding and overall."""
    column = {n: j for j, n in enumerate(label_names)}
    both, both_flat, shown = [], [], {}
    for p, pair in zip(probs, pairs):
        known = [column[f] for f in pair if f in column]
        hits = [p[j] >= thresholds[j] for j in known]
        both.append(all(hits))
        both_flat.append(all(p[j] >= 0.5 for j in known))
        for j, hit in zip(known, hits):
            shown.setdefault(label_names[j], []).append(hit)
    return {"images": len(pairs), "both_shown": float(np.mean(both)) if both else float("nan"),
            "both_shown_at_0.5": float(np.mean(both_flat)) if both_flat else float("nan"),
            "finding_shown": float(np.mean([h for v in shown.values() for h in v])) if shown else float("nan"),
            "finding_shown_per_label": {f: float(np.mean(v)) for f, v in shown.items()}}


def phantom_benchmark_rows(modality: str, per_finding: int, size: int, seed: int, per_pair: int = 0) -> list[ManifestRow]:
    """Fresh in-memory phantoms, ``per_finding`` per finding and for the normal study, and ``per_pair`` per pair of
    findings drawn together (:func:`generator.phantoms.compatible_pairs`; see :func:`pair_of`), at another seed."""
    spec = get_spec(modality)
    plan = [(finding, [finding], f"{finding}_{{i:04d}}") for finding in [NORMAL, *spec.findings]]
    counts = [per_finding] * len(plan)
    for a, b in compatible_pairs(modality):
        plan.append((f"{a}+{b}", [a, b], f"{PAIRS_FOLDER}/{a}+{b}_{{i:04d}}"))
        counts.append(per_pair)
    rows = []
    for (label, findings, name), n in zip(plan, counts):
        for i in range(n):
            study = make_phantom(modality, findings, size=max(32, size), seed=study_seed(seed, modality, label, i))
            rows.append(ManifestRow(
                f"phantom-benchmark/{seed}/{modality}/{name.format(i=i)}", study.text, modality,
                [f.to_dict() for f in study.findings], f"phantom:{modality}", image=study.image,
            ))
    return rows


def load_rows(sources: Iterable[str | os.PathLike], modalities: Mapping[str, ModalityConfig] | None = None) -> list[ManifestRow]:
    """Every row of the given sources (manifest CSV or folder, ../shared/meddata folder, ...)."""
    modalities = modalities or default_modalities()
    return [row for source in sources for row in source_rows(source, modalities)]


def train_all(
    cfg: ClassifierConfig,
    rows: Sequence[ManifestRow],
    out: str | os.PathLike | None = None,
    roles: Sequence[str] = ROLES,
    modalities: Sequence[str] | None = None,
    progress: bool = True,
    command: str | None = None,
    data_description: Any = None,
) -> list[dict[str, Any]]:
    """Train every (role, modality) classifier into ``<out>/<role>/<modality>/`` (``out`` defaults to cfg.out).

    ``modalities`` defaults to those in the rows. With phantom labels, a fresh phantom benchmark of
    ``cfg.benchmark_per_finding`` studies per finding (and ``cfg.benchmark_per_pair`` per pair of findings) is drawn once
    per modality and scored by every role."""
    rows = list(rows)
    out = Path(out if out is not None else cfg.out)
    modalities = list(modalities) if modalities is not None else list(dict.fromkeys(r.modality for r in rows))
    summaries = []
    for modality in modalities:
        own = [r for r in rows if r.modality == modality]
        bench = None
        if cfg.benchmark_per_finding and own and modality in PHANTOM_MODULES and all(is_phantom_row(r) for r in own) and cfg.labels != "manifest":
            bench = phantom_benchmark_rows(modality, cfg.benchmark_per_finding, cfg.image_size, cfg.benchmark_seed, cfg.benchmark_per_pair)
        for role in roles:
            summaries.append(train_classifier(cfg, role, modality, own, out, progress, command, bench, data_description=data_description))
    return summaries


def format_summary(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table: one line per classifier with AUROC, ECE before/after, wall-clock and CPU seconds."""
    def num(value: Any) -> float:  # metadata read back from JSON has None for NaN
        return float("nan") if value is None else float(value)

    lines = [f"{'modality':<10} {'role':<9} {'arch':<7} {'AUROC':>6} {'bench':>6} {'pairs':>6} {'ECE':>6} {'ECE(T)':>6} {'T':>5} {'s':>6} "
             f"{'cpu s':>6}"]
    for s in summaries:
        test, bench = s["metrics"]["test"], s["metrics"].get("benchmark", {})
        pairs = s["metrics"].get("benchmark_pairs", {})  # share of two-finding phantoms with both findings shown
        lines.append(
            f"{s['modality']:<10} {s['role']:<9} {s['arch']:<7} {num(test['auroc_macro']):>6.3f} {num(bench.get('auroc_macro')):>6.3f} "
            f"{num(pairs.get('both_shown')):>6.3f} "
            f"{num(test['ece_before']):>6.3f} {num(test['ece_after']):>6.3f} {num(s['temperature']):>5.2f} {num(s['seconds']):>6.0f} "
            f"{num(s.get('cpu_seconds')):>6.0f}"
        )
    return "\n".join(lines)
