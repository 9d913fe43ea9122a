"""Prompt composition: the structured report, the conditioning prompt and the negative prompt.

The report has four sections, History -> Technique -> Findings -> Impression. The conditioning
prompt is the report without its History, phrased the way the generator's training reports are
phrased: for a modality with a phantom specification the technique line, the finding terms and
the severity, side and location words come from that specification
(:mod:`generator.phantoms`), so a request reaches the generator in the words it learnt. Findings
the specification does not know are phrased from the lexicon's preferred term.

Refinement (:mod:`agents.refinement`) changes the composition only through its :class:`Emphasis` (restated severities, findings
to push away from, the normal report as a negative), so the trace shows exactly what changed.
"""

from __future__ import annotations

import re

from generator.config import ModalityConfig, default_modalities
from generator.data.wording import caption
from generator.phantoms import PHANTOM_MODULES, get_spec
from generator.phantoms.base import FindingSpec, PhantomSpec

from .refinement import Emphasis
from .schema import SEVERITY_ORDER

SIDE_WORDS = {"left": "left", "right": "right", "bilateral": "bilateral"}
EYE_WORDS = {"left": "left eye", "right": "right eye", "bilateral": "both eyes"}
GENERIC_TEMPLATES = ("{severity} {side} {term} in the {location}", "{severity} {side} {term}")


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:)])", r"\1", text)
    text = re.sub(r"\b(in|within) the\s*([,.;]|$)", r"\2", text)  # a location slot left empty
    return text.strip(" ,;")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _slots(template: str) -> set[str]:
    return set(re.findall(r"{(\w+)}", template))


def phantom_spec(modality: str) -> PhantomSpec | None:
    return get_spec(modality) if modality in PHANTOM_MODULES else None


def severity_word(spec: FindingSpec, severity: str) -> str:
    """The specification's word for a mild / moderate / severe grade; grades are matched by rank,
    so a finding graded small / medium / large (macular hole) reads "large" for "severe"."""
    if not spec.severities:
        return ""
    grades = list(spec.severities)
    key = severity if severity in grades else grades[min(SEVERITY_ORDER.index(severity), len(grades) - 1)]
    return (spec.severity_words.get(key) or (key,))[0]


def finding_phrase(finding: dict, modality: str, term: str | None = None) -> str:
    """One present finding in report words, e.g. "large left pleural effusion"."""
    spec = phantom_spec(modality)
    fspec = spec.findings.get(finding["name"]) if spec else None
    side, severity, location = finding.get("laterality"), finding.get("severity"), finding.get("location")
    if fspec is None:
        values = {"term": term or finding.get("term") or finding["name"].replace("_", " "),
                  "severity": {"mild": "mild", "moderate": "moderate", "severe": "severe"}.get(severity or "", ""),
                  "side": SIDE_WORDS.get(side or "", ""), "location": (location or "").replace("_", " ")}
        templates = GENERIC_TEMPLATES
    else:
        terms = fspec.bilateral_terms if side == "bilateral" and fspec.bilateral_terms else fspec.terms
        values = {"term": terms[0], "severity": severity_word(fspec, severity) if severity else "",
                  "side": (fspec.side_words.get(side) or (SIDE_WORDS[side],))[0] if side else "",
                  "location": (fspec.location_words.get(location) or (location.replace("_", " "),))[0] if location else ""}
        templates = tuple(fspec.templates) + GENERIC_TEMPLATES
    given = {k for k, v in values.items() if v} | {"term"}
    # the first template that uses every attribute given and needs nothing else (no measurements)
    usable = [t for t in templates if _slots(t) <= given | {"side", "severity"} and ("location" not in given or "location" in _slots(t))]
    template = usable[0] if usable else "{severity} {side} {term}"
    return _tidy(template.format(**{k: values.get(k, "") for k in _slots(template)}))


def negated_phrase(finding: dict, modality: str) -> str:
    spec = phantom_spec(modality)
    fspec = spec.findings.get(finding["name"]) if spec else None
    term = fspec.terms[0] if fspec else (finding.get("term") or finding["name"].replace("_", " "))
    return f"No {term}."


def technique_line(modality: str, eye: str | None = None, display: str | None = None) -> str:
    spec = phantom_spec(modality)
    if spec is None:
        return f"{display or modality.replace('_', ' ')}."
    plain = [t for t in spec.techniques if not _slots(t)]
    with_eye = [t for t in spec.techniques if _slots(t) == {"eye"}]
    line = with_eye[0].format(eye=EYE_WORDS[eye]) if eye and with_eye else (plain or [spec.techniques[0]])[0]
    return line if line.endswith(".") else line + "."


def normal_report(modality: str) -> tuple[str, str]:
    """(findings, impression) of a normal study."""
    spec = phantom_spec(modality)
    if spec is None:
        return "No abnormality.", "Normal study."
    return spec.normal_statements[0], spec.impression_normal[0]


