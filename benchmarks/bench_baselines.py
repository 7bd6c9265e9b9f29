"""Training and online-evaluation throughput of every baseline (small configs), one line per model.

Run: OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python benchmarks/bench_baselines.py
(--size small|tiny|paper --events 20000 --epochs 1 [--ml100k ../shared/data/ml-100k]).

- training interactions/s: training events / seconds of `train_epoch` (the mean over --epochs);
- evaluation interactions/s: (validation warm-up + test) events / seconds of the shared evaluator
  (`training.evaluate.evaluate`, metrics included), which is what the experiment harness replays.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from felrec_stream.config import EvalConfig  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.data.synthetic import SyntheticConfig, generate  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402
from training.baselines import BASELINES, build_baseline, make_config  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.felrec_online import PopularityOnline  # noqa: E402


def load_events(args: argparse.Namespace) -> tuple[str, pa.Table]:
    if args.ml100k:
        from connectors.datasets import load_dataset

        return "ml-100k", load_dataset("ml-100k", args.ml100k)
    cfg = SyntheticConfig(n_users=max(args.events // 60, 50), n_items=max(args.events // 100, 40),
                          n_events=args.events, n_clusters=8, seed=0)
    return f"synthetic {args.events}", generate(cfg).events


def bench(name: str, split, args: argparse.Namespace, eval_cfg: EvalConfig) -> str:
    if name == "popularity":
        model, params, train_rate = PopularityOnline([split.train]), 0, None
    else:
        model = build_baseline(name, make_config(name, args.size, epochs=args.epochs), split.train)
        params = model.num_parameters
        started = time.perf_counter()
        for _ in range(args.epochs):
            model.train_epoch(split.train)
        train_rate = args.epochs * len(split.train) / (time.perf_counter() - started)
    started = time.perf_counter()
    result = evaluate(model, split.test, split.train, eval_cfg, warmup=split.val)
    eval_rate = (len(split.val) + len(split.test)) / (time.perf_counter() - started)
    rank = result.summary()["total"]["rank"]
    train_text = "(counts only)" if train_rate is None else f"{train_rate:,.0f}"
    return (f"{name:<13} train {train_text:>13} interactions/s   eval {eval_rate:>9,.0f} interactions/s   "
            f"params {params:>9,}   test rank {rank:.3f} (served partitions, {args.epochs} epoch(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--events", type=int, default=20_000, help="synthetic events (ignored with --ml100k)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ml100k", default=None, help="folder of MovieLens 100K instead of synthetic data")
    parser.add_argument("--models", default=",".join(BASELINES + ("popularity",)))
    args = parser.parse_args()
    configure_logging(level="WARNING")
    torch.manual_seed(0)
    label, events = load_events(args)
    split = chronological_split(events)
    print(f"# {label}: train {len(split.train)}, val+test {len(split.val) + len(split.test)} events; "
          f"size={args.size}, device=cpu threads={torch.get_num_threads()}")
    for name in args.models.split(","):
        print(bench(name.strip(), split, args, EvalConfig()), flush=True)


if __name__ == "__main__":
    main()
