"""The ../shared/meddata adapters (skipped where the folder is absent)."""

import pytest

from generator.data import load_row, meddata_rows, split_of
from generator.data.meddata import MEDDATA_ADAPTERS

EXPECTED = {  # folder -> (rows, modalities) as documented in meddata/README.md
    "nih_cxr14_64": (723, {"cxr"}),
    "kermany_pediatric_cxr": (2000, {"cxr"}),
    "brain_tumor_mri": (5708, {"brain_mri"}),
    "oct_fundus_dme_dr": (2150, {"oct", "fundus"}),
    "chest_ct_iqothnccd": (878, {"chest_ct"}),
    "retinamnist_28": (1600, {"fundus"}),
    "pneumoniamnist_28": (5030, {"cxr"}),
}


@pytest.mark.parametrize("name", list(MEDDATA_ADAPTERS))
def test_adapter_rows_texts_and_images(meddata, name):
    rows = list(meddata_rows(meddata / name))
    count, modalities = EXPECTED[name]
    assert len(rows) == count
    assert {r.modality for r in rows} == modalities
    assert all(r.text.strip() and "Findings" in r.text or r.text.startswith("Axial chest CT") for r in rows)
    assert {split_of(r) for r in rows} <= {"train", "val", "test"}
    assert "val" in {split_of(r) for r in rows}
    for row in rows[:: max(1, len(rows) // 5)]:
        record = load_row(row)
        assert record["image"].ndim in (2, 3) and record["image"].size > 0


def test_nih_text_reads_like_a_report(meddata):
    rows = list(meddata_rows(meddata / "nih_cxr14_64"))
    multi = next(r for r in rows if len(r.findings) >= 2)
    assert multi.text.startswith("Chest radiograph, ") and "Findings: " in multi.text
    assert all(f["present"] for f in multi.findings)
    normal = next(r for r in rows if not r.findings)
    assert normal.text.endswith("Findings: no acute cardiopulmonary abnormality.")


def test_eye_dataset_split_is_by_patient(meddata):
    rows = list(meddata_rows(meddata / "oct_fundus_dme_dr"))
    patient = lambda r: r.path.rsplit("/", 1)[-1].split("_")[0]  # noqa: E731
    train = {patient(r) for r in rows if split_of(r) == "train"}
    val = {patient(r) for r in rows if split_of(r) == "val"}
    assert val and not (train & val)
    right = next(r for r in rows if "_OD_" in r.path)
    assert "right eye" in right.text
