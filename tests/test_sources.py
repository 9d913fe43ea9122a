"""Every source yields the same rows; bad input stops with file, line and column, or is skipped and listed."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from generator.data import (
    BadRows,
    DataError,
    StreamingRecords,
    collate_records,
    iter_class_folders,
    iter_hf,
    iter_manifest,
    iter_npz,
    iter_records,
    load_row,
    source_rows,
    write_manifest,
)
from generator.config import DataConfig


def png(path, value=128, shape=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path):
    return [png(tmp_path / "img" / f"{i}.png", 40 * i) for i in range(3)]


def test_minim_header_aliases_and_relative_paths(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["path", "Text", "modal"],
                         [["img/0.png", "Chest radiograph. Findings: none.", "CXR"], ["img/1.png", "Fundus photo.", "colour fundus"]])
    rows = list(iter_manifest(manifest))
    assert [r.modality for r in rows] == ["cxr", "fundus"]
    assert rows[0].row == 2  # CSV line, header is line 1
    record = load_row(rows[1])
    assert record["image"].shape == (20, 30) and record["text"] == "Fundus photo."


def test_findings_column_json_and_names(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["image_path", "caption", "modality", "findings"],
                         [["img/0.png", "a", "cxr", json.dumps([{"name": "pleural_effusion", "side": "left"}])],
                          ["img/1.png", "b", "cxr", "cardiomegaly|nodule"]])
    rows = list(iter_manifest(manifest))
    assert rows[0].findings[0]["side"] == "left"
    assert [f["name"] for f in rows[1].findings] == ["cardiomegaly", "nodule"]


@pytest.mark.parametrize(
    "row, column, message",
    [
        (["img/9.png", "text", "cxr"], "path", "image file not found"),
        (["", "text", "cxr"], "path", "empty image path"),
        (["img/0.png", "  ", "cxr"], "text", "empty text"),
        (["img/0.png", "text", "petct"], "modality", "unknown modality 'petct'"),
    ],
)
def test_bad_rows_name_line_and_column(tmp_path, images, row, column, message):
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], [["img/1.png", "ok", "cxr"], row])
    with pytest.raises(DataError) as err:
        list(iter_manifest(manifest))
    text = str(err.value)
    assert "line 3" in text and f"column {column!r}" in text and message in text


def test_missing_column_lists_accepted_names(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["file", "modality"], [["a.png", "cxr"]])
    with pytest.raises(DataError, match="column 'text': missing column; .*caption"):
        list(iter_manifest(manifest))
    manifest = write_csv(tmp_path / "n.csv", ["path", "text"], [["a.png", "x"]])
    with pytest.raises(DataError, match="pass --modality"):
        list(iter_manifest(manifest))


def test_skip_bad_counts_and_lists_rows_next_to_output(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"],
                         [["img/0.png", "ok", "cxr"], ["img/9.png", "x", "cxr"], ["img/1.png", "", "cxr"], ["img/2.png", "ok", "oct"]])
    bad = BadRows(skip=True)
    out = tmp_path / "out" / "clean.csv"
    summary = write_manifest(iter_manifest(manifest, bad=bad), out, bad=bad, progress=False)
    assert summary.rows == 2 and summary.skipped == 2
    listed = list(csv.DictReader(open(summary.skipped_file)))
    assert [(r["row"], r["column"]) for r in listed] == [("3", "path"), ("4", "text")]
    # the clean manifest reads back, paths relative to its own folder
    assert [r.modality for r in iter_manifest(out)] == ["cxr", "oct"]


def test_failed_build_leaves_no_partial_output(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], [["img/0.png", "ok", "cxr"], ["img/9.png", "x", "cxr"]])
    out = tmp_path / "clean.csv"
    with pytest.raises(DataError):
        write_manifest(iter_manifest(manifest), out, progress=False)
    assert not out.exists() and not (tmp_path / "clean.csv.tmp").exists()


def test_unreadable_image_is_a_bad_row_when_loading(tmp_path, images):
    (tmp_path / "img" / "broken.png").write_bytes(b"garbage")
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], [["img/broken.png", "x", "cxr"], ["img/0.png", "y", "cxr"]])
    with pytest.raises(DataError, match="cannot read image"):
        list(iter_records(iter_manifest(manifest)))
    bad = BadRows(skip=True)
    assert len(list(iter_records(iter_manifest(manifest), bad=bad))) == 1 and len(bad) == 1


def test_class_folders_with_template(tmp_path):
    png(tmp_path / "data" / "normal" / "a.png")
    png(tmp_path / "data" / "pleural_effusion" / "b.png")
    png(tmp_path / "data" / "pleural_effusion" / "sub" / "c.jpg")
    rows = list(iter_class_folders(tmp_path / "data", "chest x-ray", "Chest radiograph. Findings: {label}."))
    assert len(rows) == 3 and {r.modality for r in rows} == {"cxr"}
    assert rows[0].text == "Chest radiograph. Findings: normal." and rows[0].findings == []
    assert rows[1].text == "Chest radiograph. Findings: pleural effusion."
    assert rows[1].findings == [{"name": "pleural_effusion", "present": True}]


def test_medmnist_npz(tmp_path):
    np.savez(tmp_path / "p.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([[0], [1], [1]]),
             test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[1], [0]]))
    rows = list(iter_npz(tmp_path / "p.npz", "cxr", lambda y: (f"label {int(y[0])}", [])))
    assert [r.path.split("#")[1] for r in rows] == ["train/0", "train/1", "train/2", "test/0", "test/1"]
    assert rows[3].text == "label 1"
    assert load_row(rows[3])["image"].shape == (28, 28)


def test_hf_parquet_streamed_with_embedded_images(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def encoded(v):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({
        "image": [{"bytes": encoded(10), "path": None}, {"bytes": encoded(200), "path": None}],
        "text": ["first", "second"],
        "modality": ["cxr", "oct"],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    rows = list(iter_hf(str(tmp_path / "d.parquet")))
    assert [r.text for r in rows] == ["first", "second"] and [r.modality for r in rows] == ["cxr", "oct"]
    assert rows[1].image.shape == (8, 8) and rows[1].image.max() == 200
    out = write_manifest(iter(rows), tmp_path / "m" / "m.csv", progress=False)
    assert out.rows == 2 and len(list((tmp_path / "m" / "m_images").glob("*.png"))) == 2


def test_hf_imagefolder_labels_through_template(tmp_path):
    png(tmp_path / "folder" / "normal" / "a.png")
    png(tmp_path / "folder" / "pneumonia" / "b.png")
    rows = list(iter_hf(str(tmp_path / "folder"), modality="cxr", template="Chest radiograph: {label}."))
    assert sorted(r.text for r in rows) == ["Chest radiograph: normal.", "Chest radiograph: pneumonia."]
    assert all(r.path.endswith(".png") for r in rows)  # file paths kept, not re-encoded


def test_source_detection_dispatches(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], [["img/0.png", "ok", "cxr"]])
    assert len(list(source_rows(manifest, DataConfig().modalities))) == 1
    with pytest.raises(DataError, match="source not found"):
        source_rows(tmp_path / "nothing", DataConfig().modalities)


def test_streaming_dataset_with_workers_sees_every_row_once(tmp_path):
    rows = [[f"img/{i}.png", f"case {i}", "cxr"] for i in range(10)]
    for i in range(10):
        png(tmp_path / "img" / f"{i}.png", i)
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], rows)
    import torch

    ds = StreamingRecords(lambda: iter_manifest(manifest), DataConfig(image_size=16))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_records)
    texts = [t for batch in loader for t in batch["text"]]
    assert sorted(texts) == sorted(f"case {i}" for i in range(10))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_records)))
    assert batch["image"].shape == (4, 1, 16, 16)


def test_manifest_build_reads_every_header_so_corrupt_files_never_pass(tmp_path, images):
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG but not really")
    manifest = write_csv(tmp_path / "m.csv", ["path", "text", "modality"], [["img/0.png", "ok", "cxr"], ["img/corrupt.png", "x", "cxr"]])
    with pytest.raises(DataError) as err:
        write_manifest(iter_manifest(manifest), tmp_path / "o.csv", progress=False)
    assert "cannot read image" in str(err.value) and "column 'path'" in str(err.value)
    bad = BadRows(skip=True)
    summary = write_manifest(iter_manifest(manifest, bad=bad), tmp_path / "o.csv", bad=bad, progress=False)
    assert summary.rows == 1 and summary.skipped == 1
