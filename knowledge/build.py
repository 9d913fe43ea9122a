"""Building and loading the knowledge base folder: a concept index and a case index.

    <index_dir>/concepts/   lexicon (+ RadLex, SNOMED CT) concepts
    <index_dir>/cases/      case library
    <index_dir>/build.json  what went in: counts per source, kind and modality, embedder, time

The builder receives its parts (concepts, cases, embedder); reading configs and manifests is
the caller's job.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from generator.fileio import atomic_folder, write_json_atomic

from .cases import Case
from .index import KnowledgeIndexError, VectorIndex
from .retriever import Retriever
from .schema import Concept

CASE_BATCH = 2048  # cases embedded and added per step, so a large library streams


def concept_item(c: Concept) -> dict:
    return {
        "id": c.id,
        "kind": c.kind,
        "text": c.term,
        "names": c.names(),
        "source": c.source,
        "codes": c.codes,
        "modalities": c.modalities,
        "finding": c.finding,
        "description": c.description,
    }


def _batches(items: Iterable[Case], size: int) -> Iterator[list[Case]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def build_knowledge_base(
    folder: str | os.PathLike,
    concepts: list[Concept],
    cases: Iterable[Case],
    embedder,
    concept_factory: str = "Flat",
    case_factory: str = "HNSW32",
    progress: bool = True,
) -> dict:
    """Embed and index everything; write the folder; return the build summary. The folder is built beside
    it and swapped in whole, so a reader (or a kill) never meets half a knowledge base."""
    with atomic_folder(folder) as tmp:  # settles what an earlier build, killed, left beside it
        return _build(tmp, concepts, cases, embedder, concept_factory, case_factory, progress)


def _build(folder: Path, concepts, cases, embedder, concept_factory: str, case_factory: str, progress: bool) -> dict:
    start = time.perf_counter()
    concept_index = VectorIndex(embedder.dim, concept_factory, embedder.name)
    concept_index.add(embedder.encode([c.embedding_text() for c in concepts], progress=progress), [concept_item(c) for c in concepts])
    concept_index.save(folder / "concepts")

    case_index = VectorIndex(embedder.dim, case_factory, embedder.name)
    case_counts: Counter = Counter()
    bar = tqdm(desc="cases", unit=" cases", disable=not progress)
    pending: list[Case] = []
    for batch in _batches(cases, CASE_BATCH):
        if not case_index.index.is_trained and len(pending) + len(batch) < 50_000:
            pending += batch  # an IVF index trains once, on a large enough first sample
            continue
        for group in (pending, batch):
            if group:
                case_index.add(embedder.encode([c.text for c in group]), [c.to_item() for c in group])
                case_counts.update(c.modality for c in group)
                bar.update(len(group))
        pending = []
    if pending:
        case_index.add(embedder.encode([c.text for c in pending]), [c.to_item() for c in pending])
        case_counts.update(c.modality for c in pending)
        bar.update(len(pending))
    bar.close()
    case_index.save(folder / "cases")

    summary = {
        "embedder": embedder.name,
        "dim": embedder.dim,
        "concepts": len(concepts),
        "concepts_by_kind": dict(Counter(c.kind for c in concepts)),
        "concepts_by_source": dict(Counter(c.source for c in concepts)),
        "concepts_by_modality": dict(Counter(m for c in concepts for m in (c.modalities or ["all"]))),
        "cases": len(case_index),
        "cases_by_modality": dict(case_counts),
        "concept_index": concept_factory,
        "case_index": case_factory,
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(folder / "build.json", summary)
    return summary


def add_cases(folder: str | os.PathLike, cases: Iterable[Case], embedder) -> int:
    """Incremental add: append cases to an existing case index without rebuilding it."""
    path = Path(folder) / "cases"
    index = VectorIndex.load(path, expected_dim=embedder.dim)
    known = {item["id"] for item in index.items}
    added = 0
    for batch in _batches((c for c in cases if c.id not in known), CASE_BATCH):
        index.add(embedder.encode([c.text for c in batch]), [c.to_item() for c in batch])
        added += len(batch)
    index.save(path)
    return added


def require_knowledge_base(folder: str | os.PathLike) -> Path:
    """The folder, if it holds a built knowledge base; a message saying how to build one otherwise."""
    folder = Path(folder)
    if not (folder / "concepts").is_dir():
        raise KnowledgeIndexError(f"no knowledge base in {folder}; build it with `synthmed kb build`")
    return folder


def load_retriever(
    folder: str | os.PathLike,
    embedder,
    exact_weight: float = 0.6,
    fuzzy_cutoff: float = 0.85,
    ef_search: int = 64,
    nprobe: int = 16,
    modalities: Iterable[str] | None = None,
) -> Retriever:
    folder = require_knowledge_base(folder)
    concepts = VectorIndex.load(folder / "concepts", embedder.dim, ef_search, nprobe)
    cases = VectorIndex.load(folder / "cases", embedder.dim, ef_search, nprobe) if (folder / "cases").is_dir() else None
    return Retriever(concepts, embedder.encode, cases, exact_weight, fuzzy_cutoff, modalities)
