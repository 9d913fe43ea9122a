"""Property-based fuzzing of the file readers (Hypothesis): manifest CSVs, DICOM, image files, ratings CSVs and
`synthmed synthesize` specs.

The property is the same for every reader: whatever the bytes, the outcome is a result or one error of the project's
own class (``SynthmedError``: the CLI prints it as one line, exit 2), never another exception, a hang or a huge
allocation. The examples are derandomised (the same on every run) and sized so the whole file runs in well under a
minute on one thread; ``HYPOTHESIS_FUZZ_EXAMPLES=10`` multiplies every budget for a longer local hunt.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from generator.errors import SynthmedError

SCALE = float(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "1"))
MB = 1 << 20


def fuzz(examples: int):
    """Derandomised (reproducible in CI), no example database written into the tree, no deadline (a loaded
    2-core machine), and tmp_path shared by the examples of one test (each example rewrites its files)."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def outcome(fn, *args, **kwargs):
    """The result, or the project's error (returned, so the caller can check its message); anything else raises."""
    try:
        return fn(*args, **kwargs)
    except SynthmedError as exc:
        message = str(exc)
        assert message.strip(), f"{type(exc).__name__} with an empty message"
        return exc


def bounded(fn, *args, seconds: float = 20.0, peak_mb: float | None = None, **kwargs):
    """``outcome`` in bounded time and, with ``peak_mb``, bounded Python/NumPy memory (NumPy reports its buffers to
    tracemalloc; tracing slows deep recursion a lot, so the text tests bound time only)."""
    if peak_mb is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result = outcome(fn, *args, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1] if peak_mb is not None else 0
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    assert peak_mb is None or peak < peak_mb * MB, f"allocated {peak / MB:.0f} MiB"
    return result


# --------------------------------------------------------------------------------------- text pieces
# Cells: anything printable or not, quotes, separators, NUL, control characters and non-BMP characters.
cell_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["", " ", '"', '""', ",", "\n", "\r\n", "\x00", "a\x00b", "é", "Ü", "漢字", "😀", "\ufeff", "[", "[[", "[{}]",
     '[{"name": "x"}]', '{"name": 1}', "a|b", ";", "cxr", "CXR", "chest x-ray", "oct", "fundus", "brain_mri", "nan"])
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-16-le", "cp1252"]


@st.composite
def csv_bytes(draw, columns: list[str]) -> bytes:
    """A CSV file: a header (some of ``columns``, extra, missing, repeated or junk names), rows of any length,
    written by csv.writer with any quoting or joined raw (broken quoting), in any encoding, maybe truncated,
    maybe with a huge field or raw binary."""
    header = draw(st.lists(st.sampled_from(columns) | cell_text, max_size=len(columns) + 2))
    if draw(st.booleans()):
        header = list(dict.fromkeys(columns)) + header[:1]
    rows = draw(st.lists(st.lists(cell_text, max_size=len(header) + 2), max_size=6))
    if rows and draw(st.integers(0, 9)) == 0:  # one huge field (a 2 MiB report)
        rows[0] = [*rows[0], "x" * (2 * MB)]
    buffer = io.StringIO()
    if draw(st.booleans()):
        writer = csv.writer(buffer, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])))
        for row in ([header] if header or draw(st.booleans()) else []) + rows:
            writer.writerow(row)
    else:
        buffer.write("\n".join(",".join(r) for r in [header, *rows]))
    text = buffer.getvalue()
    encoding = draw(st.sampled_from(ENCODINGS))
    data = text.encode(encoding, errors="replace")
    choice = draw(st.integers(0, 7))
    if choice == 0:
        data = data[: draw(st.integers(0, len(data)))]
    elif choice == 1:
        data = draw(st.binary(max_size=200))
    elif choice == 2:
        data = data + b"\x00" * draw(st.integers(1, 5)) + draw(st.binary(max_size=20))
    return data


# ====================================================================================== 1. manifests
MANIFEST_COLUMNS = ["path", "text", "modality", "findings", "source", "image", "caption", "modal", "labels", "Text"]


@fuzz(120)
@given(data=csv_bytes(MANIFEST_COLUMNS), skip=st.booleans(), check_files=st.booleans(),
       modality=st.sampled_from([None, "cxr", "oct", "nope"]))
@example(data=b"", skip=False, check_files=False, modality=None)
@example(data="path,text,modality\na.png,caf\xe9,cxr\n".encode("latin-1"), skip=False, check_files=False, modality=None)
@example(data="path,text,modality\na.png,x,cxr\n".encode("utf-16"), skip=False, check_files=False, modality=None)
@example(data=b"path,text,modality,findings\na.png,x,cxr," + b"[" * 100_000 + b"\n", skip=False, check_files=False,
         modality=None)  # found: a deeply nested findings cell raised RecursionError from json.loads
