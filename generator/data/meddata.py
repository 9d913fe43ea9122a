"""Adapters for the public datasets in ``../shared/meddata``: labels -> report-style text + findings.

Each adapter turns one folder into manifest rows that training and evaluation reuse. Text says
only what the labels say (no invented laterality, view or sequence). Where a dataset has no
validation split of its own, a deterministic one is made by patient where patients are known
(so no patient is on both sides), else by file.

    rows = meddata_rows("../shared/meddata/nih_cxr14_64")
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import DataError
from .records import ManifestRow
from .sources import iter_npz

VAL_FRACTION = 0.15  # share of patients (or files) put in the validation split where none exists

NIH_TERMS = {
    "Atelectasis": ("atelectasis", "atelectasis"),
    "Cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "Consolidation": ("consolidation", "consolidation"),
    "Edema": ("pulmonary_edema", "pulmonary oedema"),
    "Effusion": ("pleural_effusion", "pleural effusion"),
    "Emphysema": ("emphysema", "emphysema"),
    "Fibrosis": ("fibrosis", "pulmonary fibrosis"),
    "Hernia": ("hernia", "hernia"),
    "Infiltration": ("infiltration", "pulmonary infiltrate"),
    "Mass": ("mass", "pulmonary mass"),
    "Nodule": ("nodule", "pulmonary nodule"),
    "Pleural_Thickening": ("pleural_thickening", "pleural thickening"),
    "Pneumonia": ("pneumonia", "pneumonia"),
    "Pneumothorax": ("pneumothorax", "pneumothorax"),
}

DR_GRADES = {  # RetinaMNIST / DeepDRiD grade -> (severity, words)
    0: (None, "no diabetic retinopathy"),
    1: ("mild", "mild non-proliferative diabetic retinopathy"),
    2: ("moderate", "moderate non-proliferative diabetic retinopathy"),
    3: ("severe", "severe non-proliferative diabetic retinopathy"),
    4: ("proliferative", "proliferative diabetic retinopathy"),
}


def stable_split(key: str, fraction: float = VAL_FRACTION) -> str:
    """"val" for a fixed ``fraction`` of keys, decided by hash, the same on every machine."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < fraction else "train"


def _read_labels(folder: Path) -> Iterator[tuple[int, dict[str, str]]]:
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise DataError("labels.csv not found; is this a ../shared/meddata folder?", file=str(folder))
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row


def _findings_text(technique: str, statements: list[str], normal: str) -> str:
    if not statements:
        return f"{technique} Findings: {normal}"
    return f"{technique} Findings: {'; '.join(statements)}."


def nih_cxr14_rows(folder: Path) -> Iterator[ManifestRow]:
    """NIH ChestX-ray14 (64 px subset): 14 findings, age, sex, view; official train/valid split."""
    for line, r in _read_labels(folder):
        labels = [lab for lab in r["finding_labels"].split("|") if lab and lab != "No Finding"]
        unknown = [lab for lab in labels if lab not in NIH_TERMS]
        if unknown:
            raise DataError(f"unknown NIH label(s) {unknown}", file=str(folder / "labels.csv"), row=line, column="finding_labels", row_label="line")
        sex = {"M": "man", "F": "woman"}.get(r.get("sex", ""), "patient")
        history = f" {int(r['age'])}-year-old {sex}." if r.get("age", "").isdigit() else ""
        technique = f"Chest radiograph, {r.get('view') or 'frontal'} view.{history}"
        text = _findings_text(technique, [NIH_TERMS[lab][1] for lab in labels], "no acute cardiopulmonary abnormality.")
        findings = [{"name": NIH_TERMS[lab][0], "present": True} for lab in labels]
        split = "val" if r.get("split") == "valid" else "train"
        yield ManifestRow(str(folder / r["path"]), text, "cxr", findings, f"nih_cxr14_64:{split}", line)


