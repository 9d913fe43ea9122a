"""How well the reasoning stages read requests: finding-level precision, recall and F1 against labels.

A predicted finding matches an expected one when the name and ``present`` agree and every attribute
the expected entry gives (laterality, severity, location, uncertain) agrees; attributes it leaves out
are not judged. Within one request each prediction matches at most one expected finding (a maximum
matching, so the order of findings does not matter). Used by tests/test_parse.py and by any command
that reports parse quality on a labelled corpus (tests/data/parse_requests.yaml).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

JUDGED = ("laterality", "severity", "location", "uncertain")


def finding_matches(predicted: Mapping, expected: Mapping) -> bool:
    if predicted.get("name") != expected.get("name"):
        return False
    if bool(predicted.get("present", True)) != bool(expected.get("present", True)):
        return False
    return all(predicted.get(key, False if key == "uncertain" else None) == expected[key]
               for key in JUDGED if key in expected)


def match_count(predicted: Sequence[Mapping], expected: Sequence[Mapping]) -> int:
    """Size of the largest one-to-one matching of predicted and expected findings of one request."""
    partner: dict[int, int] = {}  # predicted index -> expected index

    def assign(e: int, visited: set[int]) -> bool:
        for p, candidate in enumerate(predicted):
            if p not in visited and finding_matches(candidate, expected[e]):
                visited.add(p)
                if p not in partner or assign(partner[p], visited):
                    partner[p] = e
                    return True
        return False

    return sum(assign(e, set()) for e in range(len(expected)))


def _scores(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def finding_f1(predicted: Sequence[Sequence[Mapping]], expected: Sequence[Sequence[Mapping]]) -> dict:
    """Micro-averaged precision, recall and F1 over requests; ``predicted[i]`` and ``expected[i]`` are the
    finding dicts of request i (FindingMention.model_dump() and the corpus labels)."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predicted requests but {len(expected)} expected")
    tp = fp = fn = 0
    for pred, exp in zip(predicted, expected):
        matched = match_count(pred, exp)
        tp, fp, fn = tp + matched, fp + len(pred) - matched, fn + len(exp) - matched
    return _scores(tp, fp, fn)


def evaluate_corpus(reasoner, requests: Sequence[Mapping], resolve=None) -> dict:
    """Run parse_request -> localize_anatomy -> assess_pathology on every labelled request.

    Returns ``overall`` and ``by_modality`` scores, ``normal_accuracy`` (the normal-study flag against
    ``normal: true`` labels), ``failed`` (requests a stage refused, with its message; their expected
    findings count as missed) and ``rows`` (text, modality, expected, predicted) for a report.
    """
    from .schema import StageError

    rows, failed = [], []
    for entry in requests:
        try:
            parsed = reasoner.parse_request(entry["text"], entry["modality"])
            pathology = reasoner.assess_pathology(parsed, reasoner.localize_anatomy(parsed))
            predicted = [f.model_dump() for f in pathology.findings]
            normal, modality = pathology.normal, parsed.modality
        except StageError as exc:
            predicted, normal = [], False
            modality = resolve(entry["modality"]) if resolve else str(entry["modality"])
            failed.append({"text": entry["text"], "error": str(exc)})
        rows.append({"text": entry["text"], "modality": modality, "expected": list(entry.get("expected") or []),
                     "predicted": predicted, "normal": normal, "normal_expected": bool(entry.get("normal", False))})
    by_modality: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_modality[row["modality"]].append(row)
    return {
        "overall": finding_f1([r["predicted"] for r in rows], [r["expected"] for r in rows]),
        "by_modality": {m: finding_f1([r["predicted"] for r in rs], [r["expected"] for r in rs]) | {"requests": len(rs)}
                        for m, rs in sorted(by_modality.items())},
        "normal_accuracy": round(sum(r["normal"] == r["normal_expected"] for r in rows) / max(len(rows), 1), 4),
        "failed": failed,
        "rows": rows,
    }


__all__ = ["JUDGED", "evaluate_corpus", "finding_f1", "finding_matches", "match_count"]