def test_manifest_reader(tmp_path, data, skip, check_files, modality):
    from generator.data.errors import BadRows
    from generator.data.sources import iter_manifest

    path = tmp_path / "manifest.csv"
    path.write_bytes(data)
    (tmp_path / "a.png").write_bytes(b"not read")
    bad = BadRows(skip=skip)
    result = bounded(lambda: list(iter_manifest(path, modality=modality, bad=bad, check_files=check_files)), peak_mb=400)
    if isinstance(result, list):
        assert all(row.text.strip() and row.modality and row.path for row in result)


def test_manifest_utf16_and_bom_are_read(tmp_path):
    """Excel's "Unicode text" and "CSV UTF-8" both read; latin-1 stops with one line that says to save as UTF-8."""
    from generator.data.errors import DataError
    from generator.data.sources import iter_manifest

    for encoding in ("utf-16", "utf-8-sig"):
        path = tmp_path / f"{encoding}.csv"
        path.write_bytes("path,text,modality\na.png,Épanchement pleural,cxr\n".encode(encoding))
        rows = list(iter_manifest(path, check_files=False))
        assert [(r.text, r.modality) for r in rows] == [("Épanchement pleural", "cxr")]
    path = tmp_path / "latin1.csv"
    path.write_bytes("path,text,modality\na.png,Épanchement,cxr\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv.*UTF-8"):
        list(iter_manifest(path, check_files=False))


# ====================================================================================== 3. DICOM
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.3.4.bogus"]
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "bogus"]


