"""The knowledge base a config describes, opened in one call: what every command, the agent graph, the
loop and the dashboard use (the CLI only parses its arguments and calls these).

``cfg`` is a synthmed config (``pipelines.config.SynthmedConfig``) read by duck typing: its ``knowledge``
section and ``data.modalities``; this package never imports ``pipelines``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from .cases import Case

log = logging.getLogger("synthmed.knowledge")


@lru_cache(maxsize=2)
def _load_embedder(name: str, device: str, batch_size: int):
    from .embedder import Embedder

    return Embedder(name, device=device, batch_size=batch_size)


def embedder_for(cfg):
    """The configured embedder, loaded once per process and setting (in-process callers pay its load once)."""
    k = cfg.knowledge
    return _load_embedder(k.embedder, k.device, k.batch_size)


def lexicon_for(cfg) -> list:
    """The configured lexicon: ``knowledge.lexicon_dir`` (default: the shipped one) and ``knowledge.lexicon_files``."""
    from .lexicon import LEXICON_DIR, load_lexicon

    k = cfg.knowledge
    return load_lexicon(k.lexicon_dir or LEXICON_DIR, known_modalities=cfg.data.modalities, extra_files=k.lexicon_files)


def concepts_for(cfg) -> list:
    """The lexicon, plus RadLex and SNOMED CT where the config names them."""
    k = cfg.knowledge
    concepts = lexicon_for(cfg)
    if k.radlex:
        from .radlex import load_radlex_csv, load_radlex_owl

        loader = load_radlex_csv if k.radlex.lower().endswith(".csv") else load_radlex_owl
        concepts += loader(k.radlex, roots=k.radlex_roots or None)
    if k.snomed:
        from .snomed import load_snomed_rf2

        concepts += load_snomed_rf2(k.snomed, roots=k.snomed_roots or None)
    return concepts


def cases_from_manifests(cfg, manifests: Iterable[str | os.PathLike]) -> Iterator[Case]:
    """Case records from manifests, read through the data layer (bad rows are errors)."""
    from generator.data import iter_manifest

    for manifest in manifests:
        name = Path(manifest).stem
        for row in iter_manifest(manifest, cfg.data.modalities):
            yield Case(f"{name}:{row.row}", row.text, row.modality, row.path, row.findings, row.source)


def build_from_config(cfg, embedder=None, progress: bool = True) -> dict:
    """Build the knowledge base the config describes (lexicon, vocabularies, the case manifests on disk)."""
    from .build import build_knowledge_base

    k = cfg.knowledge
    manifests = [m for m in k.case_manifests if os.path.exists(m)]
    for missing in sorted(set(k.case_manifests) - set(manifests)):
        log.warning("case manifest %s not found: skipped (make it with `synthmed data phantoms` or `synthmed data manifest`)", missing)
    return build_knowledge_base(k.index_dir, concepts_for(cfg), cases_from_manifests(cfg, manifests), embedder or embedder_for(cfg),
                                k.concept_index, k.case_index, progress=progress)


def open_knowledge_base(cfg, build_if_absent: bool = True, progress: bool = True):
    """The configured knowledge base's retriever. When it is not on disk it is built first
    (``build_if_absent``), else :class:`knowledge.index.KnowledgeIndexError` says how to build it."""
    from .build import load_retriever, require_knowledge_base

    k = cfg.knowledge
    index = Path(k.index_dir)
    if not (index / "concepts").is_dir():
        if not build_if_absent:
            require_knowledge_base(k.index_dir)  # raises with the command that builds it
        from generator.runlock import one_at_a_time

        # two commands started at once (two `synthmed generate`) build it once: the second waits, then opens it
        with one_at_a_time(index.parent / f".{index.name}.build.lock", f"waiting for another process building {index}"):
            if not (index / "concepts").is_dir():
                log.info("no knowledge base in %s: building it now (once; `synthmed kb build` rebuilds it)", index)
                summary = build_from_config(cfg, embedder_for(cfg), progress=progress)
                log.info("knowledge base: %d concepts, %d cases in %.1f s", summary["concepts"], summary["cases"], summary["seconds"])
    else:
        require_knowledge_base(k.index_dir)  # before the embedder's 10 s load
    return load_retriever(k.index_dir, embedder_for(cfg), k.exact_weight, k.fuzzy_cutoff, k.hnsw_ef_search, k.ivf_nprobe,
                          cfg.data.modalities)


__all__ = ["build_from_config", "cases_from_manifests", "concepts_for", "embedder_for", "lexicon_for", "open_knowledge_base"]
