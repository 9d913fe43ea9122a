"""FAISS index with metadata: recall against brute force, filters, persistence, failure messages."""

import json

import numpy as np
import pytest

from knowledge.bench import bench_size, synthetic_vectors
from knowledge.index import KnowledgeIndexError, VectorIndex


def brute_force(data, queries, k):
    return np.argsort(-(queries @ data.T), axis=1)[:, :k]


def items(n):
    return [{"id": f"c{i}", "kind": "finding" if i % 2 else "anatomy", "text": f"t{i}", "modalities": ["cxr"] if i % 3 else ["oct"]} for i in range(n)]


@pytest.fixture(scope="module")
def vectors():
    return synthetic_vectors(4000, 64, seed=0, clusters=50), synthetic_vectors(50, 64, seed=1, clusters=50)


# product quantisation at 4 bits a code (16 centroids per sub-space): 2.6 s to train on these 4,000 vectors, recall 0.71;
# 8-bit codes (IVF64,PQ16: 256 centroids, fewer training points than FAISS asks for) took 18-41 s for recall 0.76
@pytest.mark.parametrize("factory, min_recall", [("Flat", 1.0), ("HNSW32", 0.95), ("IVF64,Flat", 0.9), ("IVF64,PQ32x4", 0.6)])
def test_recall_against_exact_search(vectors, factory, min_recall):
    data, queries = vectors
    index = VectorIndex(64, factory, nprobe=16)
    index.add(data, items(len(data)))
    _, found = index.search(queries, 10)
    truth = brute_force(data, queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= min_recall, f"{factory}: recall@10 {recall:.3f}"


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64,Flat"])
def test_filter_admits_only_allowed_and_never_comes_back_short(vectors, factory):
    data, queries = vectors
    index = VectorIndex(64, factory, nprobe=64, ef_search=256)
    index.add(data, items(len(data)))
    allowed = index.allowed_ids(lambda item: "oct" in item["modalities"] and item["kind"] == "anatomy")
    _, found = index.search(queries, 10, allowed)
    assert set(found.ravel()) <= set(allowed.tolist())
    assert (found >= 0).all()


def test_save_load_round_trip_and_append_only_metadata(tmp_path, vectors):
    data, queries = vectors
    index = VectorIndex(64, "Flat", embedder="test")
    index.add(data[:1000], items(1000))
    index.save(tmp_path / "idx")
    first_lines = (tmp_path / "idx" / "items.jsonl").read_bytes()
    index.add(data[1000:1500], items(1500)[1000:])
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "items.jsonl").read_bytes().startswith(first_lines)  # appended, not rewritten
    loaded = VectorIndex.load(tmp_path / "idx", expected_dim=64)
    assert len(loaded) == 1500 and loaded.items[1499]["id"] == "c1499"
    assert np.array_equal(loaded.search(queries, 5)[1], index.search(queries, 5)[1])
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["count"] == 1500


def test_failures_say_how_to_rebuild(tmp_path, vectors):
    data, _ = vectors
    index = VectorIndex(64, "Flat")
    index.add(data[:10], items(10))
    index.save(tmp_path / "idx")
    with pytest.raises(KnowledgeIndexError, match="384-d.*rebuild it with `synthmed kb build`|makes 384-d"):
        VectorIndex.load(tmp_path / "idx", expected_dim=384)
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(KnowledgeIndexError, match="corrupt.*synthmed kb build"):
        VectorIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").unlink()
    with pytest.raises(KnowledgeIndexError, match="missing.*synthmed kb build"):
        VectorIndex.load(tmp_path / "idx")


def test_bad_factory_and_small_ivf_training_are_clear():
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        VectorIndex(8, "NoSuchIndex")
    index = VectorIndex(8, "IVF64,Flat")
    with pytest.raises(ValueError, match="needs at least 64 training vectors"):
        index.add(np.ones((10, 8), np.float32), items(10))


def test_bench_measures_recall_and_speedup_against_exact():
    rows = bench_size(3000, 32, ("Flat", "HNSW32"), queries=20, log=lambda m: None)
    flat, hnsw = rows
    assert flat.recall_at_10 == 1.0 and flat.speedup_vs_exact == pytest.approx(1.0)
    assert hnsw.recall_at_10 > 0.9 and hnsw.build_s >= 0 and hnsw.memory_mb > 0
