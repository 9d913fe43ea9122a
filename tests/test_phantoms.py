"""Properties every phantom modality shares; each modality's own invariants are in test_phantom_<modality>.py."""

import hashlib
import json
import re

import numpy as np
import pytest

from generator.data import iter_manifest, load_row
from generator.phantoms import NORMAL, catalogue, compatible_pairs, get_spec, make_phantom, phantom_modalities
from generator.phantoms.base import Finding
from generator.phantoms.dataset import contact_sheet, write_phantoms

MODALITIES = phantom_modalities()


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_catalogue_has_normal_and_six_findings_per_modality():
    cat = catalogue()
    assert set(cat) == {"cxr", "chest_ct", "brain_mri", "fundus", "oct"}
    for modality, findings in cat.items():
        assert len(findings) >= 6, modality
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", f) for f in findings)


def test_same_seed_gives_byte_identical_files_across_runs_and_subsets(tmp_path):
    a = write_phantoms(tmp_path / "a", MODALITIES, per_finding=1, size=64, seed=3, progress=False)
    write_phantoms(tmp_path / "b", MODALITIES, per_finding=1, size=64, seed=3, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert (tmp_path / "a" / "labels.jsonl").read_bytes() == (tmp_path / "b" / "labels.jsonl").read_bytes()
    # a study does not depend on which other modalities were asked for
    write_phantoms(tmp_path / "c", ["oct"], per_finding=1, size=64, seed=3, progress=False)
    only_oct = digest(tmp_path / "c")
    assert only_oct and all(digest(tmp_path / "a")[k] == v for k, v in only_oct.items())
    write_phantoms(tmp_path / "d", ["oct"], per_finding=1, size=64, seed=4, progress=False)
    assert digest(tmp_path / "d") != only_oct
    assert a.images == sum(1 + len(get_spec(m).findings) for m in MODALITIES)


def test_pairs_are_every_two_findings_that_can_be_drawn_together():
    for modality in MODALITIES:
        spec = get_spec(modality)
        pairs = compatible_pairs(modality)
        assert pairs and len(set(pairs)) == len(pairs)
        for a, b in pairs:
            assert b not in spec.finding(a).excludes and a not in spec.finding(b).excludes
        n = len(spec.findings)
        clashes = {frozenset((a, x)) for a in spec.findings for x in spec.finding(a).excludes}
        assert len(pairs) == n * (n - 1) // 2 - len(clashes)
    assert ("pleural_effusion", "pneumothorax") not in compatible_pairs("cxr")  # they fill the same space
    assert ("cardiomegaly", "pleural_effusion") in compatible_pairs("cxr")


def test_a_pair_set_draws_both_findings_of_each_pair(tmp_path):
    summary = write_phantoms(tmp_path, ["cxr", "brain_mri"], per_finding=1, size=64, seed=2, progress=False, per_pair=2)
    labels = [json.loads(line) for line in open(tmp_path / "labels.jsonl")]
    pairs = [x for x in labels if "+" in x["label"]]
    assert len(pairs) == 2 * (len(compatible_pairs("cxr")) + len(compatible_pairs("brain_mri")))
    assert summary.images == len(labels) == len(pairs) + 2 + len(get_spec("cxr").findings) + len(get_spec("brain_mri").findings)
    for x in pairs:
        present = {f["name"] for f in x["findings"] if f["present"]}
        assert set(x["label"].split("+")) <= present, x
        assert x["path"].startswith(f"images/{x['modality']}/{x['label']}/")
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["per_pair"] == 2 and meta["counts"]["cxr"]["cardiomegaly+pleural_effusion"] == 2
    # the single-finding studies are the same bytes with or without pairs beside them
    write_phantoms(tmp_path / "singles", ["cxr", "brain_mri"], per_finding=1, size=64, seed=2, progress=False)
    singles = digest(tmp_path / "singles")
    assert all(digest(tmp_path)[k] == v for k, v in singles.items())


def test_a_finding_drawn_by_name_beside_a_mass_lies_on_the_side_away_from_it():
    for i in range(12):
        study = make_phantom("brain_mri", ["tumor", "midline_shift"], size=64, seed=(5, i))
        side = {f.name: f.side for f in study.findings if f.present}
        assert side["midline_shift"] != side["tumor"], (i, side)


def test_dataset_files_agree_and_read_back_through_the_data_layer(tmp_path):
    write_phantoms(tmp_path, ["cxr", "fundus"], per_finding=2, size=64, seed=0, progress=False)
    labels = [json.loads(line) for line in open(tmp_path / "labels.jsonl")]
    rows = list(iter_manifest(tmp_path / "manifest.csv"))
    assert len(rows) == len(labels) == 2 * (2 + len(get_spec("cxr").findings) + len(get_spec("fundus").findings))
    for row, label in zip(rows, labels):
        assert row.path.endswith(label["path"]) and row.text == label["text"]
        present = [f["name"] for f in row.findings if f["present"]]
        assert present[:1] == ([] if label["label"] == NORMAL else [label["label"]])
        for f in row.findings:
            if f["present"]:
                assert f["bbox"] is not None and 0 <= f["bbox"][0] < f["bbox"][2] <= 1
    record = load_row(rows[-1])
    assert record["image"].shape == (64, 64, 3)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["images"] == len(rows) and meta["seed"] == 0


@pytest.mark.parametrize("modality", MODALITIES)
def test_reports_vary_in_wording_but_not_in_facts(modality):
    spec = get_spec(modality)
    finding = next(iter(spec.findings))
    texts = {make_phantom(modality, [finding], size=32, seed=(0, i)).text for i in range(12)}
    assert len(texts) >= 4  # synonyms, abbreviations, order, section style
    for i in range(12):
        study = make_phantom(modality, [finding], size=32, seed=(0, i))
        assert "{" not in study.text and "}" not in study.text
        present = [f for f in study.findings if f.present]
        # the requested finding comes first; a renderer may add what it causes (a tumour's midline shift)
        assert present[0].name == finding and len({f.name for f in present}) == len(present)
        negated = [f.name for f in study.findings if not f.present]
        assert finding not in negated


@pytest.mark.parametrize("modality", MODALITIES)
def test_attributes_can_be_chosen_and_are_kept(modality):
    spec = get_spec(modality)
    chosen = next((f for f in spec.findings.values() if f.severities), None)
    if chosen is None:
        pytest.skip(f"{modality} has no finding with severity")
    wanted = Finding(chosen.name, side=chosen.sides[0] if chosen.sides else None,
                     location=chosen.locations[0] if chosen.locations else None, severity=chosen.severities[-1])
    study = make_phantom(modality, [wanted], size=64, seed=1)
    got = study.findings[0]
    assert (got.side, got.location, got.severity) == (wanted.side, wanted.location, wanted.severity)


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown finding 'cup_to_disc' for modality 'chest_ct'; known: "):
        make_phantom("chest_ct", ["cup_to_disc"])
    with pytest.raises(ValueError, match="no phantom generator for modality 'petct'"):
        make_phantom("petct", [])
    with pytest.raises(ValueError, match="at least 32"):
        make_phantom("cxr", [], size=8)


def test_contact_sheet(tmp_path):
    out = contact_sheet(tmp_path / "sheet.png", MODALITIES, size=48, seed=0)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 400 and im.size[1] > 300
        assert np.asarray(im.convert("L")).std() > 10


def test_a_finding_stated_without_a_location_is_drawn_at_one_on_its_side():
    from generator.phantoms import Finding, make_phantom

    for seed in range(6):  # a request worded without a location (a model trained on reports asks for "consolidation")
        study = make_phantom("cxr", [Finding("consolidation", side="right", severity="moderate")], size=64, seed=seed)
        (drawn,) = [f for f in study.findings if f.present]
        assert drawn.location.startswith("right_")
        assert make_phantom("fundus", [Finding("microaneurysms")], size=64, seed=seed).findings[0].location
    stated = Finding("consolidation", location="left_lower_lobe", severity="mild")  # fully stated: drawn as before
    assert make_phantom("cxr", [stated], size=64, seed=1).findings[0].location == "left_lower_lobe"
