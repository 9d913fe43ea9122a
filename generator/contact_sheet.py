"""A contact sheet of generated images: every modality x finding the model knows.

Each finding's prompt is the report of a phantom study with that finding at its most severe grade
(drawn with the sheet's seed), so the sheet shows how the model draws the text it was trained on.
Per modality, the first row is that phantom (what the prompt describes) and the rows under it are
generated images, one seed each, so a reader can compare them column by column.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .fileio import atomic_write
from .models import LatentDiffusion
from .phantoms import NORMAL, get_spec, make_phantom, rng_for, sample_attributes
from .phantoms.dataset import study_seed
from .sampling import sample


def sheet_prompts(modality: str, size: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    """(finding, report text, phantom image) for the normal study and each finding at its worst."""
    spec = get_spec(modality)
    out = []
    for name in [NORMAL, *spec.findings]:
        key = study_seed(seed, modality, name, 0)
        request: list = [name]
        if name != NORMAL and spec.findings[name].severities:
            chosen = sample_attributes(spec.findings[name], rng_for(key))
            request = [chosen.copy(severity=spec.findings[name].severities[-1])]
        study = make_phantom(modality, request, size=size, seed=key)
        out.append((name, study.text, study.image))
    return out


def manifest_sheet_prompts(rows, modality: str, data_cfg, size: int) -> list[tuple[str, str, np.ndarray]]:
    """(label, caption, real image) for the normal study and each label stated alone present: the first such image of
    the validation split (``:val`` / ``:test`` rows; all rows where there are none), so the sheet puts a real image
    above what the model draws from its caption."""
    from .data import load_row
    from .data.transforms import RecordTransform

    own = [r for r in rows if r.modality == modality]
    held = [r for r in own if r.source.endswith((":val", ":test"))] or own
    picks: dict[str, object] = {}
    for r in held:
        present = [f["name"] for f in r.findings if f.get("present", True)]
        key = NORMAL if not present else present[0] if len(present) == 1 else None
        if key is not None and key not in picks:
            picks[key] = r
    transform = RecordTransform(data_cfg.model_copy(update={"image_size": size}), as_tensor=False)
    out = []
    for name in sorted(picks, key=lambda n: (n != NORMAL, n)):
        r = picks[name]
        image = transform.image(load_row(r, transform.modalities)["image"], modality)
        out.append((name, r.text, np.asarray(image).squeeze()))
    return out


def generated_contact_sheet(
    model: LatentDiffusion, out: str | os.PathLike, modalities: list[str], channels: dict[str, int],
    per_cell: int = 2, steps: int = 25, guidance: float = 4.0, seed: int = 0, sampler: str = "ddim", progress: bool = True,
    rows=None, data_cfg=None,
) -> Path:
    """``rows`` (manifest rows, with ``data_cfg``): each label's real validation image and caption head its column;
    else each finding's phantom and report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = model.cfg.image_size
    unknown = [m for m in modalities if m not in model.modalities]
    if unknown:
        raise UserError(f"the model has no embedding for {', '.join(unknown)}; it knows {', '.join(model.modalities)}")
    source = "real image" if rows is not None else "phantom"
    if rows is not None:
        rows = {m: manifest_sheet_prompts(rows, m, data_cfg, size) for m in modalities}
    else:
        rows = {m: sheet_prompts(m, max(size, 64), seed) for m in modalities}  # phantoms need 32 px or more
    columns = max(len(r) for r in rows.values())
    cell = 1.3
    n_rows = len(modalities) * (1 + per_cell)
    fig, axes = plt.subplots(n_rows, columns, figsize=(columns * cell, n_rows * (cell + 0.05)), squeeze=False)
    fig.patch.set_facecolor("white")
    bar = tqdm(total=len(modalities) * per_cell, desc="contact sheet", unit=" row", disable=not progress)
    for i, modality in enumerate(modalities):
        cells = rows[modality]
        generated = []
        for k in range(per_cell):
            with torch.inference_mode():
                output = sample(model, [text for _, text, _ in cells], [modality] * len(cells), guidance=guidance,
                                steps=steps, seed=seed + 1000 * k, sampler=sampler)
            generated.append(output.to_uint8([modality] * len(cells), channels))
            bar.update()
        for r in range(1 + per_cell):
            for c in range(columns):
                ax = axes[i * (1 + per_cell) + r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c >= len(cells):
                    ax.axis("off")
                    continue
                image = cells[c][2] if r == 0 else generated[r - 1][c]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
                if r == 0:
                    ax.set_title(cells[c][0].replace("_", " "), fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{modality}\n{source}" if r == 0 else f"seed {seed + 1000 * (r - 1)}",
                                  fontsize=7, fontweight="bold" if r == 0 else "normal")
    bar.close()
    fig.suptitle(f"synthmed generator: every modality x finding ({size} px, {sampler} {steps} steps, guidance {guidance}); "
                 f"first row of each modality: the {source} whose report is the prompt", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, metadata={"Software": None}))
    finally:
        plt.close(fig)
    return out


__all__ = ["generated_contact_sheet", "manifest_sheet_prompts", "sheet_prompts"]