def kermany_rows(folder: Path) -> Iterator[ManifestRow]:
    """Paediatric chest X-rays (Kermany 2018): normal / bacterial or viral pneumonia."""
    for line, r in _read_labels(folder):
        technique = "Paediatric chest radiograph."
        if r["label"] == "normal":
            text, findings = f"{technique} Findings: no radiographic evidence of pneumonia.", [{"name": "pneumonia", "present": False}]
        else:
            subtype = r.get("subtype", "").replace("_pneumonia", "")
            words = f"{subtype} pneumonia" if subtype in ("bacterial", "viral") else "pneumonia"
            text = f"{technique} Findings: {words}."
            findings = [{"name": "pneumonia", "present": True, **({"subtype": subtype} if subtype else {})}]
        split = stable_split(r["path"])
        yield ManifestRow(str(folder / r["path"]), text, "cxr", findings, f"kermany_pediatric_cxr:{split}", line)


BRAIN_TUMOURS = {
    "glioma": ("glioma", "intra-axial mass consistent with glioma"),
    "meningioma": ("meningioma", "extra-axial mass consistent with meningioma"),
    "pituitary": ("pituitary_tumor", "sellar mass consistent with pituitary tumour"),
}


def brain_tumor_rows(folder: Path) -> Iterator[ManifestRow]:
    """Brain tumour MRI (Nickparvar): glioma / meningioma / pituitary / no tumour; mixed planes and
    sequences, so the text names neither."""
    for line, r in _read_labels(folder):
        if r["label"] == "notumor":
            text, findings = "Brain MRI. Findings: no intracranial tumour.", [{"name": "tumor", "present": False}]
        elif r["label"] in BRAIN_TUMOURS:
            name, words = BRAIN_TUMOURS[r["label"]]
            text, findings = f"Brain MRI. Findings: {words}.", [{"name": name, "present": True}]
        else:
            raise DataError(f"unknown label {r['label']!r}", file=str(folder / "labels.csv"), row=line, column="label", row_label="line")
        split = stable_split(r["path"])
        yield ManifestRow(str(folder / r["path"]), text, "brain_mri", findings, f"brain_tumor_mri:{split}", line)


EYES = {"OD": "right eye", "OI": "left eye", "OS": "left eye"}  # OI: ojo izquierdo (the dataset is Mexican)
DR_WORDS = {"NPDR": ("non_proliferative", "non-proliferative diabetic retinopathy"), "PDR": ("proliferative", "proliferative diabetic retinopathy")}


def oct_fundus_rows(folder: Path) -> Iterator[ManifestRow]:
    """UNAM fundus + OCT (DME 0/1; DR 0 / NPDR / PDR / '-' unknown), split by patient."""
    for line, r in _read_labels(folder):
        modality = r["modality"]
        eye = EYES.get(r.get("eye", ""), "")
        technique = "Colour fundus photograph" if modality == "fundus" else "Macular OCT B-scan"
        technique = f"{technique}, {eye}." if eye else f"{technique}."
        statements, findings = [], []
        if r["DME"] == "1":
            statements.append("diabetic macular oedema")
            findings.append({"name": "diabetic_macular_edema", "present": True})
        elif r["DME"] == "0":
            statements.append("no diabetic macular oedema")
            findings.append({"name": "diabetic_macular_edema", "present": False})
        if r["DR"] in DR_WORDS:
            severity, words = DR_WORDS[r["DR"]]
            statements.append(words)
            findings.append({"name": "diabetic_retinopathy", "present": True, "severity": severity})
        elif r["DR"] == "0":
            statements.append("no diabetic retinopathy")
            findings.append({"name": "diabetic_retinopathy", "present": False})
        side = {"right eye": "right", "left eye": "left"}.get(eye)
        for f in findings:
            if side:
                f["side"] = side
        text = _findings_text(technique, statements, "no abnormality labelled.")
        split = stable_split(f"patient:{r['patient']}")
        yield ManifestRow(str(folder / r["path"]), text, modality, findings, f"oct_fundus_dme_dr:{split}", line)


