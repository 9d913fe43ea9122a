"""Colour fundus phantom: determinism, findings drawn where and how strongly they say, reports."""

from __future__ import annotations

import numpy as np
import pytest

from generator.phantoms import Finding, make_phantom, rng_for
from generator.phantoms.fundus import MACULA_RADIUS_MM, QUADRANTS, SPEC, render

FINDINGS = list(SPEC.findings)


def _draw(findings: list[Finding], size: int = 128, seed: int = 3):
    return render([f.copy() for f in findings], size, rng_for((seed,)))


def _typical(name: str, severity: str = "moderate") -> Finding:
    spec = SPEC.finding(name)
    location = spec.locations[0] if spec.locations else None
    return Finding(name, severity=severity if spec.severities else None, location=location)


def _bbox_pixels(bbox, size: int, pad: int = 2) -> tuple[slice, slice]:
    x0, y0, x1, y1 = bbox
    return (slice(max(0, int(np.floor(y0 * size)) - pad), int(np.ceil(y1 * size)) + pad),
            slice(max(0, int(np.floor(x0 * size)) - pad), int(np.ceil(x1 * size)) + pad))


def test_same_seed_same_bytes_different_seed_differs():
    a = make_phantom("fundus", ["retinal_hemorrhage", "drusen"], size=128, seed=(11, 2))
    b = make_phantom("fundus", ["retinal_hemorrhage", "drusen"], size=128, seed=(11, 2))
    c = make_phantom("fundus", ["retinal_hemorrhage", "drusen"], size=128, seed=(11, 3))
    assert a.image.tobytes() == b.image.tobytes()
    assert a.text == b.text
    assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
    assert a.image.tobytes() != c.image.tobytes()
    assert _draw([]).image.tobytes() != _draw([], seed=4).image.tobytes()


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", FINDINGS)
def test_every_finding_renders_with_bbox(name, size):
    out = _draw([_typical(name)], size=size)
    assert out.image.shape == (size, size, 3) and out.image.dtype == np.uint8
    (f,) = out.findings
    assert f.name == name and f.bbox is not None
    x0, y0, x1, y1 = f.bbox
    assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    assert f.measurements


def test_normal_anatomy_and_field_of_view():
    for seed in range(6):
        out = _draw([], size=128, seed=seed)
        img, m = out.image.astype(float), out.measurements
        assert out.findings == []
        assert img[:4, :4].max() <= 3 and img[-4:, -4:].max() <= 3  # black outside the circular field
        assert 0.2 <= m["cup_to_disc_ratio"] <= 0.45
        # disc on the nasal side: viewer's right for a right eye
        assert (m["disc_x"] > m["fovea_x"]) == (m["eye_is_right"] == 1.0)
        dx, dy, fx, fy = (int(m[k] * 128) for k in ("disc_x", "disc_y", "fovea_x", "fovea_y"))
        disc = np.percentile(img[dy - 4: dy + 5, dx - 4: dx + 5, 1], 75)  # skip the vessels crossing it
        fovea = img[fy - 2: fy + 3, fx - 2: fx + 3, 1].mean()
        assert disc > fovea + 60  # the disc is far paler than the macula
        assert img[64, 64, 0] > img[64, 64, 1] > img[64, 64, 2]  # red-orange fundus
    assert {_draw([], seed=s).measurements["eye_is_right"] for s in range(12)} == {0.0, 1.0}


@pytest.mark.parametrize("name", FINDINGS)
def test_finding_changes_image_inside_its_bbox(name):
    for seed in (1, 2):
        normal = _draw([], seed=seed).image.astype(np.int32)
        out = _draw([_typical(name)], seed=seed)
        diff = np.abs(out.image.astype(np.int32) - normal).sum(axis=2)
        inside = np.zeros_like(diff, dtype=bool)
        inside[_bbox_pixels(out.findings[0].bbox, 128)] = True
        assert diff[inside].sum() > 300, "the finding is barely visible"
        assert diff[inside].sum() >= 0.95 * diff.sum(), "the image changed outside the finding's bbox"


def _measure(name: str, severity: str, seed: int) -> dict[str, float]:
    spec = SPEC.finding(name)
    f = Finding(name, severity=severity, location=spec.locations[0] if spec.locations else None)
    return _draw([f], seed=seed).findings[0].measurements


