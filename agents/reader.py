"""The one reader of findings in text: the graph's own reasoning stages, read as what a text asks for.

Every part of synthmed that needs to know which findings a text states (the graph before it composes a
prompt, ``synthmed synthesize`` reading a CSV spec, the loop's request sampler checking its phrases, a
finding scorer given prompts without their structured expectation) reads it here, with the rule
reasoner the graph runs (:class:`agents.rules.RuleReasoner`: parse, then anatomy, then pathology), so
that the reward, the verifier and ``synthmed eval`` agree on what a prompt asks for.

What a reading says about a classifier's labels (:func:`project`):

- a finding stated present makes its label present, and every label it is a kind of
  ("proliferative diabetic retinopathy" -> ``diabetic_retinopathy``, "glioma" -> ``tumor``);
- a finding stated absent makes its label absent, and every label that is a kind of it
  ("no tumour" -> ``glioma``, ``meningioma`` absent); the absence of a kind says nothing of its parent;
- a whole-study normal statement ("Normal chest radiograph.") makes every label absent that the text
  does not state present;
- a finding both stated present and absent ("No right effusion. Left pleural effusion.") is present:
  negations are often side-specific, and the image must show the finding somewhere;
- hedged findings ("possible consolidation") state nothing.

    reader = FindingReader(RuleReasoner(retriever))
    reader.expected("Small left pleural effusion. No pneumothorax.", "cxr")
    -> {"pleural_effusion": True, "pneumothorax": False}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .schema import PathologyResult


def project(findings: Iterable[Mapping[str, Any]], labels: Sequence[str], lineage: Callable[[str], set[str]],
            normal: bool = False) -> dict[str, bool]:
    """label -> present (True) / absent (False) for the labels the findings state, in ``labels`` order.

    ``findings`` are ``{"name", "present", "uncertain"?}`` records (the graph's findings or a composition's);
    ``lineage(name)`` is the finding and its is-a ancestors (the lexicon's ``parents``)."""
    labels = list(dict.fromkeys(labels))
    lineages = {label: lineage(label) | {label} for label in labels}
    present: set[str] = set()
    absent: set[str] = set()
    for f in findings:
        if f.get("uncertain"):
            continue
        name = f["name"]
        if f.get("present", True):
            present.update(label for label in labels if label in lineage(name) | {name})
        else:
            absent.update(label for label in labels if name in lineages[label])
    if normal:
        absent.update(labels)
    return {label: label in present for label in labels if label in present or label in absent}


def lexicon_lineage(concepts: Iterable[Any]) -> Callable[[str], set[str]]:
    """``lineage(name)``: the concept and its is-a ancestors, by the concepts' ``parents`` (the lexicon's)."""
    parents = {c.id: list(c.parents) for c in concepts}

    def lineage(name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            c = todo.pop()
            if c not in out:
                out.add(c)
                todo += parents.get(c, [])
        return out

    return lineage


class FindingReader:
    """Reads texts with a rule reasoner (the graph's default backend), on its knowledge base's retriever."""

    def __init__(self, reasoner):
        self.reasoner = reasoner

    @property
    def modalities(self):
        return self.reasoner.modalities

    def read(self, text: str, modality: str) -> PathologyResult:
        """The pathology stage's result for ``text`` (a :class:`agents.schema.StageError` for a text it cannot read:
        empty, an unknown modality, a finding of another modality)."""
        r = self.reasoner
        request = r.parse_request(text, modality)
        return r.assess_pathology(request, r.localize_anatomy(request))

    def labels(self, modality: str) -> list[str]:
        """The findings the modality's generator was trained on (the reasoner's drawable set), in catalogue order."""
        return list(self.reasoner.labels.get(modality, ()))

    def lineage(self, name: str) -> set[str]:
        return self.reasoner.lineage(name)

    def expected(self, text: str, modality: str, labels: Sequence[str] | None = None) -> dict[str, bool]:
        """label -> stated present / absent (see :func:`project`); ``labels`` default to :meth:`labels`."""
        from generator.modalities import resolve_modality

        pathology = self.read(text, modality)
        modality = resolve_modality(modality, self.modalities)
        return self.expected_from(pathology, self.labels(modality) if labels is None else labels)

    def expected_from(self, pathology: PathologyResult, labels: Sequence[str]) -> dict[str, bool]:
        return project([f.model_dump() for f in pathology.findings], labels, self.lineage, normal=pathology.normal)

    def __call__(self, text: str, modality: str, labels: Sequence[str] | None = None) -> dict[str, bool]:
        """A finding scorer's reader (:class:`rlhf.classifiers.FindingScorer`): :meth:`expected`."""
        return self.expected(text, modality, labels)


__all__ = ["FindingReader", "lexicon_lineage", "project"]