CT_LABELS = {
    "normal": ("No pulmonary nodule or mass.", [{"name": "lung_cancer", "present": False}]),
    "benign": ("benign pulmonary nodule.", [{"name": "nodule", "present": True, "malignant": False}]),
    "malignant": ("malignant lung lesion (lung cancer).", [{"name": "lung_cancer", "present": True}]),
}


def chest_ct_rows(folder: Path) -> Iterator[ManifestRow]:
    """IQ-OTH/NCCD axial chest CT slices: normal / benign / malignant."""
    for line, r in _read_labels(folder):
        if r["label"] not in CT_LABELS:
            raise DataError(f"unknown label {r['label']!r}", file=str(folder / "labels.csv"), row=line, column="label", row_label="line")
        words, findings = CT_LABELS[r["label"]]
        prefix = "" if r["label"] == "normal" else "Findings: "
        text = f"Axial chest CT slice. {prefix}{words}"
        # Patients are not identified in this dataset, so the split is by file: slices of one
        # patient may fall on both sides, and validation figures on it are optimistic.
        split = stable_split(r.get("source_file") or r["path"])
        yield ManifestRow(str(folder / r["path"]), text, "chest_ct", [dict(f) for f in findings], f"chest_ct_iqothnccd:{split}", line)


def _retina_label(label: np.ndarray) -> tuple[str, list[dict]]:
    severity, words = DR_GRADES[int(label[0])]
    finding = {"name": "diabetic_retinopathy", "present": severity is not None}
    if severity:
        finding["severity"] = severity
    return f"Colour fundus photograph. Findings: {words}.", [finding]


def _pneumonia_label(label: np.ndarray) -> tuple[str, list[dict]]:
    if int(label[0]) == 1:
        return "Paediatric chest radiograph. Findings: pneumonia.", [{"name": "pneumonia", "present": True}]
    return "Paediatric chest radiograph. Findings: no radiographic evidence of pneumonia.", [{"name": "pneumonia", "present": False}]


def _npz_rows(folder: Path, modality: str, label_text, name: str) -> Iterator[ManifestRow]:
    archives = sorted(folder.glob("*.npz"))
    if not archives:
        raise DataError("no .npz archive found", file=str(folder))
    for archive in archives:
        for row in iter_npz(archive, modality, label_text):
            split = row.source.rsplit(":", 1)[-1]
            row.source = f"{name}:{'val' if split == 'val' else split}"
            yield row


MEDDATA_ADAPTERS: dict[str, Callable[[Path], Iterator[ManifestRow]]] = {
    "nih_cxr14_64": nih_cxr14_rows,
    "kermany_pediatric_cxr": kermany_rows,
    "brain_tumor_mri": brain_tumor_rows,
    "oct_fundus_dme_dr": oct_fundus_rows,
    "chest_ct_iqothnccd": chest_ct_rows,
    "retinamnist_28": lambda folder: _npz_rows(folder, "fundus", _retina_label, "retinamnist_28"),
    "pneumoniamnist_28": lambda folder: _npz_rows(folder, "cxr", _pneumonia_label, "pneumoniamnist_28"),
}


def is_meddata_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and Path(folder).name in MEDDATA_ADAPTERS


def meddata_rows(folder: str | Path) -> Iterator[ManifestRow]:
    """Manifest rows for one ``../shared/meddata`` folder, recognised by its name."""
    folder = Path(folder)
    if folder.name not in MEDDATA_ADAPTERS:
        known = ", ".join(MEDDATA_ADAPTERS)
        raise DataError(f"no adapter for folder {folder.name!r}; adapters exist for: {known}", file=str(folder))
    return MEDDATA_ADAPTERS[folder.name](folder)


def split_of(row: ManifestRow) -> str:
    """The split an adapter put a row in ("train", "val" or "test"), from its source tag."""
    return row.source.rsplit(":", 1)[-1] if ":" in row.source else ""
