"""One record format for every source: real or phantom, CSV, folder, .npz or Hugging Face.

A *row* (:class:`ManifestRow`) says where an image is and what it shows; a *record* is the same
with the image loaded (and transformed): a dict with the keys ``image``, ``text``, ``modality``,
``findings`` and ``source``, as MONAI-style keyed transforms expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from ..errors import UserError


class Record(TypedDict):
    image: Any  # np.ndarray (H, W) / (H, W, 3) uint8 as loaded; torch.Tensor (C, H, W) in [-1, 1] after transforms
    text: str  # report-style description of the image
    modality: str  # configured modality id, e.g. "cxr"
    findings: list[dict]  # structured labels: {"name", "present", "side", "location", "severity", ...}
    source: str  # where it came from: "<dataset>:<path or ref>"


@dataclass
class ManifestRow:
    path: str  # file path, "file.npz#split/index", or "hf:<dataset>#<index>" for in-memory images
    text: str
    modality: str
    findings: list[dict] = field(default_factory=list)
    source: str = ""
    row: int | None = None  # 1-based data row number in the file it came from (header not counted)
    image: np.ndarray | None = None  # set by sources whose images are not files (Hugging Face datasets)


MANIFEST_COLUMNS = ("path", "text", "modality", "findings", "source")


def findings_to_cell(findings: list[dict]) -> str:
    return json.dumps(findings, separators=(",", ":"), ensure_ascii=False) if findings else ""


def findings_from_cell(cell: str | None) -> list[dict]:
    """A findings cell: JSON list of objects, or finding names separated by '|' or ';'."""
    cell = (cell or "").strip()
    if not cell:
        return []
    if cell.startswith("["):
        value = json.loads(cell)
        if not isinstance(value, list) or not all(isinstance(v, dict) and "name" in v for v in value):
            raise UserError("findings JSON must be a list of objects with a 'name'")
        return value
    sep = "|" if "|" in cell else ";"
    return [{"name": part.strip(), "present": True} for part in cell.split(sep) if part.strip()]