MONOTONE = {
    "microaneurysms": ("count", "area_mm2"),
    "retinal_hemorrhage": ("count", "area_mm2"),
    "hard_exudates": ("count", "area_mm2"),
    "cotton_wool_spots": ("count", "area_mm2"),
    "neovascularization": ("extent_disc_areas",),
    "drusen": ("max_diameter_um", "area_mm2"),
    "enlarged_cup": ("cup_to_disc_ratio",),
    "papilledema": ("apparent_disc_diameter_mm",),
}


@pytest.mark.parametrize("name", FINDINGS)
def test_severity_is_monotone(name):
    assert SPEC.finding(name).severities == ("mild", "moderate", "severe")
    for seed in range(4):
        values = [_measure(name, sev, seed) for sev in ("mild", "moderate", "severe")]
        for key in MONOTONE[name]:
            series = [v[key] for v in values]
            assert series[0] < series[1] < series[2], (key, series)


@pytest.mark.parametrize("name", [n for n in FINDINGS if SPEC.finding(n).locations])
def test_location_is_honoured(name):
    for location in SPEC.finding(name).locations:
        for seed in (5, 6):
            out = _draw([Finding(name, severity="moderate", location=location)], seed=seed)
            m, (f,) = out.measurements, out.findings
            assert f.location == location
            cx, cy = (f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2
            mm_per_unit = m["pixel_size_um"] * 128 / 1000.0
            if location == "macular":
                assert np.hypot(cx - m["fovea_x"], cy - m["fovea_y"]) * mm_per_unit < MACULA_RADIUS_MM
            elif location == "disc":
                assert np.hypot(cx - m["disc_x"], cy - m["disc_y"]) * mm_per_unit < 0.75 * m["disc_diameter_mm"]
            else:
                nasal_is_right = m["eye_is_right"] == 1.0
                on_right = cx > m["fovea_x"]
                assert on_right == (nasal_is_right if "nasal" in location else not nasal_is_right), (location, m)
                assert (cy < m["fovea_y"]) == location.startswith("supero"), location


def test_cup_to_disc_ratio_invariant():
    for seed in range(5):
        normal = _draw([], seed=seed).measurements["cup_to_disc_ratio"]
        out = _draw([Finding("enlarged_cup", severity="mild")], seed=seed)
        cdr = out.findings[0].measurements["cup_to_disc_ratio"]
        assert normal < 0.45 < 0.6 < cdr
        assert out.measurements["cup_to_disc_ratio"] == cdr
    with pytest.raises(ValueError):
        make_phantom("fundus", ["enlarged_cup", "papilledema"], seed=1)


def test_combinations_render():
    names = [n for n in FINDINGS if n != "enlarged_cup"]
    out = _draw([_typical(n) for n in names], size=64)
    assert [f.name for f in out.findings] == names and all(f.bbox for f in out.findings)
    study = make_phantom("fundus", ["enlarged_cup", "drusen", "microaneurysms"], size=64, seed=9)
    assert study.image.shape == (64, 64, 3)


def _mentions(text: str, name: str) -> bool:
    return any(term.lower() in text.lower() for term in SPEC.finding(name).terms)


@pytest.mark.parametrize("name", FINDINGS)
def test_report_mentions_finding(name):
    for seed in range(8):
        study = make_phantom("fundus", [name], size=64, seed=(seed, 1), negatives=2)
        assert "{" not in study.text and "}" not in study.text
        assert _mentions(study.text, name), study.text
        assert study.findings[0].present and study.findings[0].bbox is not None


def test_normal_report_and_quadrant_vocabulary():
    for seed in range(5):
        study = make_phantom("fundus", [], size=64, seed=(seed,))
        assert study.label == "normal" and "{" not in study.text
    for name in FINDINGS:
        spec = SPEC.finding(name)
        assert not spec.sides  # one photograph shows one eye; the eye is a study-level measurement
        assert set(spec.locations) <= set(QUADRANTS) | {"macular", "disc"}
        assert set(spec.location_words) == set(spec.locations)
        assert len(spec.templates) >= 3
