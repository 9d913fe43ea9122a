"""A FAISS index with a metadata store, persisted in one folder.

    index.faiss   the FAISS index (inner product over unit vectors = cosine similarity)
    items.jsonl   one JSON object per vector, in vector order (id, kind, text, source, codes, ...)
    meta.json     factory string, dimension, embedder name, count, format version

The index type is a FAISS factory string (``Flat`` exact; ``HNSW32`` graph; ``IVF4096,PQ48``
inverted lists with product quantisation for millions of vectors). Filters (modality, kind)
become a FAISS ID selector, so a filtered search is exact in what it admits, not a post-filter
that can come back short. Files are written to temporaries and renamed: a crash mid-save never
leaves a half-written index.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from generator.errors import UserError
from generator.fileio import append_whole, atomic_open, write_bytes_atomic, write_json_atomic

FORMAT_VERSION = 1
REBUILD_HINT = "rebuild it with `synthmed kb build`"


class KnowledgeIndexError(UserError):
    """A missing, corrupt or mismatched index; the message says how to rebuild."""


class VectorIndex:
    def __init__(self, dim: int, factory: str = "Flat", embedder: str = "", ef_search: int = 64, nprobe: int = 16):
        self.dim, self.factory, self.embedder = dim, factory, embedder
        self.ef_search, self.nprobe = ef_search, nprobe
        try:
            self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise UserError(f"invalid FAISS factory string {factory!r}: {str(exc).splitlines()[-1]}") from None
        self.items: list[dict] = []
        self._saved_items = 0  # items already in items.jsonl (appends write only the rest)

    def __len__(self) -> int:
        return self.index.ntotal

    # -- building -------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, items: list[dict]) -> None:
        """Append vectors (N, dim) with their metadata; trains an untrained index (IVF) first."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be (N, {self.dim}), got {vectors.shape}")
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors but {len(items)} metadata items")
        faiss.normalize_L2(vectors)
        if not self.index.is_trained:
            self.train(vectors)
        self.index.add(vectors)
        self.items.extend(items)

    def train(self, vectors: np.ndarray) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and len(vectors) < ivf.nlist:
            raise UserError(
                f"{self.factory!r} needs at least {ivf.nlist} training vectors (one per list), got {len(vectors)}; "
                "use fewer lists or Flat/HNSW32 for a small collection"
            )
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    # -- searching ------------------------------------------------------------------------
    def _params(self, selector) -> faiss.SearchParameters | None:
        if "HNSW" in self.factory:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        if faiss.try_extract_index_ivf(self.index) is not None:
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def allowed_ids(self, keep: Callable[[dict], bool]) -> np.ndarray:
        return np.fromiter((i for i, item in enumerate(self.items) if keep(item)), dtype=np.int64)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:  # scores (Q, k), ids (Q, k); id -1 where fewer than k qualify
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise KnowledgeIndexError(f"query dimension {queries.shape[1]} does not match the index ({self.dim}); {REBUILD_HINT}")
        faiss.normalize_L2(queries)
        if len(self) == 0 or k <= 0 or (allowed is not None and len(allowed) == 0):
            return np.zeros((len(queries), max(k, 0)), np.float32), np.full((len(queries), max(k, 0)), -1, np.int64)
        selector = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        params = self._params(selector)
        scores, ids = self.index.search(queries, k, params=params) if params is not None else self.index.search(queries, k)
        return scores, ids

    # -- persistence ----------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write or update the folder. Metadata is appended, never rewritten, when items were only added."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(folder / "index.faiss", faiss.serialize_index(self.index).tobytes())
        items_path = folder / "items.jsonl"
        if self._saved_items and items_path.exists():  # all the new rows or none (a full disk leaves the file as it was)
            rows = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in self.items[self._saved_items :])
            append_whole(items_path, rows.encode("utf-8"))
        else:
            with atomic_open(items_path, "w", encoding="utf-8") as f:
                for item in self.items:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._saved_items = len(self.items)
        meta = {
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "dim": self.dim,
            "embedder": self.embedder,
            "count": len(self),
        }
        write_json_atomic(folder / "meta.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, expected_dim: int | None = None, ef_search: int = 64, nprobe: int = 16) -> "VectorIndex":
        folder = Path(folder)
        for name in ("meta.json", "index.faiss", "items.jsonl"):
            if not (folder / name).is_file():
                raise KnowledgeIndexError(f"index file {folder / name} is missing; {REBUILD_HINT}")
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            dim, factory = int(meta["dim"]), str(meta["factory"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KnowledgeIndexError(f"{folder / 'meta.json'} is unreadable ({exc}); {REBUILD_HINT}") from None
        if expected_dim is not None and dim != expected_dim:
            raise KnowledgeIndexError(
                f"index {folder} holds {dim}-d vectors (embedder {meta.get('embedder')!r}) but the configured "
                f"embedder makes {expected_dim}-d ones; {REBUILD_HINT} with this embedder, or configure the old one"
            )
        try:  # faiss reads its own binary format: a foreign file (a pickle, garbage, a cut-off copy) fails here, nothing runs
            index = faiss.deserialize_index(np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8))
        except (RuntimeError, MemoryError) as exc:
            reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", (str(exc).strip().splitlines() or [type(exc).__name__])[-1])
            raise KnowledgeIndexError(f"index file {folder / 'index.faiss'} is corrupt ({reason}); {REBUILD_HINT}") from None
        items = _read_items(folder / "items.jsonl")
        if len(items) != index.ntotal or index.d != dim:
            raise KnowledgeIndexError(
                f"index {folder} is inconsistent: {index.ntotal} vectors of dimension {index.d}, {len(items)} metadata "
                f"rows, meta says dimension {dim}; {REBUILD_HINT}"
            )
        out = cls.__new__(cls)
        out.dim, out.factory, out.embedder = dim, factory, str(meta.get("embedder", ""))
        out.ef_search, out.nprobe = ef_search, nprobe
        out.index, out.items, out._saved_items = index, items, len(items)
        return out


def _read_items(path: Path) -> list[dict]:
    items = []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                item = json.loads(line.decode("utf-8"))
            except ValueError:  # not UTF-8, or not JSON
                item = None
            if not isinstance(item, dict):
                raise KnowledgeIndexError(f"{path} line {line_no} is corrupt; {REBUILD_HINT}")
            items.append(item)
    return items
