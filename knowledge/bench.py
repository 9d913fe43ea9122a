"""Index benchmark on seeded synthetic vectors with exact brute-force ground truth.

Vectors are drawn from a mixture of Gaussians in a low-dimensional latent space, projected to
the embedding dimension with a little isotropic noise, and normalised: sentence embeddings
cluster by topic and have a low intrinsic dimension. (Isotropic vectors in 384 dimensions make
every point nearly equidistant from every other, which no real embedding set looks like.)
Queries are fresh draws from the same distribution. Ground truth is an exact inner-product search.
For each index type: build time, memory (serialised size), recall@10 against the truth, and
single-query latency p50/p99, with the speed-up over exact search at the same size.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

DEFAULT_FACTORIES = ("Flat", "HNSW32", "IVF{nlist},PQ{m}")


@dataclass
class BenchRow:
    size: int
    factory: str
    build_s: float
    memory_mb: float
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    speedup_vs_exact: float  # exact p50 latency / this p50 latency at the same size

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def synthetic_vectors(
    n: int, dim: int, seed: int = 0, clusters: int = 1000, latent_dim: int = 32, spread: float = 0.5, noise: float = 0.05
) -> np.ndarray:
    """``n`` unit vectors in ``clusters`` topics of a ``latent_dim`` space; built in chunks to bound memory.

    The mixture and projection depend on ``seed`` only through a fixed generator, so data and
    queries drawn with different seeds share one distribution."""
    structure = np.random.default_rng(12345)
    centres = structure.standard_normal((clusters, latent_dim)).astype(np.float32)
    projection = (structure.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        latent = centres[rng.integers(0, clusters, stop - start)]
        latent = latent + rng.standard_normal(latent.shape).astype(np.float32) * spread
        out[start:stop] = latent @ projection + rng.standard_normal((stop - start, dim)).astype(np.float32) * noise
    faiss.normalize_L2(out)
    return out


def resolve_factory(template: str, size: int, dim: int) -> str:
    """Fill {nlist} (about 2 sqrt(N) as a power of two) and {m} (PQ sub-vectors dividing dim)."""
    nlist = int(min(4096, max(16, 2 ** round(np.log2(2 * np.sqrt(size))))))
    m = next(m for m in (48, 32, 24, 16, 12, 8, 4) if dim % m == 0)
    return template.format(nlist=nlist, m=m)


def ivf_lists(index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.nlist if ivf is not None else 0


def _latencies(index, queries: np.ndarray, k: int) -> np.ndarray:
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times[i] = time.perf_counter() - start
    return times * 1000.0


def bench_size(
    size: int,
    dim: int,
    factories: tuple[str, ...] = DEFAULT_FACTORIES,
    queries: int = 200,
    k: int = 10,
    seed: int = 0,
    ef_search: int = 64,
    nprobe: int = 16,
    train_sample: int = 50,  # training vectors per IVF list (FAISS asks for at least 39)
    log=print,
) -> list[BenchRow]:
    data = synthetic_vectors(size, dim, seed)
    query_vectors = synthetic_vectors(queries, dim, seed + 1)
    rows: list[BenchRow] = []
    truth = None
    exact_p50 = None
    for template in factories:
        factory = resolve_factory(template, size, dim)
        log(f"  {size:>9,} x {dim}: building {factory} ...")
        start = time.perf_counter()
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            nlist = ivf_lists(index)
            sample = data[np.random.default_rng(seed).choice(size, min(size, train_sample * max(nlist, 256)), replace=False)]
            index.train(sample)
        index.add(data)
        build_s = time.perf_counter() - start
        if "HNSW" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef_search)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe
        _, found = index.search(query_vectors, k)
        if factory == "Flat":
            truth = found
        elif truth is None:  # exact ground truth when Flat was not asked for
            exact = faiss.IndexFlatIP(dim)
            exact.add(data)
            truth = exact.search(query_vectors, k)[1]
        recall = float(np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(queries)]))
        latency = _latencies(index, query_vectors, k)
        p50 = float(np.percentile(latency, 50))
        if factory == "Flat":
            exact_p50 = p50
        memory = faiss.serialize_index(index).nbytes / 2**20
        rows.append(BenchRow(size, factory, build_s, memory, recall, p50, float(np.percentile(latency, 99)), 0.0))
        del index
    if exact_p50 is not None:
        for row in rows:
            row.speedup_vs_exact = exact_p50 / row.p50_ms if row.p50_ms > 0 else float("inf")
    return rows