@st.composite
def dicom_bytes(draw) -> bytes:
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    ds = pydicom.Dataset()
    meta = FileMetaDataset()
    coherent = draw(st.booleans())  # half the files are valid images with one odd field; half are anything
    syntax = draw(st.sampled_from(TRANSFER_SYNTAXES[:3] if coherent else TRANSFER_SYNTAXES))
    meta.TransferSyntaxUID = UID(syntax)
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dims = st.integers(0, 65535) | st.sampled_from([1, 2, 8, 65535])
    rows, cols = (draw(st.integers(1, 16)), draw(st.integers(1, 16))) if coherent or draw(st.booleans()) \
        else (draw(dims), draw(dims))
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = draw(st.sampled_from([8, 16] if coherent else [1, 8, 16, 32, 12, 0]))
    ds.BitsStored = min(ds.BitsAllocated, draw(st.sampled_from([1, 8, 12, 16, 32])))
    ds.HighBit = max(ds.BitsStored - 1, 0)
    ds.SamplesPerPixel = draw(st.sampled_from([1, 3] if coherent else [1, 3, 4, 0]))
    ds.PixelRepresentation = draw(st.sampled_from([0, 1]))
    ds.PhotometricInterpretation = draw(st.sampled_from(
        (["MONOCHROME1", "MONOCHROME2"] if ds.SamplesPerPixel == 1 else ["RGB", "YBR_FULL"]) if coherent else PHOTOMETRIC))
    if ds.SamplesPerPixel != 1:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1]))

    def raw(tag: int, vr: str, values: list[str]) -> None:  # written as is (pydicom would refuse to set them)
        value = draw(st.sampled_from(values)).encode("latin-1")
        value += b" " * (len(value) % 2)
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    if draw(st.booleans()):
        raw(0x00280008, "IS", ["1", "2", "0", "65535", "abc", "-1", "", "99999999999999"])  # NumberOfFrames
    if draw(st.booleans()):
        raw(0x00281050, "DS", ["40", "40\\50", "", "nan", "1e400", "x"])  # WindowCenter
        raw(0x00281051, "DS", ["400", "0", "-5", "", "inf"])  # WindowWidth
    if draw(st.booleans()):
        raw(0x00281053, "DS", ["1", "0", "2.5", "1e308", "nan", "y"])  # RescaleSlope
        raw(0x00281052, "DS", ["-1024", "0", "1e308"])  # RescaleIntercept
    if coherent or draw(st.integers(0, 4)):  # sometimes no PixelData at all
        expected = rows * cols * max(ds.SamplesPerPixel, 1) * max(ds.BitsAllocated, 8) // 8
        size = expected if expected <= 4096 and (coherent or draw(st.booleans())) else draw(st.integers(0, 4096))
        ds.PixelData = draw(st.binary(min_size=size, max_size=size)) if size <= 64 else bytes(size)
        ds["PixelData"].VR = "OB" if ds.BitsAllocated <= 8 else "OW"
    buffer = io.BytesIO()
    little = syntax != "1.2.840.10008.1.2.2"
    implicit = syntax == "1.2.840.10008.1.2"
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True, little_endian=little, implicit_vr=implicit)
    except Exception:  # a combination pydicom will not write: not an input we can make
        assume(False)
    data = buffer.getvalue()
    cut = draw(st.sampled_from([None, None, None, 0, 132, 200, len(data) // 2, len(data) - 1]))
    return data if cut is None else data[:cut]


def _check_image(result) -> None:
    event("decoded" if isinstance(result, np.ndarray) else "refused")  # --hypothesis-show-statistics shows the mix
    if isinstance(result, np.ndarray):
        assert result.dtype == np.uint8 and (result.ndim == 2 or (result.ndim == 3 and result.shape[2] == 3)), result.shape


@fuzz(60)
@given(data=dicom_bytes(), window=st.sampled_from([None, (40.0, 400.0), (0.0, 0.0), (float("nan"), 1.0)]))
def test_dicom_reader(tmp_path, data, window):
    from generator.data.imageio import load_image, probe_image

    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    bounded(probe_image, path, seconds=10, peak_mb=64)
    _check_image(bounded(load_image, path, window=window, seconds=10, peak_mb=256))


def test_dicom_absurd_dimensions_are_refused_before_decoding(tmp_path):
    """65535 x 65535 with a compressed transfer syntax: refused from the header, nothing near 4 GiB allocated."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate

    from generator.data.imageio import ImageReadError, load_image

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"  # RLE Lossless
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows = ds.Columns = 65535
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 8, 8, 7, 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = encapsulate([struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * 8])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    error = bounded(load_image, path, peak_mb=64)
    assert isinstance(error, ImageReadError) and "65535 x 65535 pixels" in str(error), error


# ====================================================================================== 4. images
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "I", "F", "YCbCr", "PA", "La", "RGBX"]
FORMATS = ["PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP"]


@st.composite
def image_bytes(draw) -> tuple[bytes, str]:
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    im = Image.frombytes(mode, (w, h), rng.bytes(len(Image.new(mode, (1, 1)).tobytes()) * w * h)) \
        if mode not in ("PA", "La") else Image.new(mode, (w, h))
    if mode == "P":
        im.putpalette(list(rng.integers(0, 256, 768)))
    buffer = io.BytesIO()
    try:
        im.save(buffer, fmt)
    except (OSError, ValueError, KeyError, TypeError):  # a mode this format cannot hold
        assume(False)
    data = buffer.getvalue()
    damage = draw(st.integers(0, 4))
    if damage == 1:  # truncated
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == 2:  # a few flipped bytes
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        data = bytes(data)
    suffix = {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, f".{fmt.lower()}")
    return data, suffix


def png_with_size(width: int, height: int, mode_byte: tuple[int, int] = (8, 0), idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (bit depth, colour type) and holds ``idat`` (maybe nothing)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, *mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@fuzz(120)
@given(item=image_bytes())
def test_image_reader(tmp_path, item):
    from generator.data.imageio import MAX_PIXELS, load_image, probe_image

    data, suffix = item
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    outcome(probe_image, path)
    # A damaged header may claim any size up to the project limit; Pillow allocates that before it finds the data
    # short (found: a flipped BMP/TIFF byte made it allocate 80 MiB, and claim 184 M pixels, PIL's own bomb error).
    _check_image(bounded(load_image, path, seconds=10, peak_mb=4 * MAX_PIXELS / MB + 16))


@fuzz(40)
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1),
       depth=st.sampled_from([(1, 0), (8, 0), (16, 0), (8, 2), (8, 6), (16, 6), (8, 3)]))
@example(width=100_000, height=100_000, depth=(1, 0))  # beyond PIL's own bomb error
@example(width=10_000, height=10_000, depth=(8, 0))  # 100 Mpx: PIL only warns; the project limit refuses it
def test_decompression_bomb_is_refused(tmp_path, width, height, depth):
    """A header claiming a huge image (with 1 MiB of zeros behind it, a real bomb's ratio) is refused from the header."""
    from generator.data.imageio import MAX_PIXELS, ImageReadError, load_image, probe_image

    idat = zlib.compress(bytes(MB), 9)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_size(width, height, depth, idat))
    result = bounded(load_image, path, seconds=10, peak_mb=64)
    if width * height > MAX_PIXELS:
        assert isinstance(result, ImageReadError) and "pixels" in str(result), result
        assert isinstance(outcome(probe_image, path), ImageReadError)
    else:
        _check_image(result)


# ====================================================================================== 8. ratings
RATING_COLUMNS = ["image_path", "rating", "modality", "expert_level", "prompt", "comment"]
rating_cell = st.sampled_from(["1", "5", "3", "0", "6", "-1", "2.5", "nan", "inf", "-inf", "1e309", "five", "", " 4 "]) \
    | st.integers(-10, 200).map(str)
level_cell = st.sampled_from(["junior", "senior", "expert", "EXPERT", "", "student", "\x00"])
modality_cell = st.sampled_from(["cxr", "CXR", "oct", "fundus", "", "nope", "brain mri"])
path_cell = st.sampled_from(["a.png", "../a.png", "/etc/passwd", "", "a\x00b.png", "sub/../../x.png", "é.png",
                             "x" * 5000, "~/a.png", "C:\\a.png"])


@st.composite
def ratings_bytes(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(csv_bytes(RATING_COLUMNS))
    header = draw(st.permutations(RATING_COLUMNS).map(lambda c: c[: len(c) - 0]))
    header = [h for h in header if draw(st.integers(0, 9))]  # now and then a column is missing
    cells = {"image_path": path_cell, "rating": rating_cell, "modality": modality_cell, "expert_level": level_cell,
             "prompt": cell_text, "comment": cell_text}
    rows = draw(st.lists(st.tuples(*(cells[h] for h in header)).map(list), max_size=6))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])), errors="replace")


