"""Training and online-evaluation throughput of FELRec, with the cost split of a training step.

Run: OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python benchmarks/bench_train_eval.py
(--train-batches 12 --batch-size 256 --catalog 100000 --device auto). Prints one line per figure:

- training interactions/s at the paper's size (d=128, 3 layers) and at the small test config,
  measured on batches whose histories are full (after a warm-up replay that fills the cache);
- the split of a training step: data prep (histories + cache gather) / encoder fwd+bwd+SGD /
  cache write, and the evaluation metrics per event;
- the mean padded sequence length the encoder saw vs history_len (padding is trimmed per batch);
- evaluation interactions/s (FELRecOnline + metrics) and 1,000 events against a 100k-item catalog.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from felrec_stream.config import CacheConfig, EncoderConfig, EvalConfig, ModelConfig  # noqa: E402
from felrec_stream.data import synthetic  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.device import resolve_device  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.model.ranking import normalized_rank, sampled_hit_rate  # noqa: E402
from felrec_stream.state import engine  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import iter_batches, make_events  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.felrec_online import FELRecOnline  # noqa: E402
from training.train import train_step  # noqa: E402

SIZES = {
    "paper": EncoderConfig(d_model=128, n_layers=3, n_heads=4, d_ff=256),
    "small": EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64),
}


def padded_lengths(store: RepresentationStore, batches: list, device: torch.device) -> list[int]:
    """Sequence length the encoder sees per batch (max of the trimmed user/item histories)."""
    lengths = []
    for batch in batches:
        inputs = engine.prepare_batch(store, batch, device)
        lengths.append(max(inputs.item_seq.shape[1], inputs.user_seq.shape[1]))
        engine.commit_batch(store, inputs, torch.zeros(len(batch), store.dim, device=device),
                            torch.zeros(len(batch), store.dim, device=device))
    return lengths


def bench_training(name: str, enc: EncoderConfig, train_events: pa.Table, args: argparse.Namespace,
                   device: torch.device) -> FELRec:
    torch.manual_seed(0)
    model = FELRec(enc, ModelConfig(variant="q", queue_size=4096)).to(device)
    store = RepresentationStore(enc.d_model, 64, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = list(iter_batches(train_events, args.batch_size))
    warm, timed = batches[: -args.train_batches], batches[-args.train_batches:]
    with torch.no_grad():  # fill the cache so that the timed batches have full histories
        for batch in warm:
            engine.infer_batch(model, store, batch)
    lengths = padded_lengths(_copy(store), timed, device)
    timer: dict[str, float] = {}
    model.train()
    started = time.perf_counter()
    for batch in timed:
        train_step(model, store, optimizer, batch, timer=timer)
    seconds = time.perf_counter() - started
    n = sum(len(b) for b in timed)
    split = " ".join(f"{k}={1e3 * v / len(timed):.1f}ms" for k, v in timer.items())
    print(f"train[{name}] d={enc.d_model} layers={enc.n_layers} batch={args.batch_size}: "
          f"{n / seconds:,.0f} interactions/s ({len(timed)} batches, per step: {split})")
    first = padded_lengths(RepresentationStore(enc.d_model, 64), batches[:5], torch.device("cpu"))
    print(f"train[{name}] padded length: mean {np.mean(lengths):.1f} vs history_len 64 "
          f"(first batches of the replay: {first})")
    return model


def _copy(store: RepresentationStore) -> RepresentationStore:
    copy = RepresentationStore(store.dim, store.history_len, device=store.device)
    copy.load_state_dict(store.state_dict())
    return copy


def bench_eval(name: str, model: FELRec, split, device: torch.device) -> None:
    store = RepresentationStore(model.encoder_config.d_model, 64, device=device)
    with torch.no_grad():
        for batch in iter_batches(split.train, 1024):
            engine.infer_batch(model.eval(), store, batch)
    result = evaluate(FELRecOnline(model, store, CacheConfig()), split.val, split.train, EvalConfig())
    print(f"eval[{name}]: {len(split.val) / result.seconds:,.0f} interactions/s "
          f"({len(split.val)} events, catalog ~{len(set(split.train.column('item').to_pylist()))} items)")


def bench_large_catalog(model: FELRec, n_items: int, device: torch.device) -> None:
    """1,000 events scored against n_items catalog items (FELRec scoring + rank + HR@10)."""
    D = model.encoder_config.d_model
    store = RepresentationStore(D, 64, device=device)
    ids = np.asarray([f"i{k}" for k in range(n_items)], dtype=object)
    slots = store.items.slots(ids)
    store.items.vectors.put(torch.from_numpy(slots), torch.randn(n_items, D))
    train = make_events([f"w{k}" for k in range(n_items)], ids.tolist(), np.zeros(n_items, dtype=np.int64))
    rng = np.random.default_rng(0)
    events = make_events([f"u{k}" for k in rng.integers(0, 300, 1000)], ids[rng.integers(0, n_items, 1000)].tolist(),
                         np.arange(1, 1001), np.arange(n_items, n_items + 1000))
    result = evaluate(FELRecOnline(model, store, CacheConfig()), events, train, EvalConfig())
    scores = torch.randn(1000, n_items, device=device)
    target = torch.from_numpy(rng.integers(0, n_items, 1000)).to(device)
    started = time.perf_counter()
    normalized_rank(scores, target)
    sampled_hit_rate(scores, target, 100, 10, torch.Generator(device=device).manual_seed(0))
    metrics_s = time.perf_counter() - started
    print(f"eval[{n_items:,} items]: 1,000 events in {result.seconds:.2f} s "
          f"(rank + HR@10 alone: {metrics_s:.2f} s = {metrics_s:.3f} ms/event)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batches", type=int, default=8, help="timed training batches per size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--catalog", type=int, default=100_000, help="items in the large-catalog evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="small,paper")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    device = resolve_device(args.device)
    print(f"device={device} torch_threads={torch.get_num_threads()}")
    data = synthetic.generate(synthetic.SyntheticConfig(n_users=1000, n_items=600, n_events=60_000, n_clusters=16))
    split = chronological_split(data.events, 0.1, 0.1)
    for name in args.sizes.split(","):
        model = bench_training(name, SIZES[name], split.train, args, device)
        bench_eval(name, model, split, device)
    bench_large_catalog(model, args.catalog, device)


if __name__ == "__main__":
    main()
