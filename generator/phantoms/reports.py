"""Report text for phantoms: structured templates with varied phrasing.

The words vary (synonyms, abbreviations, side and severity wording, order of statements,
section style); the facts never do: every statement is generated from a ground-truth
:class:`Finding`, and pertinent negatives are recorded as findings with ``present=False``.
"""

from __future__ import annotations

import re
import string

import numpy as np

from .base import Finding, FindingSpec, PhantomSpec

SIDE_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "left", "left-sided"),
    "right": ("right", "right", "right-sided"),
    "bilateral": ("bilateral",),
}

# Number-neutral, so plural terms ("haemorrhages", "drusen") read as well as singular ones.
NEGATION_TEMPLATES = ("No {term}.", "No evidence of {term}.", "No {term} seen.", "No {term} identified.")

SECTION_STYLES = (
    ("Findings: ", "Impression: "),
    ("FINDINGS: ", "IMPRESSION: "),
    ("", "Impression: "),
    ("Findings: ", "Conclusion: "),
)

_FORMATTER = string.Formatter()


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[rng.integers(len(options))])


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in _FORMATTER.parse(template) if name}


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:)])", r"\1", text)
    text = re.sub(r"\(\s*\)", "", text)
    return text.strip(" ,;")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def format_measurement(value: float) -> str:
    """Counts as integers, ratios with two decimals, millimetres with one, large values with none."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    if abs(value) < 1:
        return f"{value:.2f}"
    return f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


def phrase(spec: FindingSpec, finding: Finding, rng: np.random.Generator) -> str:
    """One phrase stating a present finding, e.g. "moderate left pleural effusion"."""
    terms = spec.bilateral_terms if finding.side == "bilateral" and spec.bilateral_terms else spec.terms
    values: dict[str, str] = {"term": _choice(rng, terms)}
    if finding.side:
        words = spec.side_words.get(finding.side) or SIDE_WORDS.get(finding.side, (finding.side,))
        values["side"] = _choice(rng, words)
    if finding.severity:
        values["severity"] = _choice(rng, spec.severity_words.get(finding.severity, (finding.severity,)))
    if finding.location:
        default = (finding.location.replace("_", " "),)
        values["location"] = _choice(rng, spec.location_words.get(finding.location, default))
    for key, value in finding.measurements.items():
        values[key] = format_measurement(value)

    # A template that needs a measurement this finding lacks would state something untrue.
    known = set(values) | {"side", "severity", "location", "Term"}
    usable = [t for t in spec.templates if _slots(t) <= known]
    template = _choice(rng, usable or ["{severity} {side} {term}"])
    values.setdefault("side", "")
    values.setdefault("severity", "")
    values.setdefault("location", "")
    values["Term"] = _capitalise(values["term"])
    return _tidy(template.format(**values))


def negative_phrase(spec: FindingSpec, rng: np.random.Generator) -> str:
    term = _choice(rng, spec.terms[:2])  # negatives read oddly with rare abbreviations
    template = _choice(rng, NEGATION_TEMPLATES)
    return template.format(term=term, Term=_capitalise(term))


def technique_line(modality: PhantomSpec, rng: np.random.Generator, report_words: dict[str, tuple[str, ...]]) -> str:
    """A technique line; lines naming a study slot ({eye}) only when the renderer supplied it."""
    usable = [t for t in modality.techniques if _slots(t) <= set(report_words)]
    template = _choice(rng, usable or [t for t in modality.techniques if not _slots(t)])
    return template.format(**{k: _choice(rng, v) for k, v in report_words.items() if v})


def compose_report(
    modality: PhantomSpec,
    present: list[Finding],
    rng: np.random.Generator,
    negatives: int = 1,
    report_words: dict[str, tuple[str, ...]] | None = None,
) -> tuple[str, list[Finding]]:
    """Report text for the present findings, and the findings with pertinent negatives added.

    ``negatives`` is the largest number of absent findings that may be stated as pertinent
    negatives; how many actually are (0..negatives) is drawn from ``rng``.
    """
    technique = technique_line(modality, rng, report_words or {})
    statements = [_capitalise(phrase(modality.finding(f.name), f, rng)) + "." for f in present]
    if len(statements) > 1 and rng.random() < 0.5:
        order = rng.permutation(len(statements))
        statements = [statements[i] for i in order]

    normal = _choice(rng, modality.normal_statements) if not present else ""
    stated = {f.name for f in present}
    excluded = {x for f in present for x in modality.finding(f.name).excludes}
    absent = [
        name
        for name in modality.findings
        if name not in stated and name not in excluded
        # a pertinent negative must not repeat what the normal statement already says
        and not any(re.search(rf"\b{re.escape(term)}\b", normal, re.IGNORECASE) for term in modality.finding(name).terms)
    ]
    n_neg = int(rng.integers(0, negatives + 1)) if absent and negatives > 0 else 0
    negated: list[Finding] = []
    if n_neg:
        for i in rng.choice(len(absent), size=min(n_neg, len(absent)), replace=False):
            spec = modality.finding(absent[int(i)])
            statements.append(negative_phrase(spec, rng))
            negated.append(Finding(name=spec.name, present=False))

    if not present:
        statements.insert(0, normal)
        impression = _choice(rng, modality.impression_normal)
    else:
        main = phrase(modality.finding(present[0].name), present[0], rng)
        impression = _capitalise(main) + ("." if len(present) == 1 else ", and further findings as above.")

    findings_head, impression_head = SECTION_STYLES[int(rng.integers(len(SECTION_STYLES)))]
    technique = technique if technique.endswith(".") else technique + "."
    body = " ".join(statements)
    text = f"{technique} {findings_head}{body} {impression_head}{impression}"
    return _tidy(text), list(present) + negated
