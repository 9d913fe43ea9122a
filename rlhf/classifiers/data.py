"""The classifiers' data: label space, the role-salted split, images and targets, augmentation."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from generator.config import ModalityConfig, default_modalities
from generator.data import ManifestRow, load_row, resize_pad, split_of, to_channels
from generator.errors import UserError
from generator.phantoms import NORMAL, PHANTOM_MODULES, get_spec

from .layout import SPLITS


def _dataset_of(row: ManifestRow) -> str:
    return row.source.split(":", 1)[0] if row.source else "manifest"


def is_phantom_row(row: ManifestRow) -> bool:
    return _dataset_of(row) == "phantom"


def label_counts(modality: str, rows: Sequence[ManifestRow]) -> dict[str, int]:
    """finding name -> rows of ``modality`` that state it present (the normal study left out), by name."""
    counts: dict[str, int] = {}
    for r in rows:
        if r.modality == modality:
            for name in {f["name"] for f in r.findings if f.get("present", True) and f["name"] != NORMAL}:
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def label_space(modality: str, rows: Sequence[ManifestRow], mode: str = "auto", min_positives: int = 0) -> list[str]:
    """The labels a classifier of ``modality`` predicts.

    ``phantom``: the phantom catalogue's findings (every finding the phantoms can draw, in their
    order); ``manifest``: the finding names stated present in at least ``min_positives`` rows (and
    in one at least), sorted; ``auto``: phantom when every row of the modality is a phantom."""
    own = [r for r in rows if r.modality == modality]
    phantom = modality in PHANTOM_MODULES and bool(own) and all(is_phantom_row(r) for r in own)
    if mode == "phantom" or (mode == "auto" and phantom):
        if modality not in PHANTOM_MODULES:
            raise UserError(f"labels=phantom but there is no phantom catalogue for modality {modality!r}; use labels=manifest")
        return list(get_spec(modality).findings)
    counts = label_counts(modality, own)
    names = [n for n, c in counts.items() if c >= max(1, min_positives)]
    if not names:
        why = f" at least {min_positives} times (judges.classifier.min_positives; counts: {counts})" if counts else ""
        raise UserError(
            f"no finding is stated present{why} in the {len(own)} {modality} rows, so there is nothing to learn; "
            "give rows with a findings column (or phantoms)"
        )
    return names


def split_key(row: ManifestRow) -> str:
    """The part of a path that names an image on every machine (its last four components)."""
    return "/".join(Path(row.path).as_posix().split("/")[-4:])


HELD_OUT_TAGS = ("val", "test")  # a dataset's own held-out split (generator.data.meddata: by patient where it knows them)


def split_of_row(row: ManifestRow, role: str, seed: int, val_fraction: float, held_out_given: bool = True) -> str:
    """``train``, ``calibration`` or ``test``, from a hash of the path salted with role and seed:
    the reward and the evaluator of a modality hold back different images. A row its dataset tags
    ``:train`` is trained on and one tagged ``:val`` or ``:test`` is held back (half for calibration,
    half for the test, again by the salted hash), so the held-out figures are on the dataset's
    validation patients, never on a patient seen in training. ``held_out_given`` False (the rows of a
    dataset hold no held-out row, e.g. a manifest of its training split alone): ``:train`` rows are
    split by the hash as untagged ones are."""
    digest = hashlib.sha256(f"{role}/{seed}/{split_key(row)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    tag = split_of(row)
    if tag == "train" and held_out_given:
        return "train"
    if tag in HELD_OUT_TAGS:
        return "calibration" if u < 0.5 else "test"
    if u < val_fraction / 2:
        return "calibration"
    return "test" if u < val_fraction else "train"


def split_rows(rows: Sequence[ManifestRow], role: str, seed: int, val_fraction: float) -> dict[str, list[ManifestRow]]:
    """:func:`split_of_row` for each row; a dataset none of whose rows is tagged held out (its training split alone)
    holds back by the hash."""
    given = {_dataset_of(r) for r in rows if split_of(r) in HELD_OUT_TAGS}
    out: dict[str, list[ManifestRow]] = {s: [] for s in SPLITS}
    for row in rows:
        out[split_of_row(row, role, seed, val_fraction, _dataset_of(row) in given)].append(row)
    return out


class LabelledImages:
    """Images of one split as uint8 ``(N, 3, S, S)``, with targets and a known-label mask ``(N, L)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, keys: list[str]):
        self.images, self.targets, self.known, self.keys = images, targets, known, keys

    def __len__(self) -> int:
        return len(self.keys)

    def as_float(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.images[index].float().div(127.5).sub(1.0)


def annotated_labels(rows: Sequence[ManifestRow]) -> dict[str, set[str]]:
    """dataset -> the finding names it ever states (present or absent).

    A label counts as known (0 when not present) only for rows of a dataset that annotates it:
    a paediatric pneumonia set says nothing about effusions, so its rows do not teach "no effusion"."""
    stated: dict[str, set[str]] = {}
    for row in rows:
        stated.setdefault(_dataset_of(row), set()).update(f["name"] for f in row.findings)
    return stated


def encode_rows(
    rows: Sequence[ManifestRow],
    label_names: Sequence[str],
    image_size: int,
    annotated: Mapping[str, set[str]],
    modalities: Mapping[str, ModalityConfig] | None = None,
    closed_world: bool = False,
) -> LabelledImages:
    """Load, convert and resize every image; targets from the rows' present findings.

    ``closed_world``: every label is known for every row (phantoms: the truth is complete)."""
    modalities = modalities or default_modalities()
    index = {name: j for j, name in enumerate(label_names)}
    images = torch.empty((len(rows), 3, image_size, image_size), dtype=torch.uint8)
    targets = torch.zeros((len(rows), len(label_names)))
    known = torch.zeros((len(rows), len(label_names)), dtype=torch.bool)
    for i, row in enumerate(rows):
        image = load_row(row, modalities)["image"]
        spec = modalities.get(row.modality)
        image = to_channels(image, spec.channels if spec else (3 if image.ndim == 3 else 1))
        image = resize_pad(image, image_size)
        array = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else image.transpose(2, 0, 1)
        images[i] = torch.from_numpy(np.ascontiguousarray(array))
        dataset_labels = annotated.get(_dataset_of(row), set())
        for j, name in enumerate(label_names):
            known[i, j] = closed_world or name in dataset_labels
        for f in row.findings:
            j = index.get(f["name"])
            if j is not None:
                known[i, j] = True
                targets[i, j] = 1.0 if f.get("present", True) else 0.0
    return LabelledImages(images, targets, known, [split_key(r) for r in rows])


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small rotation (5 degrees), zoom (5 %), shift (4 % of the side), brightness and contrast jitter (5 %).

    Never a flip: a flip would swap laterality. Pixels moved in from outside are black (-1)."""
    b = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) * 2 - 1) * scale

    angle, zoom = uniform(math.radians(5.0)), 1.0 + uniform(0.05)
    shift = torch.stack([uniform(0.08), uniform(0.08)], dim=1)  # 4 % of the side in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    contrast = (1.0 + uniform(0.05)).to(x).view(b, 1, 1, 1)
    brightness = uniform(0.1).to(x).view(b, 1, 1, 1)  # 5 % of the [0, 1] range
    return (x * contrast + brightness).clamp(-1.0, 1.0)
