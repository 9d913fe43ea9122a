"""Writing phantom datasets and contact sheets.

``write_phantoms`` draws ``per_finding`` studies for the normal study and every finding of each
modality, and ``per_pair`` studies of every pair of findings that can be drawn together
(:func:`generator.phantoms.compatible_pairs`; label ``"<a>+<b>"``), so that a classifier trained on the
set has seen findings side by side and not only one at a time. Each study's seed is
``(seed, crc32("<modality>/<label>"), index)``, so a study is the same whatever other modalities or counts
are asked for, and the same seed gives identical bytes.

Output folder::

    images/<modality>/<label>/<modality>_<label>_<index>.png
    manifest.csv     path,text,modality,findings,source   (the data layer's manifest format)
    labels.jsonl     one object per image: path, modality, label, findings (with bbox and
                     measurements), study measurements, seed
    metadata.json    generator version, arguments, counts, catalogue, time
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import NORMAL, compatible_pairs, get_spec, make_phantom, rng_for
from .base import sample_attributes
from ..data.records import MANIFEST_COLUMNS, findings_to_cell
from ..errors import UserError
from ..fileio import atomic_open, write_text_atomic

PHANTOM_VERSION = "1"  # bump when a renderer changes what a seed draws


def study_seed(seed: int, modality: str, finding: str, index: int) -> tuple[int, int, int]:
    return (int(seed), zlib.crc32(f"{modality}/{finding}".encode()), int(index))


@dataclass
class PhantomSummary:
    out: Path
    images: int
    counts: dict[str, dict[str, int]]  # modality -> finding -> images
    seconds: float


def write_phantoms(
    out: str | os.PathLike,
    modalities: list[str],
    per_finding: int,
    size: int,
    seed: int = 0,
    negatives: int = 1,
    progress: bool = True,
    extra_metadata: dict | None = None,
    per_pair: int = 0,
) -> PhantomSummary:
    out = Path(out)
    specs = [get_spec(m) for m in modalities]  # fails early on an unknown modality
    if per_finding < 0 or per_pair < 0:
        raise UserError(f"phantom counts must be 0 or more, got per_finding={per_finding}, per_pair={per_pair}")
    plan = [(s.name, f, i) for s in specs for f in [NORMAL, *s.findings] for i in range(per_finding)]
    plan += [(s.name, f"{a}+{b}", i) for s in specs for a, b in compatible_pairs(s.name) for i in range(per_pair)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    with (
        atomic_open(out / "manifest.csv", "w", newline="", encoding="utf-8") as mf,
        atomic_open(out / "labels.jsonl", "w", encoding="utf-8") as lf,
    ):
        writer = csv.writer(mf)
        writer.writerow(MANIFEST_COLUMNS)
        for modality, finding, index in tqdm(plan, desc="phantoms", unit=" img", disable=not progress):
            key = study_seed(seed, modality, finding, index)
            study = make_phantom(modality, finding.split("+"), size=size, seed=key, negatives=negatives)
            rel = Path("images", modality, finding, f"{modality}_{finding}_{index:04d}.png")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(study.image).save(out / rel, optimize=False)
            findings = [f.to_dict() for f in study.findings]
            writer.writerow([rel.as_posix(), study.text, modality, findings_to_cell(findings), f"phantom:{modality}"])
            label = {
                "path": rel.as_posix(),
                "modality": modality,
                "label": finding,
                "text": study.text,
                "findings": findings,
                "measurements": {k: round(float(v), 4) for k, v in study.measurements.items()},
                "seed": list(key),
                "size": size,
            }
            lf.write(json.dumps(label, ensure_ascii=False) + "\n")
            counts.setdefault(modality, {}).setdefault(finding, 0)
            counts[modality][finding] += 1
    seconds = time.perf_counter() - start
    metadata = {
        "kind": "synthmed phantom dataset",
        "phantom_version": PHANTOM_VERSION,
        "seed": seed,
        "size": size,
        "per_finding": per_finding,
        "per_pair": per_pair,
        "negatives": negatives,
        "modalities": modalities,
        "images": len(plan),
        "counts": counts,
        "catalogue": {s.name: list(s.findings) for s in specs},
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **(extra_metadata or {}),
    }
    write_text_atomic(out / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    return PhantomSummary(out, len(plan), counts, seconds)


def contact_sheet(
    out: str | os.PathLike,
    modalities: list[str],
    size: int = 128,
    seed: int = 0,
    per_cell: int = 1,
    most_severe: bool = True,
) -> Path:
    """One row per modality, one column per finding (normal first), labelled; saved as PNG.

    With ``most_severe`` each finding is drawn at its highest severity, so the sheet shows at a
    glance what each finding looks like; side and location are drawn from the seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [get_spec(m) for m in modalities]
    columns = max(1 + len(s.findings) for s in specs)
    cell = 1.45
    fig, axes = plt.subplots(
        len(specs) * per_cell, columns, figsize=(columns * cell, len(specs) * per_cell * (cell + 0.12)), squeeze=False
    )
    fig.patch.set_facecolor("white")
    for r, spec in enumerate(specs):
        names = [NORMAL, *spec.findings]
        for k in range(per_cell):
            for c in range(columns):
                ax = axes[r * per_cell + k][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_visible(False)
                if c >= len(names):
                    ax.axis("off")
                    continue
                key = study_seed(seed, spec.name, names[c], k)
                request: list = [names[c]]
                if most_severe and names[c] != NORMAL and spec.findings[names[c]].severities:
                    chosen = sample_attributes(spec.findings[names[c]], rng_for(key))
                    request = [chosen.copy(severity=spec.findings[names[c]].severities[-1])]
                study = make_phantom(spec.name, request, size=size, seed=key)
                ax.imshow(study.image, cmap="gray" if study.image.ndim == 2 else None, vmin=0, vmax=255)
                if k == 0:
                    ax.set_title(names[c].replace("_", " "), fontsize=7)
                if c == 0:
                    ax.set_ylabel(spec.name, fontsize=9, fontweight="bold")
    grade = ", most severe grade" if most_severe else ""
    fig.suptitle(f"synthmed phantoms: every modality x finding (size {size} px, seed {seed}{grade})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def phantom_manifest(phantoms, size: int, progress: bool = True, per_finding: int | None = None, seed: int | None = None,
                     suffix: str = "", per_pair: int = 0) -> str:
    """The phantom set drawn at ``size`` pixels beside ``phantoms.out`` (``<out>_<size>px<suffix>``), drawn
    first when it is not on disk (seeded: the same bytes every time); returns its manifest path.

    ``per_finding`` and ``seed`` default to the ``phantoms`` section's (``per_pair``: none); a set drawn with
    other values needs its own ``suffix`` (a folder on disk is used as it is, whatever it was drawn with)."""
    per_finding = phantoms.per_finding if per_finding is None else per_finding
    seed = phantoms.seed if seed is None else seed
    folder = Path(f"{phantoms.out}_{size}px{suffix}")
    if not (folder / "manifest.csv").is_file():
        summary = write_phantoms(folder, phantoms.modalities, per_finding, size, seed, phantoms.negatives, progress, per_pair=per_pair)
        print(f"{summary.images} phantoms -> {folder} ({summary.seconds:.0f} s)")
    return str(folder / "manifest.csv")
