"""The contract every phantom modality implements.

A phantom modality is one module in this package that defines a module-level ``SPEC``
(a :class:`PhantomSpec`). Its renderer draws an image from a list of ground-truth
:class:`Finding` objects and returns copies of them with what was actually drawn filled in
(bounding box, measurements such as the cardiothoracic ratio). Report text is composed from
the spec's phrase data by :mod:`generator.phantoms.reports`, so the truth and the words come
from one place.

Coordinates: images are ``(H, W)`` uint8 for grey modalities and ``(H, W, 3)`` uint8 for RGB.
Image "left" is the viewer's left; patient sides follow radiological convention (patient's
right on the viewer's left) for chest X-ray, CT and MRI. Bounding boxes are normalised
``(x0, y0, x1, y1)`` in ``[0, 1]`` image coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal

import numpy as np

from ..errors import UserError

Side = Literal["left", "right", "bilateral"]


@dataclass(frozen=True)
class FindingSpec:
    """What a finding is in one modality, and how reports may phrase it.

    ``templates`` are phrase templates with the optional slots ``{term}``, ``{side}``,
    ``{location}`` and ``{severity}``; a slot whose attribute is unset collapses away, so
    ``"{severity} {side} {term}"`` reads "left pneumothorax" for a finding without severity.
    Measurement slots (``{cardiothoracic_ratio}``, ``{diameter_mm}``, ...) are filled from
    ``Finding.measurements`` after rendering; a template that uses one is only chosen when
    the measurement exists.
    """

    name: str  # canonical snake_case id, e.g. "pleural_effusion"
    terms: tuple[str, ...]  # preferred term first, then synonyms and abbreviations ("pneumothorax", "PTX")
    templates: tuple[str, ...] = ("{severity} {side} {term}",)
    sides: tuple[str, ...] = ()  # allowed laterality values; empty: laterality is meaningless
    locations: tuple[str, ...] = ()  # allowed anatomical locations (lobe, zone, lobe of brain, quadrant, ...)
    severities: tuple[str, ...] = ()  # ordered mildest first; empty: severity is meaningless
    severity_words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. {"mild": ("small", "trace")}
    location_words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # e.g. {"right_lower_lobe": ("right lower lobe", "RLL")}
    bilateral_terms: tuple[str, ...] = ()  # plural terms used for a bilateral finding ("pleural effusions")
    side_words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # overrides reports.SIDE_WORDS, e.g. {"left": ("to the left",)}
    excludes: tuple[str, ...] = ()  # findings that cannot be drawn together with this one
    # findings drawn with this one that its templates name ("CNV ... with surrounding subretinal fluid"): a request
    # for it never states them absent (tests/test_parse.py checks the graph's reader finds no others in its phrases)
    implies: tuple[str, ...] = ()
    # findings the renderer may draw with this one, and then reports present, without its phrases naming them (a mass's
    # midline shift, a CNV's intraretinal cysts from moderate up, a macular hole's cystic edges): a request for this one
    # never states them absent, since no phantom could show it so
    accompanies: tuple[str, ...] = ()
    # findings that set this one's side when drawn with it: it lies on the other side of theirs (a mass pushes the
    # midline away from itself), so a request never asks for "left tumour, leftward midline shift"
    side_away_from: tuple[str, ...] = ()


@dataclass
class Finding:
    """Ground truth of one finding in one image."""

    name: str
    present: bool = True  # False: a pertinent negative stated in the report ("no pneumothorax")
    side: str | None = None
    location: str | None = None
    severity: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)  # units in the key: "diameter_mm", "cardiothoracic_ratio"
    bbox: tuple[float, float, float, float] | None = None  # normalised (x0, y0, x1, y1) of what was drawn

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bbox"] = None if self.bbox is None else [round(float(v), 4) for v in self.bbox]
        d["measurements"] = {k: round(float(v), 4) for k, v in self.measurements.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        bbox = d.get("bbox")
        return cls(
            name=d["name"],
            present=bool(d.get("present", True)),
            side=d.get("side"),
            location=d.get("location"),
            severity=d.get("severity"),
            measurements=dict(d.get("measurements") or {}),
            bbox=None if bbox is None else tuple(bbox),
        )

    def copy(self, **changes) -> "Finding":
        changes.setdefault("measurements", self.measurements)
        changes["measurements"] = dict(changes["measurements"])
        return replace(self, **changes)


@dataclass
class Rendered:
    image: np.ndarray  # (H, W) or (H, W, 3), uint8
    # The requested present findings, in order, with bbox and measurements filled in; then any
    # finding the drawing caused (a large tumour's midline shift), so the report never denies
    # what the image shows.
    findings: list[Finding]
    measurements: dict[str, float] = field(default_factory=dict)  # study-level values, e.g. normal CTR
    # Study-level words a technique line may name as a slot, with alternatives: {"eye": ("right eye", "OD")}
    # lets "Colour fundus photograph, {eye}." say which eye the image shows.
    report_words: dict[str, tuple[str, ...]] = field(default_factory=dict)


# A renderer uses only the generator it is given (it may ``rng.spawn()`` child streams, e.g. one
# for anatomy drawn first and one per finding, so a finding never changes the anatomy around it).
Renderer = Callable[[list[Finding], int, np.random.Generator], Rendered]


@dataclass(frozen=True)
class PhantomSpec:
    """One phantom modality: its findings, its report vocabulary and its renderer."""

    name: str  # modality id, e.g. "cxr"
    channels: int  # 1 (grey) or 3 (RGB)
    findings: dict[str, FindingSpec]
    render: Renderer  # (present findings, size in pixels, rng) -> Rendered
    techniques: tuple[str, ...]  # report technique lines, e.g. "Chest radiograph, PA view."
    normal_statements: tuple[str, ...]  # what a normal study says, e.g. "Lungs are clear."
    impression_normal: tuple[str, ...] = ("Normal study.",)

    def finding(self, name: str) -> FindingSpec:
        try:
            return self.findings[name]
        except KeyError:
            known = ", ".join(sorted(self.findings))
            raise UserError(f"unknown finding {name!r} for modality {self.name!r}; known: {known}") from None


def side_away(spec: FindingSpec, sided: Mapping[str, str]) -> str | None:
    """The side ``spec``'s finding takes beside the findings in ``sided`` (name -> "left" / "right"): the other side of
    the first one that pushes it (``FindingSpec.side_away_from``: a mass pushes the midline away); None when none does."""
    pusher = next((n for n in spec.side_away_from if n in sided), None)
    return None if pusher is None else ("right" if sided[pusher] == "left" else "left")


def sample_attributes(spec: FindingSpec, rng: np.random.Generator) -> Finding:
    """Draw side, location and severity uniformly from what the finding allows."""

    def pick(options: tuple[str, ...]) -> str | None:
        return str(options[rng.integers(len(options))]) if options else None

    return Finding(
        name=spec.name,
        side=pick(spec.sides),
        location=pick(spec.locations),
        severity=pick(spec.severities),
    )


def bbox_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised bounding box of a boolean mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape[:2]
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