@fuzz(120)
@given(data=ratings_bytes(), scale=st.sampled_from([None, (1.0, 5.0), (5.0, 1.0)]))
@example(data=b"image_path,rating,modality,expert_level,prompt\na.png,nan,cxr,expert,x\n", scale=(1.0, 5.0))
@example(data=b"image_path,rating,modality,expert_level,prompt\na\x00b.png,3,cxr,expert,x\n", scale=None)
@example(data=b"image_path,rating,modality,expert_level,prompt\na.png,9,cxr,expert,x\n", scale=(1.0, 5.0))
def test_ratings_readers(tmp_path, data, scale):
    from pipelines.dashboard.data import read_ratings_rows
    from rlhf.config import SelectorConfig
    from rlhf.selector import read_ratings

    path = tmp_path / "ratings.csv"
    path.write_bytes(data)
    rows = bounded(read_ratings_rows, path, peak_mb=400)
    assert isinstance(rows, (list, SynthmedError))
    cfg = SelectorConfig(rating_scale=scale)
    table = bounded(read_ratings, path, cfg, peak_mb=400)
    if not isinstance(table, SynthmedError):
        assert np.isfinite(table.ratings).all() and ((table.targets >= 0) & (table.targets <= 1)).all()
        assert table.scale[0] <= table.ratings.min() and table.ratings.max() <= table.scale[1]


def test_ratings_paths_are_checked(tmp_path):
    """A missing ratings CSV is the project's error too (not a bare FileNotFoundError), naming the file."""
    from generator.errors import UserError
    from pipelines.dashboard.data import read_ratings_rows
    from rlhf.config import SelectorConfig
    from rlhf.selector import read_ratings

    with pytest.raises(UserError, match="ratings CSV not found"):
        read_ratings(tmp_path / "nope.csv", SelectorConfig())
    assert read_ratings_rows(tmp_path / "nope.csv") == []
    with pytest.raises(UserError, match="is a folder; give the ratings CSV"):
        read_ratings(tmp_path, SelectorConfig())


# ====================================================================================== 7. synthesize specs
@pytest.fixture(scope="module")
def synth_cfg(tmp_path_factory):
    """CSV specs are read by the graph's reader on a knowledge base: one of the lexicon alone, built here once, so no
    example pays for the build (and nothing is written into the working folder)."""
    from knowledge.open import open_knowledge_base
    from pipelines.config import load_config

    cfg = load_config("tiny", {"knowledge.index_dir": str(tmp_path_factory.mktemp("kb") / "kb"), "knowledge.case_manifests": []})
    open_knowledge_base(cfg, progress=False)
    return cfg


spec_text = st.sampled_from(["Small left pleural effusion.", "Normal chest radiograph.", "No pneumothorax.",
                             "Large right pneumothorax. Moderate cardiomegaly.", "drusen", "Subretinal fluid.",
                             "pneumothorax and no pneumothorax", "Normal study. Pneumothorax."]) | cell_text
