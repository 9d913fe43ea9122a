"""The data layer: every source (manifest CSV, class folders, MedMNIST .npz, Hugging Face
datasets, ../shared/meddata adapters, phantoms) yields the same rows and records."""

import importlib

from .errors import BadRows, DataError
from .imageio import ImageReadError, apply_window, load_image, read_dicom
from .manifest import ManifestSummary, detect_source, source_rows, write_manifest
from .meddata import MEDDATA_ADAPTERS, meddata_rows, split_of, stable_split
from .records import MANIFEST_COLUMNS, ManifestRow, Record, findings_from_cell, findings_to_cell
from .sources import COLUMN_ALIASES, iter_class_folders, iter_hf, iter_manifest, iter_npz, iter_records, load_row

# Names that need torch load on first use, so commands that never touch tensors start fast.
_LAZY = {
    "StreamingRecords": ".dataset",
    "collate_records": ".dataset",
    "RecordTransform": ".transforms",
    "augment": ".transforms",
    "clahe": ".transforms",
    "resize_pad": ".transforms",
    "to_channels": ".transforms",
    "to_tensor": ".transforms",
    "to_uint8": ".transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadRows",
    "COLUMN_ALIASES",
    "DataError",
    "ImageReadError",
    "MANIFEST_COLUMNS",
    "MEDDATA_ADAPTERS",
    "ManifestRow",
    "ManifestSummary",
    "Record",
    "RecordTransform",
    "StreamingRecords",
    "apply_window",
    "augment",
    "clahe",
    "collate_records",
    "detect_source",
    "findings_from_cell",
    "findings_to_cell",
    "iter_class_folders",
    "iter_hf",
    "iter_manifest",
    "iter_npz",
    "iter_records",
    "load_image",
    "load_row",
    "meddata_rows",
    "read_dicom",
    "resize_pad",
    "source_rows",
    "split_of",
    "stable_split",
    "to_channels",
    "to_tensor",
    "to_uint8",
    "write_manifest",
]
