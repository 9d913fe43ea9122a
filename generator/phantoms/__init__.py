"""Procedural, seeded phantoms of every modality, with exact ground truth.

``make_phantom("cxr", ["pleural_effusion"], size=128, seed=(7, 0))`` draws one study: the
image, its report text and its structured findings. The same seed gives the same bytes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .base import Finding, FindingSpec, PhantomSpec, Rendered, bbox_of, sample_attributes, side_away
from .reports import compose_report

# modality id -> module defining SPEC; the only place a new phantom modality is registered
PHANTOM_MODULES: dict[str, str] = {
    "cxr": "generator.phantoms.cxr",
    "chest_ct": "generator.phantoms.chest_ct",
    "brain_mri": "generator.phantoms.brain_mri",
    "fundus": "generator.phantoms.fundus",
    "oct": "generator.phantoms.oct",
}

NORMAL = "normal"  # pseudo-finding name for a study with no present finding


def phantom_modalities() -> list[str]:
    return list(PHANTOM_MODULES)


def get_spec(modality: str) -> PhantomSpec:
    if modality not in PHANTOM_MODULES:
        known = ", ".join(PHANTOM_MODULES)
        raise UserError(f"no phantom generator for modality {modality!r}; phantoms exist for: {known}")
    return importlib.import_module(PHANTOM_MODULES[modality]).SPEC


def catalogue() -> dict[str, list[str]]:
    """modality -> finding names, in declaration order."""
    return {m: list(get_spec(m).findings) for m in PHANTOM_MODULES}


@dataclass
class PhantomStudy:
    image: np.ndarray  # (H, W) or (H, W, 3), uint8
    text: str
    modality: str
    findings: list[Finding]  # present findings (with bbox, measurements) then pertinent negatives
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        present = [f.name for f in self.findings if f.present]
        return "+".join(present) if present else NORMAL


def compatible_pairs(modality: str) -> list[tuple[str, str]]:
    """Every unordered pair of the modality's findings that can be drawn together, in declaration order
    (neither excludes the other: no "pneumothorax" beside a "pleural effusion" that fills the same space)."""
    spec = get_spec(modality)
    names = list(spec.findings)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if b not in spec.finding(a).excludes and a not in spec.finding(b).excludes]


def rng_for(seed: int | tuple[int, ...]) -> np.random.Generator:
    """A generator keyed by a seed tuple, so each study's randomness is independent of order."""
    entropy = list(seed) if isinstance(seed, tuple) else [int(seed)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def make_phantom(
    modality: str,
    findings: list[str] | list[Finding],
    size: int = 128,
    seed: int | tuple[int, ...] = 0,
    negatives: int = 1,
) -> PhantomStudy:
    """Draw one study with the given findings (names, or Findings with chosen attributes)."""
    if size < 32:
        raise UserError(f"phantom size must be at least 32 pixels, got {size}")
    spec = get_spec(modality)
    # Separate streams for attributes, drawing and wording: a study with a finding given by name
    # draws the same anatomy as the normal study of the same seed (a paired counterfactual),
    # as long as the renderer draws anatomy before findings.
    entropy = list(seed) if isinstance(seed, tuple) else [int(seed)]
    attribute_rng, render_rng, report_rng = (
        np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(entropy).spawn(3)
    )
    requested: list[Finding] = []
    drawn_here: list[Finding] = []  # findings given by name, whose attributes are drawn here
    for item in findings:
        if isinstance(item, Finding):
            requested.append(with_location(item.copy(), spec.finding(item.name), attribute_rng))  # validates the name
        elif item != NORMAL:
            requested.append(sample_attributes(spec.finding(item), attribute_rng))
            drawn_here.append(requested[-1])
    sided = {f.name: f.side for f in requested if f.side in ("left", "right")}
    for f in drawn_here:  # a side another finding sets (FindingSpec.side_away_from: a mass pushes the midline away)
        away = side_away(spec.finding(f.name), sided)
        if away and f.side in ("left", "right"):
            f.side = away
    names = [f.name for f in requested]
    for f in requested:
        clash = set(spec.finding(f.name).excludes) & set(names)
        if clash:
            raise UserError(f"{modality}: {f.name!r} cannot be drawn together with {sorted(clash)}")

    rendered = spec.render(requested, size, render_rng)
    image = np.ascontiguousarray(rendered.image)
    expected_shape = (size, size) if spec.channels == 1 else (size, size, 3)
    if image.dtype != np.uint8 or image.shape != expected_shape:
        raise RuntimeError(f"{modality} renderer returned {image.dtype} {image.shape}, expected uint8 {expected_shape}")
    text, all_findings = compose_report(
        spec, rendered.findings, report_rng, negatives=negatives, report_words=rendered.report_words
    )
    return PhantomStudy(image, text, modality, all_findings, dict(rendered.measurements))


def with_location(f: Finding, spec: FindingSpec, rng: np.random.Generator) -> Finding:
    """``f`` with a location drawn from what its finding allows when it has none and the finding takes one (the renderers
    place such findings by location); one on ``f``'s side where locations name sides. A request worded without a location
    (a model trained on reports asks for "consolidation" alone) is drawn rather than refused; ``rng`` is not used when
    nothing is missing, so fully stated findings draw as before."""
    if f.location is None and spec.locations:
        sided = [loc for loc in spec.locations if f.side in ("left", "right") and loc.startswith(f.side)]
        options = sided or list(spec.locations)
        f.location = str(options[rng.integers(len(options))])
    return f


__all__ = [
    "Finding",
    "FindingSpec",
    "NORMAL",
    "PHANTOM_MODULES",
    "PhantomSpec",
    "PhantomStudy",
    "Rendered",
    "bbox_of",
    "catalogue",
    "compatible_pairs",
    "get_spec",
    "make_phantom",
    "phantom_modalities",
    "rng_for",
    "sample_attributes",
]
