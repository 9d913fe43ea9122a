"""Retrieval with provenance: ``search(query, k, modality=None, kinds=None) -> list[Hit]``.

Concepts are ranked by the dense cosine similarity of query and concept text, plus
``exact_weight`` times the strength of an exact term match (see :mod:`knowledge.terms`), so
"PTX" finds pneumothorax and "pnuemothorax" still does. Cases (real or phantom studies) are
ranked by dense similarity of the query to their report text. Every hit carries what a trace
needs: id, text, score (and its parts), kind, source, codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from generator.errors import UnknownModalityError, UserError  # UnknownModalityError: importable from here as before

from .index import VectorIndex
from .schema import KINDS
from .terms import TermMatcher

HIT_KINDS = (*KINDS, "case")
CANDIDATES = 32  # dense candidates fetched before fusion, at least
MAX_K = 1000  # hits one query may ask for
MAX_QUERY_CHARS = 20_000  # a longer query is refused: term matching and embedding grow with its length


@dataclass
class Hit:
    id: str
    text: str  # preferred term, or a case's report text
    score: float  # fused score used for ranking
    kind: str  # anatomy / finding / appearance / modifier / cue / case
    source: str  # lexicon, radlex, snomed, or the case's dataset
    codes: dict[str, str] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    finding: str | None = None  # an appearance's finding
    dense: float = 0.0  # cosine similarity of query and item text
    exact: float = 0.0  # strength of the exact term match, 0 when none
    matched: str | None = None  # the surface form matched exactly
    path: str | None = None  # a case's image
    findings: list[dict] = field(default_factory=list)  # a case's structured findings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"], d["dense"], d["exact"] = round(self.score, 4), round(self.dense, 4), round(self.exact, 4)
        return d


class Retriever:
    def __init__(
        self,
        concepts: VectorIndex,
        embed: "callable",
        cases: VectorIndex | None = None,
        exact_weight: float = 0.6,
        fuzzy_cutoff: float = 0.85,
        modalities: Iterable[str] | None = None,
    ):
        self.concepts, self.cases, self.embed = concepts, cases, embed
        self.exact_weight = exact_weight
        grammatical = {i for i, item in enumerate(concepts.items) if item["kind"] in ("modifier", "cue")}
        self.matcher = TermMatcher([item.get("names") or [item["text"]] for item in concepts.items], fuzzy_cutoff, grammatical)
        found = {m for index in (concepts, cases) if index is not None for item in index.items for m in item.get("modalities") or []}
        self.modalities = sorted(set(modalities) if modalities is not None else found)
        self._allowed: dict[tuple, np.ndarray] = {}
        self._vectors = self._concept_vectors()

    def _concept_vectors(self) -> np.ndarray | None:
        """The stored concept vectors, to score exact matches the dense search did not return."""
        try:
            return self.concepts.index.reconstruct_n(0, len(self.concepts)) if len(self.concepts) else None
        except RuntimeError:  # index types that do not keep the vectors (PQ)
            return None

    def _check(self, modality: str | None, kinds: Iterable[str] | None) -> tuple[str | None, tuple[str, ...] | None]:
        if modality is not None and modality not in self.modalities:
            raise UnknownModalityError(f"unknown modality {modality!r}; known modalities: {', '.join(self.modalities)}")
        if kinds is not None:
            kinds = tuple(kinds)
            bad = [k for k in kinds if k not in HIT_KINDS]
            if bad:
                raise UserError(f"unknown kind(s) {bad}; kinds are: {', '.join(HIT_KINDS)}")
        return modality, kinds

    def _allowed_ids(self, index: VectorIndex, name: str, modality: str | None, kinds: tuple | None) -> np.ndarray | None:
        if modality is None and kinds is None:
            return None
        key = (name, modality, kinds)
        if key not in self._allowed:
            def keep(item: dict) -> bool:
                mods = item.get("modalities") or []
                return (modality is None or not mods or modality in mods) and (kinds is None or item["kind"] in kinds)

            self._allowed[key] = index.allowed_ids(keep)
        return self._allowed[key]

    def search(self, query: str, k: int = 5, modality: str | None = None, kinds: Iterable[str] | None = None) -> list[Hit]:
        if not isinstance(query, str) or not query.strip():
            raise UserError("empty query: give the words to look up, e.g. 'left pleural effusion'")
        if len(query) > MAX_QUERY_CHARS:
            raise UserError(f"query of {len(query):,} characters; a query has at most {MAX_QUERY_CHARS:,}: "
                            "look up a phrase or a sentence, not a whole document")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise UserError(f"k (hits to return) must be a whole number from 1 to {MAX_K}, got {k!r}")
        k = int(k)
        modality, kinds = self._check(modality, kinds)
        vector = self.embed([query])  # (1, dim)
        hits: list[Hit] = []

        if kinds is None or any(kind != "case" for kind in kinds):
            hits += self._concept_hits(query, vector, k, modality, kinds)
        if self.cases is not None and len(self.cases) and (kinds is None or "case" in kinds):
            allowed = self._allowed_ids(self.cases, "cases", modality, ("case",))
            scores, ids = self.cases.search(vector, k, allowed)
            for score, i in zip(scores[0], ids[0]):
                if i >= 0:
                    hits.append(self._hit(self.cases.items[i], float(score), 0.0, None))
        hits.sort(key=lambda h: (-h.score, h.id))
        return hits[:k]

    def _concept_hits(self, query, vector, k, modality, kinds) -> list[Hit]:
        allowed = self._allowed_ids(self.concepts, "concepts", modality, kinds)
        scores, ids = self.concepts.search(vector, max(CANDIDATES, 4 * k), allowed)
        dense = {int(i): float(s) for s, i in zip(scores[0], ids[0]) if i >= 0}
        floor = min(dense.values(), default=0.0)
        admitted = None if allowed is None else set(allowed.tolist())
        matches = {p: m for p, m in self.matcher.match(query).items() if admitted is None or p in admitted}
        hits = []
        for position in set(dense) | set(matches):
            if position in dense:
                similarity = dense[position]
            elif self._vectors is not None:
                similarity = float(self._vectors[position] @ vector[0])
            else:
                similarity = floor
            match = matches.get(position)
            hits.append(self._hit(self.concepts.items[position], similarity, match.strength if match else 0.0, match.form if match else None))
        return hits

    def _hit(self, item: dict, dense: float, exact: float, matched: str | None) -> Hit:
        return Hit(
            id=item["id"],
            text=item["text"],
            score=dense + self.exact_weight * exact,
            kind=item["kind"],
            source=item.get("source", ""),
            codes=dict(item.get("codes") or {}),
            modalities=list(item.get("modalities") or []),
            finding=item.get("finding"),
            dense=dense,
            exact=exact,
            matched=matched,
            path=item.get("path"),
            findings=list(item.get("findings") or []),
        )
