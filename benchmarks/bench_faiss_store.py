"""ShardedFaissVectors figures: in-place update time vs size, search latency, memory, ANN recall.

Run: OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/bench_faiss_store.py
(--sizes 10000,1000000 --dim 128 --shards 4 --ann-size 100000). Prints one line per figure.
The claim under test: a batch update costs O(batch), flat at 10k and 1M rows, unlike
remove_ids + add (which rebuilds the index, 60-100 ms at 1M rows).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from felrec_stream.state.faiss_store import ShardedFaissVectors  # noqa: E402


def build(n: int, dim: int, shards: int, index_type: str = "flat", x: np.ndarray | None = None,
          **options) -> tuple[ShardedFaissVectors, float]:
    """A backend with n random (or given) vectors; returns it and the seconds to fill it."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    backend = ShardedFaissVectors(dim, shards, index_type, **options)
    backend.ensure(n, np.asarray([f"e{i}" for i in range(n)], dtype=object))
    chunk = 100_000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        values = x[lo:hi] if x is not None else rng.standard_normal((hi - lo, dim), dtype=np.float32)
        backend.put(torch.arange(lo, hi), torch.from_numpy(values))
    return backend, time.perf_counter() - start


def time_updates(backend: ShardedFaissVectors, batch: int, repeats: int,
                 source: np.ndarray | None = None) -> tuple[float, float]:
    """(median, mean) ms per put of `batch` unique random slots; the mean includes HNSW rebuilds."""
    rng = np.random.default_rng(1)
    times = []
    for _ in range(repeats):
        slots = rng.choice(backend.size, size=batch, replace=False)
        if source is not None:
            values = source[rng.integers(0, len(source), batch)]
        else:
            values = rng.standard_normal((batch, backend.dim), dtype=np.float32)
        slots_t, values_t = torch.from_numpy(slots), torch.from_numpy(values)
        start = time.perf_counter()
        backend.put(slots_t, values_t)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.mean(times))


def time_search(backend: ShardedFaissVectors, n_queries: int, k: int) -> tuple[float, float]:
    """(ms for one query, queries/s for a batch of n_queries)."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((n_queries, backend.dim), dtype=np.float32)
    backend.search(q[:1], k)
    singles = []
    for i in range(5):
        start = time.perf_counter()
        backend.search(q[i: i + 1], k)
        singles.append(time.perf_counter() - start)
    start = time.perf_counter()
    backend.search(q, k)
    return 1e3 * float(np.median(singles)), n_queries / (time.perf_counter() - start)


def remove_add_baseline(n: int, dim: int, batch: int) -> float:
    """ms per batch for IndexIDMap2(IndexFlatIP) remove_ids + add_with_ids (what we avoid)."""
    rng = np.random.default_rng(3)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(rng.standard_normal((n, dim), dtype=np.float32), np.arange(n))
    ids = rng.choice(n, size=batch, replace=False)
    start = time.perf_counter()
    index.remove_ids(ids)
    index.add_with_ids(rng.standard_normal((batch, dim), dtype=np.float32), ids)
    return 1e3 * (time.perf_counter() - start)


def clustered(n: int, dim: int, seed: int, clusters: int = 100, noise: float = 1.0) -> np.ndarray:
    """Broad Gaussian clusters (noise as large as the centre spread): hard enough for ANN recall < 1."""
    centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim), dtype=np.float32)


def ann_figures(n: int, dim: int, shards: int, batch: int, clusters: int) -> None:
    """Update time and recall@10 vs exact for hnsw and ivf after churn (clusters=1: isotropic worst case)."""
    x = clustered(n, dim, seed=0, clusters=clusters)
    exact, _ = build(n, dim, shards, "flat", x=x)
    q = clustered(200, dim, seed=99, clusters=clusters)
    churn = clustered(20 * batch, dim, seed=7, clusters=clusters)
    for kind, options in (("hnsw", {"hnsw_m": 32, "hnsw_ef_search": 64}),
                          ("ivf", {"ivf_nlist": 1024, "ivf_nprobe": 16})):
        backend, fill_s = build(n, dim, shards, kind, x=x, **options)
        update_ms, update_mean_ms = time_updates(backend, batch, 20, source=churn)
        exact.put(torch.arange(n), backend.all())  # same vectors after churn
        want = exact.search(q, 10)[1]
        got = backend.search(q, 10)[1]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
        one_ms, qps = time_search(backend, 1000, 10)
        print(f"{kind}: n={n} clusters={clusters} fill={fill_s:.1f}s update_{batch}={update_ms:.2f}ms "
              f"(mean {update_mean_ms:.1f}ms) recall@10={recall:.3f} "
              f"search_1q={one_ms:.2f}ms batch_qps={qps:.0f} bytes/entity={backend.bytes_per_entity():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ann-size", type=int, default=100_000, help="0 skips the ANN figures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    for n in (int(s) for s in args.sizes.split(",")):
        backend, fill_s = build(n, args.dim, args.shards)
        update_ms, _ = time_updates(backend, args.batch, 30)
        one_ms, qps = time_search(backend, 1000, 10)
        baseline_ms = remove_add_baseline(n, args.dim, args.batch)
        print(f"flat: n={n} shards={args.shards} fill={fill_s:.1f}s update_{args.batch}={update_ms:.2f}ms "
              f"(remove_ids+add baseline {baseline_ms:.1f}ms) search_1q={one_ms:.2f}ms batch_qps={qps:.0f} "
              f"bytes/entity={backend.bytes_per_entity():.0f}")
        del backend
    if args.ann_size:
        for clusters in (100, 1):
            ann_figures(args.ann_size, args.dim, args.shards, args.batch, clusters)


if __name__ == "__main__":
    main()
