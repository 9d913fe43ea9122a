"""Sources of manifest rows: CSV manifests, class folders, MedMNIST .npz, Hugging Face datasets.

Every source is a generator of :class:`ManifestRow`; nothing reads a whole manifest into memory,
so a manifest larger than memory streams through. Bad rows raise :class:`DataError` naming the
file, line and column, or with a :class:`BadRows` collector in skip mode are counted and listed.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..config import ModalityConfig, default_modalities
from ..modalities import ModalityResolver, UnknownModalityError, resolve_modality
from .errors import BadRows, DataError
from .imageio import ImageReadError, load_image, split_ref
from .records import ManifestRow, Record, findings_from_cell

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".ima"}

# Accepted header names per column, compared case-insensitively (MINIM uses path,Text,modal).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("path", "image", "image_path", "img_path", "filepath", "file_path", "file", "filename"),
    "text": ("text", "caption", "report", "prompt", "description", "impression"),
    "modality": ("modality", "modal", "mod", "image_modality"),
    "findings": ("findings", "labels", "finding_labels"),
    "source": ("source", "dataset"),
}

NORMAL_LABELS = {"normal", "no finding", "no_finding", "notumor", "no tumor", "healthy", "none"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long report texts


def csv_encoding(path: str | os.PathLike) -> str:
    """The encoding to read a CSV with: UTF-16 when it starts with a UTF-16 byte-order mark (Excel's "Unicode
    text"), else UTF-8 with or without a BOM (Excel's "CSV UTF-8")."""
    with open(path, "rb") as f:
        start = f.read(2)
    return "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def csv_read_error(path: str | os.PathLike, exc: Exception, what: str = "CSV file", line: int | None = None) -> str:
    """One line for a CSV that cannot be decoded or parsed: what is wrong and how to fix it (``line``: the last
    line read whole, when known)."""
    where = f" after line {line}" if line else ""
    if isinstance(exc, UnicodeError):
        return (f"{path}: not UTF-8 text{where} ({exc.reason if isinstance(exc, UnicodeDecodeError) else exc}); "
                f"save the {what} as UTF-8 (in Excel: CSV UTF-8) or UTF-16 with its byte-order mark")
    return f"{path}: not a readable {what}{where} ({exc}); check its quoting and that it is text, not a binary file"


def match_columns(header: list[str], file: str) -> dict[str, int]:
    """Column name -> index for the canonical columns found in a header (aliases accepted)."""
    lowered = [h.strip().lower() for h in header]
    found: dict[str, int] = {}
    for column, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in lowered:
                found[column] = lowered.index(alias)
                break
    for required in ("path", "text"):
        if required not in found:
            accepted = ", ".join(COLUMN_ALIASES[required])
            raise DataError(
                f"missing column; the header has {', '.join(header) or 'nothing'}; "
                f"name one column {accepted}",
                file=file,
                column=required,
            )
    return found


def iter_manifest(
    path: str | os.PathLike,
    modalities: Mapping[str, ModalityConfig] | None = None,
    modality: str | None = None,
    bad: BadRows | None = None,
    check_files: bool = True,
) -> Iterator[ManifestRow]:
    """Rows of a manifest CSV ``path,text,modality[,findings,source]``.

    Relative image paths are relative to the manifest's folder. ``modality`` is used where the
    file has no modality column. With ``check_files`` a missing image file is a bad row.
    """
    path = Path(path)
    modalities = default_modalities() if modalities is None else modalities
    bad = bad if bad is not None else BadRows(skip=False)
    base = path.parent
    name = str(path)
    try:
        encoding = csv_encoding(path)
    except OSError as exc:
        raise DataError(f"cannot open the manifest: {exc.strerror or exc}", file=name) from None
    line = 0
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError("empty file: a manifest needs a header row path,text,modality", file=name)
            cols = match_columns(header, name)
            if "modality" not in cols and modality is None:
                raise DataError(
                    "missing column and no default modality; add a column modality (or modal) "
                    "or pass --modality",
                    file=name,
                    column="modality",
                )
            resolve = ModalityResolver(modalities)
            fixed_modality = resolve(modality) if modality else None
            line = reader.line_num
            for fields in reader:
                line = reader.line_num
                if not fields or not any(cell.strip() for cell in fields):
                    continue
                try:
                    row = _manifest_row(fields, cols, len(header), line, name, base, resolve, fixed_modality, check_files)
                except DataError as error:
                    bad.handle(error)
                    continue
                yield row
    except (UnicodeError, csv.Error) as exc:  # the whole file is unreadable from here on: no row to skip
        raise DataError(csv_read_error(path, exc, "manifest", line).removeprefix(f"{path}: "), file=name) from None


def _manifest_row(
    fields: list[str],
    cols: dict[str, int],
    n_columns: int,
    line: int,
    file: str,
    base: Path,
    resolve: ModalityResolver,
    fixed_modality: str | None,
    check_files: bool,
) -> ManifestRow:
    def error(reason: str, column: str | None = None) -> DataError:
        return DataError(reason, file=file, row=line, column=column, row_label="line")

    if len(fields) != n_columns:
        raise error(f"expected {n_columns} fields as in the header, got {len(fields)} (unquoted comma?)")
    ref = fields[cols["path"]].strip()
    if not ref:
        raise error("empty image path", "path")
    file_part, inner = split_ref(ref)
    if not os.path.isabs(file_part):
        file_part = os.path.normpath(base / file_part)
        ref = file_part if inner is None else f"{file_part}#{inner}"
    if check_files and not os.path.isfile(file_part):
        raise error(f"image file not found: {file_part}", "path")
    text = fields[cols["text"]].strip()
    if not text:
        raise error("empty text; every image needs a description", "text")
    if "modality" in cols and fields[cols["modality"]].strip():
        try:
            modality = resolve(fields[cols["modality"]])
        except UnknownModalityError as exc:
            raise error(str(exc), "modality") from None
    elif fixed_modality is not None:
        modality = fixed_modality
    else:
        raise error("empty modality", "modality")
    findings: list[dict] = []
    if "findings" in cols:
        try:
            findings = findings_from_cell(fields[cols["findings"]])
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep ("[[[[...")
            raise error(f"unreadable findings: {str(exc)[:200] or type(exc).__name__}; write a JSON list of objects "
                        "with a 'name', or names separated by '|'", "findings") from None
    source = fields[cols["source"]].strip() if "source" in cols else ""
    return ManifestRow(ref, text, modality, findings, source or f"manifest:{Path(file).name}", line)


def findings_for_label(label: str) -> list[dict]:
    """One present finding named after a class label; none for a normal class."""
    if label.strip().lower().replace("_", " ") in NORMAL_LABELS:
        return []
    return [{"name": label.strip().lower().replace(" ", "_"), "present": True}]


def iter_class_folders(
    root: str | os.PathLike,
    modality: str,
    template: str = "{label}",
    label_texts: Mapping[str, str] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
) -> Iterator[ManifestRow]:
    """Rows from ``root/<class>/**/<image>``: text is ``template.format(label=...)``, where the
    label is ``label_texts[class]`` when given, else the folder name with underscores as spaces."""
    root = Path(root)
    modality = resolve_modality(modality, modalities)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError("no class sub-folders; expected ROOT/<class>/<image files>", file=str(root))
    for folder in classes:
        label = (label_texts or {}).get(folder.name, folder.name.replace("_", " "))
        text = template.format(label=label)
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for i, image in enumerate(images):
            yield ManifestRow(str(image), text, modality, findings_for_label(folder.name), f"folder:{folder.name}", i)


def iter_npz(
    path: str | os.PathLike,
    modality: str,
    label_text: Callable[[np.ndarray], tuple[str, list[dict]]],
    splits: tuple[str, ...] = ("train", "val", "test"),
    modalities: Mapping[str, ModalityConfig] | None = None,
) -> Iterator[ManifestRow]:
    """Rows of a MedMNIST-layout archive (``<split>_images``, ``<split>_labels``), as
    ``file.npz#<split>/<index>`` refs. ``label_text`` maps a label vector to (text, findings)."""
    path = Path(path)
    modality = resolve_modality(modality, modalities)
    with np.load(path, allow_pickle=False) as archive:
        present = [s for s in splits if f"{s}_images" in archive.files]
        if not present:
            raise DataError(f"no <split>_images arrays; arrays found: {', '.join(archive.files)}", file=str(path))
        labels = {s: archive[f"{s}_labels"] for s in present if f"{s}_labels" in archive.files}
        counts = {s: len(archive[f"{s}_images"]) for s in present}
    for split in present:
        if split not in labels:
            raise DataError(f"array {split}_labels missing", file=str(path), column=f"{split}_labels")
        for i in range(counts[split]):
            text, findings = label_text(np.atleast_1d(labels[split][i]))
            yield ManifestRow(f"{path}#{split}/{i}", text, modality, findings, f"npz:{path.name}:{split}", i)


def _hf_builder(source: str) -> tuple[str, dict]:
    """(builder name, load_dataset kwargs) for a folder, parquet/CSV/JSON file(s), or a hub id."""
    path = Path(source)
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return "parquet", {"data_files": parquet}
        return "imagefolder", {"data_dir": str(path)}
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv", ".json", ".jsonl"):
        builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}[suffix]
        return builder, {"data_files": str(path)}
    return source, {}  # a dataset on the hub: needs network, never used by the default profile


