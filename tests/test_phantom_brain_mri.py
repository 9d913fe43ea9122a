"""Brain MRI (axial FLAIR) phantom: determinism, findings drawn where and as large as they say."""

from __future__ import annotations

import numpy as np
import pytest

from generator.phantoms import Finding, get_spec, make_phantom, rng_for
from generator.phantoms.brain_mri import SPEC

NAMES = list(SPEC.findings)
# the measured quantity that must grow with severity
SEVERITY_MEASURE = {
    "tumor": "diameter_mm",
    "infarct": "area_cm2",
    "hemorrhage": "volume_ml",
    "atrophy": "evans_index",
    "midline_shift": "midline_shift_mm",
    "ms_lesions": "lesion_count",
}
EXAMPLE = {  # a fully specified instance of every finding
    "tumor": Finding("tumor", side="left", location="frontal", severity="moderate"),
    "infarct": Finding("infarct", side="left", location="mca", severity="moderate"),
    "hemorrhage": Finding("hemorrhage", side="left", location="basal_ganglia", severity="moderate"),
    "atrophy": Finding("atrophy", severity="moderate"),
    "midline_shift": Finding("midline_shift", side="left", severity="moderate"),
    "ms_lesions": Finding("ms_lesions", severity="moderate"),
}


def draw(findings: list[Finding], size: int = 128, seed: tuple[int, ...] = (11, 0)):
    return SPEC.render([f.copy() for f in findings], size, rng_for(seed))


