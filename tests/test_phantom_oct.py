"""Tests for the retinal OCT phantom (foveal B-scan of a right eye)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from generator.phantoms import make_phantom, rng_for
from generator.phantoms.base import Finding
from generator.phantoms.oct import SCAN_DEPTH_UM, SPEC

FINDINGS = list(SPEC.findings)
# the measurement that grows with severity, per finding
SEVERITY_MEASURE = {
    "intraretinal_fluid": "max_cyst_height_um",
    "subretinal_fluid": "height_um",
    "drusen": "max_height_um",
    "pigment_epithelial_detachment": "height_um",
    "epiretinal_membrane": "central_thickness_um",
    "choroidal_neovascularization": "lesion_height_um",
    "macular_hole": "minimum_linear_diameter_um",
}


def render(findings: list[Finding], size: int = 128, seed: int = 0):
    return SPEC.render(findings, size, rng_for((seed,)))


def middle(name: str, location: str | None = None) -> Finding:
    spec = SPEC.finding(name)
    severity = spec.severities[len(spec.severities) // 2] if spec.severities else None
    if location is None and spec.locations:
        location = spec.locations[0]
    return Finding(name, severity=severity, location=location)


def test_same_seed_same_bytes_and_different_seed_differs():
    fs = [middle("subretinal_fluid"), middle("drusen")]
    a, b, c = render(fs, seed=3), render(fs, seed=3), render(fs, seed=4)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.findings == b.findings
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(render([], seed=1).image, render([], seed=2).image)


def test_spec_is_consistent():
    assert SPEC.name == "oct" and SPEC.channels == 1
    assert len(SPEC.techniques) >= 4 and len(SPEC.normal_statements) >= 4 and len(SPEC.impression_normal) >= 3
    for name, spec in SPEC.findings.items():
        assert spec.name == name and len(spec.templates) >= 3 and not spec.sides
        for other in spec.excludes:  # exclusions are declared on both sides
            assert name in SPEC.finding(other).excludes


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", FINDINGS)
def test_every_finding_renders(name, size):
    spec = SPEC.finding(name)
    for severity in spec.severities or [None]:
        out = render([Finding(name, severity=severity, location=(spec.locations or [None])[0])], size, seed=5)
        assert out.image.shape == (size, size) and out.image.dtype == np.uint8
        f = out.findings[0]
        assert f.name == name and f.bbox is not None
        assert all(g.bbox is not None for g in out.findings)
        x0, y0, x1, y1 = f.bbox
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert f.measurements and all(np.isfinite(v) for v in f.measurements.values())
        assert "central_thickness_um" in out.measurements


@pytest.mark.parametrize("name", FINDINGS)
def test_finding_changes_image_inside_its_bbox(name):
    size = 128
    for seed in range(3):
        normal = render([], size, seed).image.astype(np.int16)
        out = render([middle(name)], size, seed)
        diff = np.abs(out.image.astype(np.int16) - normal)
        x0, y0, x1, y1 = (np.array(out.findings[0].bbox) * size).round().astype(int)
        inside = np.zeros_like(diff, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert diff[inside].mean() > 8
        assert diff[inside].mean() > 2 * diff[~inside].mean()


@pytest.mark.parametrize("name", [n for n in FINDINGS if SPEC.finding(n).severities])
def test_severity_is_monotone(name):
    spec, key = SPEC.finding(name), SEVERITY_MEASURE[name]
    for seed in range(4):
        values = [render([Finding(name, severity=s, location=(spec.locations or [None])[0])], 64, seed)
                  .findings[0].measurements[key] for s in spec.severities]
        assert values == sorted(values) and len(set(values)) == len(values), (seed, values)


@pytest.mark.parametrize("name", [n for n in FINDINGS if SPEC.finding(n).locations])
def test_location_is_honoured(name):
    # right eye: nasal on the viewer's right; the fovea lies within 0.035 of the frame centre
    for seed in range(3):
        for location in SPEC.finding(name).locations:
            x0, _, x1, _ = render([middle(name, location)], 128, seed).findings[0].bbox
            centre = (x0 + x1) / 2
            if location == "parafoveal_nasal":
                assert centre > 0.56, (location, centre)
            elif location == "parafoveal_temporal":
                assert centre < 0.44, (location, centre)
            else:
                assert 0.4 < centre < 0.6, (location, centre)


def test_normal_anatomy_invariants():
    thickness = [render([], 128, seed).measurements["central_thickness_um"] for seed in range(8)]
    assert all(220 < t < 320 for t in thickness), thickness  # normal SD-OCT central subfield thickness
    assert len(set(thickness)) == len(thickness)  # anatomical variation between eyes
    image = render([], 256, 0).image.astype(float)
    rows = image.mean(axis=1)
    # dark vitreous above, bright retina / RPE in the middle third, fading choroid below
    assert rows[:60].mean() < 30 and rows[85:171].max() > 3 * rows[:60].mean()
    assert rows[230:].mean() < rows[85:171].max()


def test_fluid_and_membranes_thicken_the_centre():
    for seed in range(3):
        base = render([], 128, seed).measurements["central_thickness_um"]
        for name in ("intraretinal_fluid", "subretinal_fluid", "epiretinal_membrane", "pigment_epithelial_detachment"):
            f = Finding(name, severity="severe", location="foveal" if SPEC.finding(name).locations else None)
            assert render([f], 128, seed).measurements["central_thickness_um"] > base + 50, name


def test_measured_heights_match_the_drawing():
    size = 256
    for seed in range(3):
        for name in ("pigment_epithelial_detachment", "subretinal_fluid"):
            f = render([Finding(name, severity="severe", location="foveal")], size, seed).findings[0]
            drawn_um = (f.bbox[3] - f.bbox[1]) * SCAN_DEPTH_UM
            assert abs(drawn_um - f.measurements["height_um"]) < 3 * SCAN_DEPTH_UM / size + 10, (name, drawn_um)
    hole = render([Finding("macular_hole", severity="large")], 128, 0).findings[0].measurements
    assert hole["base_diameter_um"] > hole["minimum_linear_diameter_um"] > 400


def test_any_allowed_pair_renders():
    for a, b in itertools.combinations(FINDINGS, 2):
        if b in SPEC.finding(a).excludes:
            continue
        out = render([middle(a), middle(b, "parafoveal_nasal" if SPEC.finding(b).locations else None)], 64, 9)
        assert out.image.shape == (64, 64) and all(f.bbox is not None for f in out.findings)


@pytest.mark.parametrize("name", FINDINGS + ["normal"])
def test_report_mentions_finding(name):
    for seed in range(4):
        study = make_phantom("oct", [name], size=64, seed=(seed, 1))
        assert "{" not in study.text and "}" not in study.text
        assert study.image.shape == (64, 64)
        if name == "normal":
            assert study.label == "normal"
            continue
        terms = [t.lower() for t in SPEC.finding(name).terms]
        lowered = study.text.lower()
        assert any(t in lowered for t in terms), study.text
        assert study.findings[0].bbox is not None


def test_excluded_pair_is_refused():
    with pytest.raises(ValueError):
        make_phantom("oct", ["macular_hole", "choroidal_neovascularization"], size=64, seed=0)


def test_caused_findings_are_listed_so_reports_never_deny_them():
    # an active CNV exudes subretinal fluid; a full-thickness hole has cystic edges
    cnv = render([Finding("choroidal_neovascularization", severity="severe", location="parafoveal_nasal")]).findings
    assert [f.name for f in cnv] == ["choroidal_neovascularization", "subretinal_fluid", "intraretinal_fluid"]
    assert all(f.location == "parafoveal_nasal" and f.bbox is not None for f in cnv)
    assert cnv[1].measurements["height_um"] > 0
    hole = render([Finding("macular_hole", severity="small")]).findings
    assert [f.name for f in hole] == ["macular_hole", "intraretinal_fluid"]
    # a finding requested explicitly is not listed twice
    both = render([Finding("choroidal_neovascularization", location="foveal"),
                   Finding("subretinal_fluid", location="foveal")]).findings
    assert [f.name for f in both].count("subretinal_fluid") == 1
    for seed in range(6):
        study = make_phantom("oct", ["choroidal_neovascularization"], size=64, seed=(seed,), negatives=3)
        negated = {f.name for f in study.findings if not f.present}
        assert not negated & {"subretinal_fluid", "choroidal_neovascularization"}
