"""Chest CT phantom: determinism, findings drawn where and as large as the truth says, reports."""

from __future__ import annotations

import numpy as np
import pytest

from generator.phantoms import Finding, make_phantom, rng_for
from generator.phantoms.chest_ct import LOBES, SPEC, WINDOW_LEVEL_HU, WINDOW_WIDTH_HU

SEVERITY_MEASURE = {
    "ground_glass_opacity": "affected_lung_fraction",
    "consolidation": "area_cm2",
    "pleural_effusion": "effusion_depth_mm",
    "emphysema": "emphysema_fraction",
    "pneumothorax": "pneumothorax_depth_mm",
}


def example(name: str, **attrs) -> Finding:
    """A fully specified finding: the first allowed value of each attribute unless given."""
    spec = SPEC.finding(name)
    defaults = {"side": spec.sides[:1], "location": spec.locations[:1], "severity": spec.severities[-1:]}
    values = {k: (attrs[k] if k in attrs else (v[0] if v else None)) for k, v in defaults.items()}
    return Finding(name, **values)


def render(findings: list[Finding], size: int = 128, seed: int = 5):
    return SPEC.render(findings, size, rng_for(seed))


def box_pixels(bbox, size: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = (int(round(v * size)) for v in bbox)
    return slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1))


def test_spec_is_complete():
    assert SPEC.name == "chest_ct" and SPEC.channels == 1
    assert len(SPEC.techniques) >= 4 and len(SPEC.normal_statements) >= 4 and len(SPEC.impression_normal) >= 3
    for name in ("nodule", "ground_glass_opacity", "consolidation", "pleural_effusion", "emphysema", "mass"):
        assert name in SPEC.findings
    for spec in SPEC.findings.values():
        assert len(spec.templates) >= 3 and spec.terms
        if spec.locations and all(loc in LOBES for loc in spec.locations):
            assert not spec.sides  # the lobe carries the side: they can never contradict
        for excluded in spec.excludes:
            assert spec.name in SPEC.finding(excluded).excludes


def test_same_seed_same_bytes_and_seeds_differ():
    findings = [example("nodule"), example("pleural_effusion", side="left")]
    a, b = render(findings, seed=11), render(findings, seed=11)
    assert a.image.tobytes() == b.image.tobytes()
    assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
    assert render([], seed=11).image.tobytes() != render([], seed=12).image.tobytes()


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", list(SPEC.findings))
def test_every_finding_renders_and_changes_its_bbox(name: str, size: int):
    normal = render([], size)
    assert normal.image.shape == (size, size) and normal.image.dtype == np.uint8
    out = render([example(name)], size)
    assert out.image.shape == (size, size) and out.image.dtype == np.uint8
    (finding,) = out.findings
    assert finding.name == name and finding.bbox is not None
    x0, y0, x1, y1 = finding.bbox
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    diff = np.abs(out.image.astype(int) - normal.image.astype(int))
    inside = diff[box_pixels(finding.bbox, size)]
    assert inside.mean() > 3, "the finding must visibly change its own box"
    assert inside.sum() > 0.6 * diff.sum(), "most of the change lies inside the bbox"


def test_normal_anatomy_in_lung_window():
    image = render([], 256, seed=3).image.astype(float)
    corner = image[:20, :20].mean()  # air outside the patient
    centre_row = image[128]
    lung_grey = np.percentile(image[64:192, 40:216], 25)
    assert corner < lung_grey < 140, "air darkest, lung dark grey"
    assert centre_row.max() > 230, "soft tissue and bone near white in lung window"
    air = (-1000 - (WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2)) / WINDOW_WIDTH_HU * 255
    assert abs(corner - air) < 12


@pytest.mark.parametrize("name", list(SEVERITY_MEASURE))
def test_severity_is_monotone(name: str):
    key = SEVERITY_MEASURE[name]
    for seed in (1, 2):
        values = [render([example(name, severity=s)], seed=seed).findings[0].measurements[key]
                  for s in SPEC.finding(name).severities]
        assert values == sorted(values) and values[0] < values[-1], (seed, values)


@pytest.mark.parametrize("name", ["pleural_effusion", "pneumothorax", "ground_glass_opacity", "emphysema"])
def test_side_is_honoured(name: str):
    for side in ("right", "left"):  # patient's right is on the viewer's left
        (f,) = render([example(name, side=side)]).findings
        centre = (f.bbox[0] + f.bbox[2]) / 2
        assert (centre < 0.5) if side == "right" else (centre > 0.5), (side, f.bbox)
    (f,) = render([example("pleural_effusion", side="bilateral")]).findings
    assert f.bbox[0] < 0.4 and f.bbox[2] > 0.6


@pytest.mark.parametrize("name", ["nodule", "mass", "consolidation"])
def test_lobe_is_honoured(name: str):
    boxes = {lobe: render([example(name, location=lobe)], seed=7).findings[0].bbox for lobe in LOBES}
    for lobe, (x0, y0, x1, y1) in boxes.items():
        assert ((x0 + x1) / 2 < 0.5) == lobe.startswith("right"), (lobe, boxes[lobe])
    for side in ("right", "left"):  # upper lobe anterior (top) to the lower lobe's superior segment
        upper, lower = boxes[f"{side}_upper_lobe"], boxes[f"{side}_lower_lobe"]
        assert (upper[1] + upper[3]) < (lower[1] + lower[3])


def test_modality_invariants():
    nodules = [render([example("nodule")], seed=s).findings[0].measurements["diameter_mm"] for s in range(4)]
    masses = [render([example("mass")], seed=s).findings[0].measurements["diameter_mm"] for s in range(4)]
    assert all(5 <= d < 30 for d in nodules) and all(d > 30 for d in masses)
    # Effusion layers dependently: its box hugs the back; pneumothorax air rises to the front.
    (eff,) = render([example("pleural_effusion", severity="moderate")]).findings
    (ptx,) = render([example("pneumothorax", severity="moderate")]).findings
    assert (eff.bbox[1] + eff.bbox[3]) / 2 > (ptx.bbox[1] + ptx.bbox[3]) / 2
    # Emphysema darkens the lung; consolidation brightens it.
    normal = render([]).image.astype(float)
    emph = render([example("emphysema", side="bilateral")]).image.astype(float)
    cons = render([example("consolidation")]).image.astype(float)
    assert emph.mean() < normal.mean() < cons.mean()
    study = render([])
    assert 300 < study.measurements["fov_mm"] < 450
    assert study.measurements["window_width_hu"] == 1500


def test_all_findings_together():
    findings = [example(name) for name in SPEC.findings]
    out = render(findings, 128, seed=9)
    assert [f.name for f in out.findings] == [f.name for f in findings]
    assert all(f.bbox is not None for f in out.findings)


def test_unset_attributes_are_filled_and_bad_ones_rejected():
    (f,) = render([Finding("consolidation")]).findings
    assert f.location in LOBES and f.severity in SPEC.finding("consolidation").severities
    with pytest.raises(ValueError):
        render([Finding("nodule", location="right_middle_lobe")])


@pytest.mark.parametrize("name", list(SPEC.findings))
def test_report_mentions_finding(name: str):
    spec = SPEC.finding(name)
    for seed in range(6):
        study = make_phantom("chest_ct", [name], size=64, seed=(seed, 1))
        assert "{" not in study.text and "}" not in study.text
        lowered = study.text.lower()
        assert any(term.lower() in lowered for term in spec.terms), study.text
    normal = make_phantom("chest_ct", [], size=64, seed=3)
    assert "{" not in normal.text and normal.label == "normal"