def with_defaults(findings: list[dict], modality: str, default_severity: str | None) -> tuple[list[dict], list[dict]]:
    """The findings with a severity assumed where the user gave none and the finding has grades;
    and the assumptions made, for the report and the trace."""
    spec = phantom_spec(modality)
    out, assumed = [], []
    for f in findings:
        f = dict(f)
        fspec = spec.findings.get(f["name"]) if spec else None
        if f.get("present", True) and not f.get("severity") and default_severity and fspec is not None and fspec.severities:
            f["severity"] = default_severity
            assumed.append({"finding": f["name"], "severity": default_severity, "why": "no severity given"})
        out.append(f)
    return out, assumed


def compose_prompt(
    request: dict,
    pathology: dict,
    modality: str,
    emphasis: Emphasis | None = None,
    default_severity: str | None = "moderate",
    base_negative: str = "",
    modality_config: ModalityConfig | None = None,
    wording: dict | None = None,
) -> dict:
    """The structured report and what the generator is given.

    ``request`` is the parse stage's record, ``pathology`` the pathology stage's (as dicts).
    ``modality_config`` (default: the built-in entry of ``modality``) says whether one side names the eye
    studied, and gives the technique line of a modality without a phantom specification its display name.
    ``wording`` (a model's ``wording.json``, :mod:`generator.data.wording`): the prompt and the negative prompt are
    written in the words of the model's training captions wherever they have words for every present finding
    (the real profile's reports), the report stays in the structured form.
    Returns ``{"report": {history, technique, findings, impression, text}, "prompt", "negative",
    "assumed", "emphasis"}``.
    """
    emphasis = emphasis or Emphasis()
    modality_config = modality_config or default_modalities().get(modality)
    findings, assumed = with_defaults(pathology.get("findings") or [], modality, default_severity)
    for f in findings:
        if f["name"] in emphasis.severity and f.get("present", True):
            f["severity"] = emphasis.severity[f["name"]]
    present = [f for f in findings if f.get("present", True)]
    absent = [f for f in findings if not f.get("present", True)]
    sides = {f.get("laterality") for f in findings if f.get("laterality")}
    eye_study = modality_config is not None and modality_config.laterality == "eye"
    eye = sides.pop() if eye_study and len(sides) == 1 else None

    technique = technique_line(modality, eye, modality_config.display_name if modality_config else None)
    statements = [_capitalise(finding_phrase(f, modality)) + "." for f in present]
    statements += [negated_phrase(f, modality) for f in absent]
    if present:
        impression = _capitalise(finding_phrase(present[0], modality)) + ("." if len(present) == 1 else ", and further findings as above.")
        repeated = [f for f in present[1:] if f["name"] in emphasis.repeat_in_impression]
        if repeated:
            impression = " ".join([_capitalise(finding_phrase(f, modality)) + "." for f in [present[0], *repeated]])
        findings_text = " ".join(statements)
    else:
        normal_findings, impression = normal_report(modality)
        findings_text = " ".join([normal_findings, *statements])

    negative_parts = [p for p in [base_negative.strip()] if p]
    negative_parts += [_capitalise(finding_phrase(f, modality)) + "." for f in absent]
    for name in emphasis.negative_findings:
        if name not in {f["name"] for f in absent}:
            negative_parts.append(_capitalise(finding_phrase({"name": name}, modality)) + ".")
    if emphasis.normal_negative and present:
        normal_findings, normal_impression = normal_report(modality)
        negative_parts.append(f"{technique} Findings: {normal_findings} Impression: {normal_impression}")

    prompt = f"{technique} Findings: {findings_text} Impression: {impression}"
    learned = caption(wording, modality, present, absent) if wording else None
    if learned is not None:  # the model's own caption words
        said = wording[modality]["present"]
        prompt = learned
        technique = learned.split(" Findings: ")[0] if " Findings: " in learned else technique
        negative_parts = [p for p in [base_negative.strip()] if p]
        negative_parts += [said[n] + "." for n in dict.fromkeys([f["name"] for f in absent] + list(emphasis.negative_findings)) if n in said]
        normal = caption(wording, modality, [], []) if emphasis.normal_negative and present else None
        negative_parts += [normal] if normal else []
    history = request.get("text", "").strip()
    report = {
        "history": history,
        "technique": technique,
        "findings": findings_text,
        "impression": impression,
        "text": f"History: {history}\nTechnique: {technique}\nFindings: {findings_text}\nImpression: {impression}",
    }
    return {"report": report, "prompt": prompt, "negative": " ".join(negative_parts), "assumed": assumed,
            "emphasis": emphasis.to_dict(), "findings": findings}


__all__ = ["SEVERITY_ORDER", "Emphasis", "compose_prompt", "finding_phrase", "negated_phrase", "normal_report", "phantom_spec",
           "severity_word", "technique_line", "with_defaults"]
