"""The wording of a model's training captions, learned from its manifest rows, so prompts can be written in it.

A generator conditioned on text draws best from the words it was trained on. The phantom model's
reports have templates of their own (:mod:`generator.phantoms`); a model trained on other reports (the
real profile's, ``generator.data.meddata``: "Brain MRI. Findings: intra-axial mass consistent with
glioma.") keeps in ``wording.json`` beside its weights how its captions say each thing:

- per modality, the technique sentence(s) before ``Findings:`` most often used with each label, and
  with each side where the reports name one ("Colour fundus photograph, left eye.");
- per label (and per label and severity), the statement that says it present ("intra-axial mass
  consistent with glioma") and, where the reports have one, the statement that says it absent ("no
  intracranial tumour");
- per modality, the statements of a normal study ("no diabetic macular oedema; no diabetic retinopathy");
- per modality, the pairs of labels its images show together (``together``: "diabetic_macular_edema+diabetic_retinopathy"),
  so that requests ask only for combinations the model has seen.

Learned from the rows' structured findings, never from reading the text for findings: a statement is
taken only from rows whose findings pair one to one with the statements (present findings with the
affirmative statements, absent ones with those starting "no", in order).

    wording = learn_wording(rows)
    write_wording(wording, "generator/weights/real/wording.json")
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from .records import ManifestRow

FILE = "wording.json"


def _split(text: str) -> tuple[str, list[str]] | None:
    """(technique, statements): before and after "Findings:", else the first sentence and the rest."""
    if " Findings: " in text:
        technique, rest = text.split(" Findings: ", 1)
    elif ". " in text.strip():
        technique, rest = text.strip().split(". ", 1)
        technique += "."
    else:
        return None
    statements = [s.strip() for s in rest.strip().rstrip(".").split(";") if s.strip()]
    return technique.strip(), statements


def learn_wording(rows: Iterable[ManifestRow], min_together: int = 5) -> dict:
    """``{modality: {"technique": {key: sentence}, "present": {label: statement}, "absent": {label: statement},
    "normal": statement, "together": ["a+b", ...]}}``, the most frequent of each; technique keys are ``label``,
    ``label|side``, ``normal`` and ``*`` (any); ``together`` holds the label pairs present in at least
    ``min_together`` rows."""
    techniques: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    present: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    absent: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    normal: dict[str, Counter] = defaultdict(Counter)
    together: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        parts = _split(row.text)
        if parts is None:
            continue
        technique, statements = parts
        m = row.modality
        yes = [f for f in row.findings if f.get("present", True)]
        no = [f for f in row.findings if not f.get("present", True)]
        affirm = [s for s in statements if not s.lower().startswith("no ")]
        deny = [s for s in statements if s.lower().startswith("no ")]
        techniques[m]["*"][technique] += 1
        names = sorted({f["name"] for f in yes})
        together[m].update(f"{a}+{b}" for i, a in enumerate(names) for b in names[i + 1:])
        for f in yes:
            techniques[m][f["name"]][technique] += 1
            if f.get("side"):
                techniques[m][f"{f['name']}|{f['side']}"][technique] += 1
        # statements pair with findings one to one, in order (the adapters write them in their findings' order)
        if len(yes) == len(affirm):
            for f, statement in zip(yes, affirm):
                present[m][f["name"]][statement] += 1
                if f.get("severity"):
                    present[m][f"{f['name']}|{f['severity']}"][statement] += 1
        if len(no) == len(deny):
            for f, statement in zip(no, deny):
                absent[m][f["name"]][statement] += 1
        if not yes and len(statements) == len(deny) and (not no or len(no) == len(deny)):  # a normal study
            normal[m]["; ".join(statements)] += 1
            techniques[m]["normal"][technique] += 1

    def top(counter: Counter) -> str:
        return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

    out = {}
    for m in sorted(techniques):
        out[m] = {"technique": {k: top(c) for k, c in sorted(techniques[m].items())},
                  "present": {k: top(c) for k, c in sorted(present[m].items())},
                  "absent": {k: top(c) for k, c in sorted(absent[m].items())}}
        if normal[m]:
            out[m]["normal"] = top(normal[m])
        out[m]["together"] = sorted(pair for pair, n in together[m].items() if n >= min_together)
    return out


def caption(wording: dict, modality: str, present: list[dict], absent: list[dict]) -> str | None:
    """A caption in the learned words: ``"<technique> Findings: <statement>; <statement>."``, or None where the
    wording has no words for this modality or for a present finding (the caller then composes its own)."""
    w = wording.get(modality)
    if not w or any(f["name"] not in w["present"] for f in present):
        return None
    statements = [w["present"].get(f"{f['name']}|{f.get('severity')}", w["present"][f["name"]]) for f in present]
    statements += [w["absent"][f["name"]] for f in absent if f["name"] in w["absent"]]
    if not statements:
        if "normal" not in w:
            return None
        statements = [w["normal"]]
    first = present[0] if present else None
    keys = [f"{first['name']}|{first.get('laterality')}", first["name"]] if first else ["normal"]
    technique = next((w["technique"][k] for k in [*keys, "*"] if k in w["technique"]), "")
    return f"{technique} Findings: {'; '.join(statements)}.".strip()


def write_wording(wording: dict, path: str | Path) -> Path:
    from ..fileio import write_text_atomic

    return write_text_atomic(Path(path), json.dumps(wording, indent=1, ensure_ascii=False) + "\n")


def read_wording(model_dir: str | Path) -> dict | None:
    """The model folder's ``wording.json``, or None where it has none (the phantom model writes its own templates)."""
    path = Path(model_dir) / FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


__all__ = ["FILE", "caption", "learn_wording", "read_wording", "write_wording"]
