"""Query-service figures: recommendation latency (HTTP and in-process), ANN recall, freshness.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_query.py
     (--sizes 100000,1000000 --dim 128 --users 20000 --queries 500 --index-types flat,hnsw)

Per catalog size N and index type (flat = exact, hnsw = ANN side index):
- p50/p99 latency of GET /v1/users/{id}/recommendations?k=10&exclude_recent=true over real HTTP
  (uvicorn in a thread, one keep-alive httpx client, sequential requests) and of the same query
  through QueryEngine.top_k_items in process;
- recall@10 of the hnsw answers against the exact answers for the same users;
- freshness: a FELRec encoder (d_model = dim) applies micro-batches of brand-new items to the
  store under the engine lock (the worker's path), then the newest item is queried; figure =
  seconds from the batch's arrival to the query answering with it (excludes Kafka and the
  batcher's wait, which the worker's own metrics cover).

Vectors are a Gaussian mixture (1000 centres + noise) rather than iid noise: iid vectors have no
neighbourhood structure and make every ANN index look bad; real representations cluster.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from felrec_stream.config import EncoderConfig, ModelConfig  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.serving.app import QueryEngine, create_app, serve_in_thread  # noqa: E402
from felrec_stream.serving.client import FelrecClient  # noqa: E402
from felrec_stream.state.engine import infer_batch  # noqa: E402
from felrec_stream.state.faiss_store import ShardedFaissVectors  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import EventBatch  # noqa: E402

HISTORY = 32


def mixture(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """n vectors around random centres (noise 0.5 of the centre scale)."""
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 200_000):
        hi = min(n, lo + 200_000)
        pick = rng.integers(0, len(centres), hi - lo)
        out[lo:hi] = centres[pick] + 0.5 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    return out


def build_store(items: np.ndarray, users: np.ndarray, index_type: str, shards: int,
                rng: np.random.Generator) -> tuple[RepresentationStore, float]:
    """A store with the given vectors and a random HISTORY-item history per user; returns build seconds."""
    dim = items.shape[1]
    start = time.perf_counter()
    store = RepresentationStore(dim, HISTORY, user_vectors=ShardedFaissVectors(dim, shards, "flat"),
                                item_vectors=ShardedFaissVectors(dim, shards, index_type))
    for table, vectors, prefix in ((store.items, items, "i"), (store.users, users, "u")):
        slots = table.slots(np.asarray([f"{prefix}{n}" for n in range(len(vectors))], dtype=object))
        for lo in range(0, len(slots), 100_000):
            table.vectors.put(torch.from_numpy(slots[lo:lo + 100_000]), torch.from_numpy(vectors[lo:lo + 100_000]))
    history = store.users.history
    n_users = len(users)
    history.rows[:n_users] = rng.integers(0, len(items), (n_users, HISTORY))
    history.lengths[:n_users] = HISTORY
    history.counts[:n_users] = HISTORY
    return store, time.perf_counter() - start


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50={np.percentile(ms, 50):.2f}ms p99={np.percentile(ms, 99):.2f}ms mean={ms.mean():.2f}ms"


def time_engine(engine: QueryEngine, user_ids: list[str]) -> tuple[list[float], list[list[str]]]:
    times, answers = [], []
    for user in user_ids:
        start = time.perf_counter()
        answer = engine.top_k_items(user, 10, exclude_recent=True)
        times.append(time.perf_counter() - start)
        answers.append([r.id for r in answer])
    return times, answers


def time_http(engine: QueryEngine, user_ids: list[str]) -> list[float]:
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    times = []
    try:
        with FelrecClient(handle.url) as client:
            client.recommendations(user_ids[0], 10)  # warm the connection
            for user in user_ids:
                start = time.perf_counter()
                client.recommendations(user, 10, exclude_recent=True)
                times.append(time.perf_counter() - start)
    finally:
        handle.stop()
    return times


def recall_at_10(exact: list[list[str]], ann: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / max(len(e), 1) for e, a in zip(exact, ann)]))


def freshness(engine: QueryEngine, dim: int, batches: int, batch_size: int, n_users: int,
              rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """(apply seconds per batch, arrival -> queryable seconds per batch) for batches of new items."""
    torch.manual_seed(0)
    model = FELRec(EncoderConfig(d_model=dim, n_heads=4, d_ff=2 * dim, dropout=0.0), ModelConfig(queue_size=64)).eval()
    applies, fresh = [], []
    for b in range(batches):
        users = np.asarray([f"u{u}" for u in rng.integers(0, n_users, batch_size)], dtype=object)
        items = np.asarray([f"new-{b}-{n % (batch_size // 4)}" for n in range(batch_size)], dtype=object)
        batch = EventBatch(users, items, np.full(batch_size, 2_000_000_000 + b, np.int64),
                           np.arange(b * batch_size, (b + 1) * batch_size, dtype=np.int64))
        arrived = time.time()
        start = time.perf_counter()
        with engine.lock:
            infer_batch(model, engine.store, batch)
        applies.append(time.perf_counter() - start)
        engine.note_batch_applied(np.full(batch_size, arrived))
        answer = engine.similar_items(items[-1], 10)
        assert answer, "a just-applied item must be queryable"
        fresh.append(time.time() - arrived)
    return applies, fresh


def bench_size(n: int, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    items, users = mixture(n, args.dim, rng, centres), mixture(args.users, args.dim, rng, centres)
    query_users = [f"u{u}" for u in rng.choice(args.users, args.queries, replace=False)]
    exact_answers: list[list[str]] | None = None
    for index_type in args.index_types.split(","):
        store, build_s = build_store(items, users, index_type, args.shards, np.random.default_rng(1))
        engine = QueryEngine(store)
        print(f"N={n:,} index={index_type} shards={args.shards} dim={args.dim}: build {build_s:.1f}s", flush=True)
        in_process, answers = time_engine(engine, query_users)
        print(f"  in-process top_k_items k=10 exclude_recent: {percentiles(in_process)}", flush=True)
        print(f"  HTTP GET /v1/users/{{id}}/recommendations k=10: {percentiles(time_http(engine, query_users))}",
              flush=True)
        if index_type == "flat":
            exact_answers = answers
        elif exact_answers is not None:
            print(f"  recall@10 vs exact: {recall_at_10(exact_answers, answers):.3f}", flush=True)
        applies, fresh = freshness(engine, args.dim, args.freshness_batches, args.batch_size, args.users, rng)
        print(f"  freshness (batch {args.batch_size} new-item events, apply under lock -> answered): "
              f"{percentiles(fresh)}; apply alone {percentiles(applies)}", flush=True)
        del store, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--index-types", default="flat,hnsw")
    parser.add_argument("--freshness-batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, omp threads {faiss.omp_get_max_threads()}, "
          f"cpus {os.cpu_count()}, python threads {threading.active_count()}", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        bench_size(n, args)


if __name__ == "__main__":
    main()