count = st.integers(-3, 12) | st.sampled_from([10**7, 10**12, 2**63])
spec_n = count.map(str) | st.sampled_from(["1.5", "", "x", "1e3", "٣", "NaN", " 2 "])
spec_modality = st.sampled_from(["cxr", "CXR", "oct", "fundus", "chest_ct", "brain_mri", "", "nope", "mri"])


@st.composite
def spec_csv(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        return draw(csv_bytes(["text", "modality", "n"]))
    header = draw(st.permutations(["text", "modality", "n"]))
    rows = draw(st.lists(st.fixed_dictionaries({"text": spec_text, "modality": spec_modality, "n": spec_n}), max_size=4))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[r[h] for h in header] for r in rows])
    return buffer.getvalue().encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])), errors="replace")


FINDINGS = ["pleural_effusion", "pneumothorax", "cardiomegaly", "pleural_effusion+pneumothorax", "drusen", "normal",
            "nope", "a+b+c", "pneumothorax+pneumothorax", 3, None]
yaml_scalar = (count | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none()
               | st.sampled_from(["x", "", "1", "left"]))
yaml_value = st.recursive(yaml_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(["n", "normal", "x", 1]), inner, max_size=3), max_leaves=6)


@st.composite
def spec_yaml(draw) -> bytes:
    import yaml

    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200)).encode("utf-8", errors="replace")
    entry = draw(st.fixed_dictionaries({}, optional={
        "n": count | yaml_value, "normal": count | st.floats(0, 1.5) | yaml_value,
        "findings": st.dictionaries(st.sampled_from(FINDINGS), count | st.floats(-0.5, 1.5) | st.floats() | yaml_value,
                                    max_size=3) | yaml_value,
        "severities": st.dictionaries(st.sampled_from(["mild", "moderate", "severe", "huge"]), yaml_scalar, max_size=3)
        | yaml_value,
        "sides": st.lists(st.sampled_from(["left", "right", "bilateral", "up"]), max_size=3) | yaml_value,
        "negatives": yaml_scalar, "colour": yaml_value}))
    mix = {"modalities": draw(st.dictionaries(spec_modality | st.integers(), st.just(entry) | yaml_value, max_size=2))}
    if draw(st.booleans()):
        mix["negatives"] = draw(yaml_scalar)
    if draw(st.integers(0, 5)) == 0:
        mix[draw(st.sampled_from(["modality", "extra"]))] = draw(yaml_value)
    text = yaml.safe_dump(mix if kind != 5 else draw(yaml_value), allow_unicode=True)
    return text.encode(draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])), errors="replace")


@fuzz(80)
@given(data=spec_csv())
@example(data=b"text,modality,n\nSmall left pleural effusion.,cxr,1000000000000\n")  # found: a list of 10^12 slots (memory)
def test_synthesize_csv_spec(tmp_path, synth_cfg, data):
    from pipelines.synthesize import read_spec

    path = tmp_path / "spec.csv"
    path.write_bytes(data)
    bounded(read_spec, path, synth_cfg, 0, seconds=30, peak_mb=400)


@fuzz(80)
@given(data=spec_yaml())
@example(data=b"modalities:\n  cxr:\n    n: 10\n    findings: {pneumothorax: .nan}\n")  # found: NaN share -> ValueError
@example(data=b"modalities:\n  cxr:\n    findings: {pneumothorax: 1000000000000}\n")  # found: 10^12 draws (a hang)
@example(data=b"modalities:\n  cxr:\n    n: 1000000000000\n    findings: {pneumothorax: 0.5}\n")
@example(data=b"modalities:\n  cxr:\n    findings: {pneumothorax: 1}\n    severities: {mild: .nan}\n")
@example(data=b"modalities: {" * 5000)
def test_synthesize_yaml_spec(tmp_path, synth_cfg, data):
    from pipelines.synthesize import read_spec

    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    bounded(read_spec, path, synth_cfg, 0, seconds=30, peak_mb=400)


def test_spec_read_errors_name_the_file(tmp_path, synth_cfg):
    from generator.errors import UserError
    from pipelines.synthesize import MAX_SPEC_IMAGES, read_spec

    path = tmp_path / "spec.csv"
    path.write_bytes("text,modality,n\nÉpanchement pleural gauche,cxr,1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"spec\.csv.*UTF-8"):
        read_spec(path, synth_cfg, 0)
    path.write_text(f"text,modality,n\nSmall left pleural effusion.,cxr,{MAX_SPEC_IMAGES + 1}\n")
    with pytest.raises(UserError, match=f"at most {MAX_SPEC_IMAGES:,}"):
        read_spec(path, synth_cfg, 0)
