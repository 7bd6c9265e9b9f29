"""Throughput of data-parallel FELRec: 1 rank x T threads against N ranks x 1 thread (torchrun, gloo).

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py [--sizes small paper] [--batch-size 256]

For each model size and each layout (1 rank x 1 thread, 1 rank x 2 threads, 2 ranks x 1 thread;
on a GPU machine also the GPUs, NCCL) it launches `torchrun --standalone` and prints interactions/s of
- train: training steps (prepare, encode, FELRec-Q loss, SGD, commit) on batches whose histories
  are full (after a warm-up replay that fills the cache), the serve recipe (per-kind BatchNorm,
  post-event cache, so every BatchNorm and gather is synced);
- eval: the online evaluator (FELRecOnline under the serve protocol + metrics);
- apply: the streaming worker's step (engine.infer_batch, eval mode) on a tensor store.
Each rank holds a whole replica and encodes 1/N of every batch; preparing histories, scoring and
committing are replicated, so the speed-up is at most the encoder's share of a step.

Below each row: the encoder's FLOPs actually computed (every length bucket recorded, forward +
backward in training; summed over the ranks: `flop_rate.EncoderFlops`) as GFLOP/s per CPU-second
(all ranks' process CPU time) and per wall-second (the slowest rank), and their share of the fp32
matmul peak measured by this script before the runs with the layout's total thread count
(`flop_rate.py`, printed; bf16 too where the CPU has AVX512-BF16 or AMX). GPU rows: per
wall-second against the GPU's measured peak times the number of GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from flop_rate import EncoderFlops, Peak, fp32, measure_peak  # noqa: E402

from felrec_stream import parallel  # noqa: E402
from felrec_stream.config import CacheConfig, EncoderConfig, EvalConfig, ModelConfig  # noqa: E402
from felrec_stream.data import synthetic  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.parallel import Ranks, sync_batch_norms  # noqa: E402
from felrec_stream.state.engine import infer_batch  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import iter_batches  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.felrec_online import FELRecOnline  # noqa: E402
from training.train import train_step  # noqa: E402

SIZES = {
    "small": (EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, output_norm="batch"), 16),
    "paper": (EncoderConfig(d_model=128, n_layers=3, n_heads=4, d_ff=256, dropout=0.0, output_norm="batch"), 4),
}  # size -> (encoder, timed training batches)
MODEL = ModelConfig(use_mlp=False, temperature=0.5, queue_size=256, cache_update="post_event")
CACHE = CacheConfig()
WARM_BATCHES, EVAL_BATCHES, APPLY_BATCHES = 24, 8, 8


def _events(batch_size: int, timed: int):
    n = batch_size * (WARM_BATCHES + timed + EVAL_BATCHES + APPLY_BATCHES)
    config = synthetic.SyntheticConfig(n_users=3000, n_items=1500, n_events=n, n_clusters=16, seed=0)
    return synthetic.generate(config).events


def measure(size: str, batch_size: int, ranks: Ranks | None, device: torch.device) -> dict[str, Any]:
    """interactions/s of training, evaluation and the worker's apply step on this layout, and per
    stage in "flops" [encoder FLOPs (all ranks), wall seconds (slowest rank), CPU-s (all ranks)]."""
    encoder, timed = SIZES[size]
    events = _events(batch_size, timed)
    torch.manual_seed(0)
    model = FELRec(encoder, MODEL).to(device)
    if ranks is not None:
        sync_batch_norms(model, ranks)
    store = RepresentationStore.for_cache(encoder.d_model, CACHE, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = list(iter_batches(events, batch_size))
    warm = batches[:WARM_BATCHES]
    train = batches[WARM_BATCHES: WARM_BATCHES + timed]
    scored = batches[WARM_BATCHES + timed: WARM_BATCHES + timed + EVAL_BATCHES]
    applied = batches[-APPLY_BATCHES:]
    with torch.no_grad():  # fill the cache (same on every rank: no ranks needed)
        for batch in warm:
            infer_batch(model.eval(), store, batch, CACHE)
    model.train()
    out: dict[str, Any] = {"flops": {}}
    out["train"], out["flops"]["train"] = _timed(
        lambda: [train_step(model, store, optimizer, b, CACHE, ranks=ranks) for b in train], train, ranks, encoder)
    online = FELRecOnline(model, store, CACHE, ranks=ranks)
    seen = events.slice(0, batch_size * (WARM_BATCHES + timed))
    scored_table = events.slice(batch_size * (WARM_BATCHES + timed), batch_size * EVAL_BATCHES)
    out["eval"], out["flops"]["eval"] = _timed(
        lambda: evaluate(online, scored_table, seen, EvalConfig(batch_size=batch_size)), scored, ranks, encoder)
    model.eval()
    out["apply"], out["flops"]["apply"] = _timed(
        lambda: [infer_batch(model, store, b, CACHE, ranks) for b in applied], applied, ranks, encoder)
    return out


def _timed(run, batches: list, ranks: Ranks | None, encoder: EncoderConfig) -> tuple[float, list[float]]:
    """(interactions/s, [encoder FLOPs of all ranks, wall seconds of the slowest, CPU-s of all ranks])."""
    if ranks is not None:
        ranks.exchange(None)  # start together
    started, cpu = time.perf_counter(), time.process_time()
    with EncoderFlops(encoder) as flops:
        run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    counted = float(flops.flops)
    if ranks is not None:
        everyone = ranks.exchange((seconds, cpu, counted))
        seconds = max(e[0] for e in everyone)  # the slowest rank sets the pace
        cpu, counted = sum(e[1] for e in everyone), sum(e[2] for e in everyone)
    return sum(len(b) for b in batches) / seconds, [counted, seconds, cpu]


def child(args: argparse.Namespace) -> None:
    """One rank (under torchrun): measure, rank 0 prints one JSON line per size."""
    ranks = parallel.init()
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda")
    if ranks is not None:
        device = ranks.place(device)
    for size in args.sizes:
        figures = measure(size, args.batch_size, ranks, device)
        if ranks is None or ranks.leader:
            print(json.dumps({"size": size, **figures}), flush=True)


def launch(nproc: int, threads: int, args: argparse.Namespace, device: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve()), "--child", "--device", device, "--batch-size", str(args.batch_size),
               "--sizes", *args.sizes]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FELREC_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _rate(stage: str, flops: float, wall_s: float, cpu_s: float, peak: Peak, devices: int) -> str:
    """'train 12.3/CPU-s 8.1/wall-s (9.0%)': the share is per CPU-second on the CPU, per wall-second
    of `devices` GPUs otherwise."""
    wall = flops / wall_s / 1e9
    if peak.per_cpu is None:
        return f"{stage} {wall:,.1f}/wall-s ({wall / (devices * peak.per_wall):.1%} of {devices} x peak)"
    cpu = flops / cpu_s / 1e9
    return f"{stage} {cpu:,.1f}/CPU-s {wall:,.1f}/wall-s ({cpu / peak.per_cpu:.1%} of peak per CPU-s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "paper"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    layouts = [(1, 1, "cpu"), (1, 2, "cpu"), (2, 1, "cpu")]
    gpus = torch.cuda.device_count()
    if gpus:
        layouts += [(1, 1, "cuda")] + ([(gpus, 1, "cuda")] if gpus > 1 else [])
    print(f"cores: {os.cpu_count()}, batch {args.batch_size}, load average {os.getloadavg()[0]:.1f}; interactions/s")
    peaks = {(threads, "cpu"): measure_peak(threads, "cpu") for threads in sorted({n * t for n, t, d in layouts
                                                                                   if d == "cpu"})}
    if gpus:
        peaks[(1, "cuda")] = measure_peak(1, "cuda")
    for run in peaks.values():
        for peak in run:
            print(peak.describe())
    for nproc, threads, device in layouts:
        peak = fp32(peaks[(nproc * threads, "cpu")] if device == "cpu" else peaks[(1, "cuda")])
        for row in launch(nproc, threads, args, device):
            where = f"{nproc} GPU(s), NCCL" if device == "cuda" else f"{nproc} rank(s) x {threads} thread(s)"
            print(f"{row['size']:>5} | {where:<24} | train {row['train']:8,.0f} | eval {row['eval']:8,.0f} | "
                  f"apply {row['apply']:8,.0f}", flush=True)
            print(f"{'':>5} | {'  encoder GFLOP/s, share':<24} | " + " | ".join(
                _rate(stage, *row["flops"][stage], peak, nproc if device == "cuda" else 1)
                for stage in ("train", "eval", "apply")), flush=True)
    if not gpus:
        print("GPU: torch sees no CUDA device on this machine, so no GPU/NCCL row (run this script on one).")


if __name__ == "__main__":
    main()