def centre(bbox: tuple[float, float, float, float]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def test_spec_contract():
    assert get_spec("brain_mri") is SPEC
    assert SPEC.channels == 1
    assert set(SEVERITY_MEASURE) <= set(SPEC.findings)
    assert len(SPEC.techniques) >= 4 and len(SPEC.normal_statements) >= 4 and len(SPEC.impression_normal) >= 3
    for spec in SPEC.findings.values():
        assert len(spec.templates) >= 3
        assert spec.severities == ("mild", "moderate", "severe")
        assert set(spec.location_words) <= set(spec.locations)
    assert {"tumour", "tumor"} <= set(SPEC.findings["tumor"].terms)
    hem_terms = " ".join(SPEC.findings["hemorrhage"].terms)
    assert "haemorrhage" in hem_terms and "hemorrhage" in hem_terms


def test_same_seed_same_bytes_and_different_seed_differs():
    findings = [EXAMPLE["tumor"], EXAMPLE["ms_lesions"]]
    a, b = draw(findings, seed=(5, 1)), draw(findings, seed=(5, 1))
    assert a.image.tobytes() == b.image.tobytes()
    assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
    assert not np.array_equal(draw([], seed=(5, 1)).image, draw([], seed=(5, 2)).image)


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", NAMES)
def test_every_finding_renders(name: str, size: int):
    study = make_phantom("brain_mri", [name], size=size, seed=(3, NAMES.index(name)))
    assert study.image.shape == (size, size) and study.image.dtype == np.uint8
    drawn = [f for f in study.findings if f.present and f.name == name]
    assert len(drawn) == 1
    x0, y0, x1, y1 = drawn[0].bbox
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_sizes_other_than_the_usual():
    for size in (32, 96, 200):
        assert draw([EXAMPLE["infarct"]], size=size).image.shape == (size, size)


@pytest.mark.parametrize("name", NAMES)
def test_finding_changes_the_image_inside_its_bbox(name: str):
    size = 128
    normal = draw([], size).image.astype(np.float32)
    rendered = draw([EXAMPLE[name]], size)
    x0, y0, x1, y1 = (np.array(rendered.findings[0].bbox) * size).round().astype(int)
    diff = np.abs(rendered.image.astype(np.float32) - normal)
    box = np.zeros_like(diff, dtype=bool)
    box[y0:y1, x0:x1] = True
    inside, outside = diff[box].mean(), diff[~box].mean()
    assert inside > outside, f"{name}: mean change {inside:.1f} inside its bbox, {outside:.1f} outside"
    assert np.percentile(diff[box], 97) > 40, f"{name}: no marked change inside its bbox"


@pytest.mark.parametrize("name", NAMES)
def test_severity_is_monotone(name: str):
    key = SEVERITY_MEASURE[name]
    for seed in range(3):
        values = []
        for severity in ("mild", "moderate", "severe"):
            finding = EXAMPLE[name].copy(severity=severity)
            values.append(draw([finding], seed=(20, seed)).findings[0].measurements[key])
        assert values[0] < values[1] < values[2], f"{name} {key}: {values}"


@pytest.mark.parametrize("name", ["tumor", "infarct", "hemorrhage"])
def test_side_is_honoured(name: str):
    """Radiological convention: the patient's left is on the viewer's right."""
    spec = SPEC.findings[name]
    for location in spec.locations:
        for side, on_right_half in (("left", True), ("right", False)):
            f = Finding(name, side=side, location=location, severity="moderate")
            x, _ = centre(draw([f], seed=(31, spec.locations.index(location))).findings[0].bbox)
            assert (x > 0.5) == on_right_half, f"{name} {side} {location}: bbox centre x={x:.2f}"


def test_locations_are_honoured():
    def where(name: str, location: str) -> tuple[float, float]:
        f = Finding(name, side="left", location=location, severity="moderate")
        return centre(draw([f], seed=(41, 0)).findings[0].bbox)

    assert where("tumor", "frontal")[1] < 0.45 < 0.55 < where("tumor", "occipital")[1]
    assert where("tumor", "temporal")[0] > where("tumor", "frontal")[0]  # lateral
    assert where("infarct", "aca")[1] < where("infarct", "mca")[1] < where("infarct", "pca")[1]
    assert where("infarct", "aca")[0] < where("infarct", "mca")[0]
    assert where("hemorrhage", "thalamus")[0] < where("hemorrhage", "basal_ganglia")[0]
    assert where("hemorrhage", "frontal")[1] < 0.5 < where("hemorrhage", "occipital")[1]


def test_midline_shift_direction_and_size():
    left = draw([Finding("midline_shift", side="left", severity="severe")]).findings[0]
    right = draw([Finding("midline_shift", side="right", severity="severe")]).findings[0]
    assert left.side == "left" and right.side == "right"
    assert centre(left.bbox)[0] > centre(right.bbox)[0]  # septum displaced towards the patient's left
    assert left.measurements["midline_shift_mm"] >= 10
    assert draw([]).measurements["midline_shift_mm"] < 0.5


def test_mass_pushes_the_midline_away_and_reports_it():
    rendered = draw([Finding("tumor", side="left", location="frontal", severity="severe")])
    shift = [f for f in rendered.findings if f.name == "midline_shift"]
    assert len(shift) == 1 and shift[0].side == "right" and shift[0].measurements["midline_shift_mm"] >= 2
    # a requested shift towards the mass is drawn (and stated) away from it
    both = draw([Finding("hemorrhage", side="right", location="parietal", severity="severe"),
                 Finding("midline_shift", side="right", severity="moderate")])
    assert [f.side for f in both.findings] == ["right", "left"]
    # a small mass causes no shift, so nothing is appended
    small = draw([Finding("tumor", side="left", location="parietal", severity="mild")])
    assert [f.name for f in small.findings] == ["tumor"]


def test_evans_index_separates_normal_from_atrophy():
    for seed in range(4):
        normal = draw([], seed=(50, seed)).measurements["evans_index"]
        assert 0.18 < normal < 0.3
        severe = draw([Finding("atrophy", severity="severe")], seed=(50, seed)).findings[0]
        assert severe.measurements["evans_index"] > 0.33


def test_flair_contrast():
    """FLAIR: ventricular CSF darker than white matter; plaques and oedema brighter than white matter."""
    size = 256
    normal = draw([], size, seed=(60, 0)).image.astype(np.float32)
    ys, xs = int(0.405 * size), int(0.535 * size)  # left frontal horn
    yw, xw = int(0.33 * size), int(0.62 * size)  # deep frontal white matter
    ventricle = normal[ys - 2:ys + 3, xs - 2:xs + 3].mean()
    white = normal[yw - 3:yw + 4, xw - 3:xw + 4].mean()
    assert ventricle < 0.5 * white
    plaques = draw([Finding("ms_lesions", severity="severe")], size, seed=(60, 0))
    x0, y0, x1, y1 = (np.array(plaques.findings[0].bbox) * size).astype(int)
    brighter = plaques.image[y0:y1, x0:x1].astype(np.float32) - normal[y0:y1, x0:x1]
    assert brighter.max() > 60


@pytest.mark.parametrize("seed", range(3))
def test_all_findings_together(seed: int):
    findings = [Finding(n, side=s, location=l, severity="severe") for n, s, l in (
        ("tumor", "left", "frontal"), ("infarct", "right", "pca"), ("hemorrhage", "right", "thalamus"),
        ("atrophy", None, None), ("midline_shift", "right", None), ("ms_lesions", None, None))]
    rendered = draw(findings, size=64, seed=(70, seed))
    assert rendered.image.shape == (64, 64)
    assert all(f.bbox is not None for f in rendered.findings)


@pytest.mark.parametrize("name", NAMES)
def test_report_mentions_the_finding(name: str):
    terms = [t.lower() for t in SPEC.findings[name].terms]
    for seed in range(4):
        study = make_phantom("brain_mri", [name], size=64, seed=(80, seed))
        text = study.text.lower()
        assert "{" not in text and "}" not in text
        assert any(t in text for t in terms), text
    normal = make_phantom("brain_mri", [], size=64, seed=(81, 0))
    assert "{" not in normal.text and normal.label == "normal"