def _find_column(columns: list[str], canonical: str) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[a] for a in COLUMN_ALIASES[canonical] if a in lowered), None)


def iter_hf(
    source: str,
    modality: str | None = None,
    split: str = "train",
    template: str = "{label}",
    streaming: bool = True,
    modalities: Mapping[str, ModalityConfig] | None = None,
    bad: BadRows | None = None,
) -> Iterator[ManifestRow]:
    """Rows of a Hugging Face ``datasets`` source, streamed: an image folder, parquet/CSV/JSON
    files, or a hub dataset id. Text comes from a text column, else from a ``label`` class column
    through ``template``; images embedded as bytes are decoded into ``row.image``."""
    import datasets
    from PIL import Image

    modalities = default_modalities() if modalities is None else modalities
    bad = bad if bad is not None else BadRows(skip=False)
    builder, kwargs = _hf_builder(source)
    ds = datasets.load_dataset(builder, split=split, streaming=streaming, **kwargs)
    features = ds.features or {}
    columns = list(features) if features else list(next(iter(ds)).keys())
    image_col = "image" if "image" in columns else _find_column(columns, "path")
    if image_col is None:
        raise DataError(f"no image column; columns: {', '.join(columns)}", file=source, column="image")
    text_col = _find_column(columns, "text")
    modality_col = _find_column(columns, "modality")
    label_names = getattr(features.get("label"), "names", None) if features else None
    if text_col is None and "label" not in columns:
        raise DataError(f"no text or label column; columns: {', '.join(columns)}", file=source, column="text")
    if modality_col is None and modality is None:
        raise DataError("no modality column and no --modality given", file=source, column="modality")
    resolve = ModalityResolver(modalities)
    fixed = resolve(modality) if modality else None
    if features and image_col == "image" and isinstance(features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # keep file paths where there are any

    for i, example in enumerate(ds):
        try:
            yield _hf_row(example, i, source, image_col, text_col, modality_col, fixed, label_names, template, resolve, Image)
        except DataError as error:
            bad.handle(error)


def _hf_row(example, i, source, image_col, text_col, modality_col, fixed, label_names, template, resolve, Image):
    def error(reason: str, column: str) -> DataError:
        return DataError(reason, file=source, row=i, column=column)

    value = example[image_col]
    image = None
    ref = f"hf:{source}#{i}"
    if isinstance(value, dict):
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    image = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
            except OSError as exc:
                raise error(f"unreadable embedded image: {exc}", image_col) from None
        elif value.get("path"):
            ref = value["path"]
    elif isinstance(value, str) and value:
        ref = value if os.path.isabs(value) else str(Path(source).parent / value)
    elif hasattr(value, "mode"):  # an already decoded PIL image
        image = np.asarray(value)
    else:
        raise error("empty image", image_col)

    if text_col is not None:
        text = str(example[text_col] or "").strip()
        findings: list[dict] = []
    else:
        label = example["label"]
        label = label_names[label] if label_names and isinstance(label, int) else str(label)
        text = template.format(label=label.replace("_", " "))
        findings = findings_for_label(label)
    if not text:
        raise error("empty text", text_col or "label")
    if modality_col is not None and example.get(modality_col):
        try:
            modality = resolve(example[modality_col])
        except UnknownModalityError as exc:
            raise error(str(exc), modality_col) from None
    elif fixed is not None:
        modality = fixed
    else:
        raise error("empty modality", modality_col or "modality")
    return ManifestRow(ref, text, modality, findings, f"hf:{Path(source).name}", i, image)


def load_row(row: ManifestRow, modalities: Mapping[str, ModalityConfig] | None = None) -> Record:
    """A row with its image read (DICOM windowed as its modality asks)."""
    if row.image is not None:
        image = row.image
    else:
        spec = (modalities or default_modalities()).get(row.modality)
        try:
            image = load_image(row.path, window=spec.window if spec else None)
        except ImageReadError as exc:
            raise DataError(str(exc), file=row.source, row=row.row, column="path") from None
    return {
        "image": image,
        "text": row.text,
        "modality": row.modality,
        "findings": row.findings,
        "source": f"{row.source}:{row.path}" if row.source else row.path,
    }


def iter_records(
    rows: Iterator[ManifestRow],
    transform: Callable[[Record], Record] | None = None,
    modalities: Mapping[str, ModalityConfig] | None = None,
    bad: BadRows | None = None,
) -> Iterator[Record]:
    """Load (and transform) each row; unreadable images stop the run or are skipped via ``bad``."""
    bad = bad if bad is not None else BadRows(skip=False)
    for row in rows:
        try:
            record = load_row(row, modalities)
        except DataError as error:
            bad.handle(error)
            continue
        yield transform(record) if transform else record
