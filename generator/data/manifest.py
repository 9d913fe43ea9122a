"""Building manifests: any supported source in, one normalised CSV out.

The output has the columns ``path,text,modality,findings,source``; image paths are written
relative to the manifest's folder when possible, so a data folder can move with its manifest.
Writing goes to a temporary file renamed at the end: an interrupted build leaves no half file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import ModalityConfig
from ..fileio import atomic_open
from .errors import BadRows, DataError
from .imageio import ImageReadError, load_image, probe_image, split_ref
from .meddata import is_meddata_folder, meddata_rows
from .records import MANIFEST_COLUMNS, ManifestRow, findings_to_cell
from .sources import IMAGE_SUFFIXES, findings_for_label, iter_class_folders, iter_hf, iter_manifest, iter_npz


@dataclass
class ManifestSummary:
    path: Path
    rows: int
    skipped: int
    skipped_file: Path | None
    by_modality: dict[str, int]


def detect_source(source: str | os.PathLike) -> str:
    """One of meddata, manifest, classes, npz, hf — from what the path looks like."""
    path = Path(source)
    if str(source).startswith("hf:"):
        return "hf"
    if not path.exists():
        raise DataError("source not found; give a manifest CSV, a folder, an .npz or parquet file, or hf:<dataset>", file=str(source))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return "manifest"
        if suffix == ".npz":
            return "npz"
        if suffix in (".parquet", ".json", ".jsonl"):
            return "hf"
        raise DataError(f"unsupported source file type {suffix!r}", file=str(path))
    if is_meddata_folder(path):
        return "meddata"
    if any(path.glob("*.parquet")) or (path / "metadata.csv").exists() or (path / "metadata.jsonl").exists():
        return "hf"
    if (path / "manifest.csv").is_file():
        return "manifest"
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if subdirs and any(f.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for f in d.rglob("*")):
        return "classes"
    raise DataError("cannot tell what this folder holds: no labels adapter, manifest.csv, parquet or class sub-folders", file=str(path))


def source_rows(
    source: str | os.PathLike,
    modalities: Mapping[str, ModalityConfig],
    modality: str | None = None,
    template: str = "{label}",
    bad: BadRows | None = None,
    label_names: list[str] | None = None,
) -> Iterator[ManifestRow]:
    """Rows from any supported source (see :func:`detect_source`). ``label_names`` names the
    classes of a MedMNIST ``.npz`` by index (its labels are integers)."""
    kind = detect_source(source)
    path = Path(str(source).removeprefix("hf:"))
    if kind == "meddata":
        return meddata_rows(path)
    if kind == "manifest":
        target = path / "manifest.csv" if path.is_dir() else path
        return iter_manifest(target, modalities, modality=modality, bad=bad)
    if kind == "classes":
        if modality is None:
            raise DataError("a folder of class sub-folders needs --modality", file=str(path))
        return iter_class_folders(path, modality, template, modalities=modalities)
    if kind == "npz":
        if modality is None:
            raise DataError("a MedMNIST .npz needs --modality", file=str(path))
        return iter_npz(path, modality, npz_label_text(template, label_names), modalities=modalities)
    return iter_hf(str(source).removeprefix("hf:"), modality=modality, template=template, modalities=modalities, bad=bad)


def npz_label_text(template: str, names: list[str] | None):
    """Label vector -> (text, findings): one class index, or a multi-label 0/1 vector."""

    def name_of(index: int) -> str:
        if names is None:
            return str(index)
        if not 0 <= index < len(names):
            raise DataError(f"label {index} has no name; --label-names gives {len(names)}")
        return names[index]

    def label_text(label: np.ndarray) -> tuple[str, list[dict]]:
        if len(label) == 1:
            chosen = [name_of(int(label[0]))]
        else:  # multi-label (ChestMNIST): the positive classes
            chosen = [name_of(i) for i in np.flatnonzero(label)] or ["normal"]
        findings = [f for name in chosen for f in findings_for_label(name)]
        return template.format(label="; ".join(n.replace("_", " ") for n in chosen)), findings

    return label_text


def _relative(path: str, base: Path) -> str:
    file_part, inner = split_ref(path)
    try:
        rel = os.path.relpath(os.path.abspath(file_part), base.resolve())
    except ValueError:  # another drive on Windows
        rel = os.path.abspath(file_part)
    return rel if inner is None else f"{rel}#{inner}"


def write_manifest(
    rows: Iterator[ManifestRow],
    out: str | os.PathLike,
    bad: BadRows | None = None,
    verify_images: bool = False,
    modalities: Mapping[str, ModalityConfig] | None = None,
    progress: bool = True,
) -> ManifestSummary:
    """Stream rows into a manifest CSV; in-memory images (Hugging Face) are saved beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bad = bad if bad is not None else BadRows(skip=False)
    images_dir = out.parent / f"{out.stem}_images"
    by_modality: dict[str, int] = {}
    count = 0
    with atomic_open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for row in tqdm(rows, desc=f"manifest {out.name}", unit=" rows", disable=not progress, mininterval=1.0):
            if row.image is not None:
                images_dir.mkdir(exist_ok=True)
                target = images_dir / f"{count:08d}.png"
                Image.fromarray(row.image).save(target)
                row.path = str(target)
            else:
                # Every file's header is read (cheap); --verify decodes the pixels too.
                try:
                    if verify_images:
                        window = (modalities or {}).get(row.modality)
                        load_image(row.path, window=window.window if window else None)
                    else:
                        probe_image(row.path)
                except ImageReadError as exc:
                    bad.handle(DataError(str(exc), file=row.source, row=row.row, column="path"))
                    continue
            writer.writerow([_relative(row.path, out.parent), row.text, row.modality, findings_to_cell(row.findings), row.source])
            by_modality[row.modality] = by_modality.get(row.modality, 0) + 1
            count += 1
    return ManifestSummary(out, count, len(bad), bad.write(out), by_modality)
