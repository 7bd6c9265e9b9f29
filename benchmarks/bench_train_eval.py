"""Training and online-evaluation throughput of FELRec at the paper's size, with its memory and levers.

Run: OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/bench_train_eval.py --threads 1 \
       --dataset ml-100k --path ../shared/data/ml-100k --first 30000 [levers]

Configuration: exactly the preset `--preset` names, by default `paper` (d=128, 3 layers, 4 heads,
d_ff 256, dropout 0.1, FELRec-Q, queue 8192, training batch 1024, evaluation batch 1024, history
64, SGD). Data: the earliest `--first` events of a dataset (the issue's comparison: the 30,000
earliest ML-100K events) or of the synthetic generator. Prints one line per figure, next to its target:

- training interactions/s over `--train-batches` steps after the first `--warm-events` training
  events filled the cache (so the timed batches see real history lengths), and the process's peak
  RSS; the padding the encoder computes on, with and without length buckets;
- online evaluation interactions/s (serve protocol, full-catalog rank + HR@10) on the validation
  split after replaying the training split; with `--catalog N`, 1,000 events against N items;
- for the timed training steps and the evaluation: the encoder's FLOPs actually computed (every
  length bucket recorded, forward + backward in training: `felrec_stream/model/flops.py`), the
  share of encoded positions that are padding, and the achieved GFLOP/s per CPU-second and per
  wall-second next to the peak of this machine measured in the same run with the same threads
  (`flop_rate.py`: fp32 matmul, measured before and after, the higher kept; bf16 where the CPU has
  AVX512-BF16 or AMX). The last line: `share of measured fp32 peak: train <p>%, eval <q>%` per
  CPU-second (per wall-second on CUDA, where the GPU's time is not CPU time).

Levers (each run in its own process: peak RSS is per process): `--no-buckets` (one padded pass per
kind and batch), `--max-activation-mb N` (0 = keep every activation), `--torch-dropout` (torch's
dropout kernels instead of the PCG64 masks), `--allocator` (fixed glibc malloc thresholds),
`--eval-no-grad` (evaluation under no_grad instead of inference_mode), `--precision bf16` (issue
21: the same steps and evaluation timed again under `training.precision=bf16`, after the fp32 ones,
with the speed-up per CPU-second and the share of the measured bf16 peak; the product evaluates in
fp32, so the bf16 evaluation here wraps the encoder in bf16 autocast: what a bf16 evaluation would
give, a measurement only). Targets (issue 11): training
>= 3x the reference trainer (114-119 interactions/s with 2 threads on the same events: >= 350/s),
peak RSS <= 1 GB; evaluation >= 1,200 interactions/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from connectors.datasets import load_dataset  # noqa: E402
from flop_rate import EncoderFlops, Peak, best, fp32, measure_peak, rate_line  # noqa: E402
from felrec_stream.config import PRESETS, Configs, preset_sections  # noqa: E402
from felrec_stream.data import synthetic  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.device import autocast, check_precision, resolve_device  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402
from felrec_stream.model import felrec  # noqa: E402
from felrec_stream.state import engine  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import iter_batches, make_events  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.felrec_online import FELRecOnline  # noqa: E402
from training.train import train_step  # noqa: E402

TRAIN_TARGET = 350.0  # interactions/s: 3x the reference trainer's 114-119 (issue 11)
RSS_TARGET_MB = 1024.0
EVAL_TARGET = 1200.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def tune_allocator() -> bool:
    """Lever `--allocator`: fixed glibc thresholds (heap up to 32 MiB requests, keep 1 GiB of free
    memory) instead of the adaptive ones. Measured: no gain once the encoder runs in length buckets
    (its temporaries stay below glibc's adaptive 32 MiB mmap threshold), so the package does not set it."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_, M_TRIM_THRESHOLD


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def padding_share(store: RepresentationStore, batches: list, device: torch.device, overhead: int) -> float:
    """Share of the encoder's positions that are padding over `batches` (without moving the cache on:
    zero vectors are committed to a copy)."""
    store = _copy(store)
    computed = valid = 0
    for batch in batches:
        inputs = engine.prepare_batch(store, batch, device)
        for seqs in (inputs.users_before, inputs.items_before):
            lengths = seqs.mask.sum(dim=1)
            buckets = felrec.length_buckets(lengths, overhead=overhead)
            computed += sum(b.length * (len(lengths) if b.rows is None else len(b.rows)) for b in buckets)
            valid += int(lengths.sum())
        zeros = torch.zeros(len(batch), store.dim, device=device)
        engine.commit_batch(store, inputs, zeros, zeros)
    return 1 - valid / computed


def _copy(store: RepresentationStore) -> RepresentationStore:
    copy = RepresentationStore(store.dim, store.history_len, device=store.device)
    copy.load_state_dict(store.state_dict())
    return copy


def cpu_share(flops: EncoderFlops, cpu_s: float, wall_s: float, peak: Peak) -> float:
    """Achieved share of the fp32 peak: per CPU-second (per wall-second where the peak has no CPU rate)."""
    if peak.per_cpu is None:
        return flops.flops / wall_s / 1e9 / peak.per_wall
    return flops.flops / cpu_s / 1e9 / peak.per_cpu


def bench_training(configs: Configs, train_events, args: argparse.Namespace, device: torch.device,
                   precision: str = "fp32") -> tuple[felrec.FELRec, tuple[EncoderFlops, float, float] | None]:
    torch.manual_seed(0)
    model = felrec.FELRec(configs.encoder, configs.model).to(device)
    if args.no_buckets:
        model.encoder.bucket_overhead = 10**9
    if args.bucket_tokens is not None:
        model.encoder.bucket_tokens = args.bucket_tokens
    store = RepresentationStore.for_cache(configs.encoder.d_model, configs.cache, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=configs.training.lr, momentum=configs.training.momentum)
    batches = list(iter_batches(train_events, configs.training.batch_size))
    n_warm = args.warm_events // configs.training.batch_size
    warm, timed = batches[:n_warm], batches[n_warm:n_warm + args.train_batches]
    with torch.no_grad():  # fill the cache so that the timed batches have real histories
        for batch in warm:
            engine.infer_batch(model.eval(), store, batch, configs.cache)
    shares = [padding_share(store, timed, device, o) for o in (10**9, felrec.BUCKET_OVERHEAD)]
    tag = "" if precision == "fp32" else f"[{precision}]"
    if not tag:
        print(f"train: padding share of encoded positions: one pass per kind {shares[0]:.0%}, "
              f"length buckets {shares[1]:.0%}")
    timer: dict[str, float] = {}
    if not timed:
        return model, None
    model.train()
    started, cpu = time.perf_counter(), time.process_time()
    with EncoderFlops(configs.encoder) as flops:
        for batch in timed:
            train_step(model, store, optimizer, batch, configs.cache, timer, max_activation_mb=args.max_activation_mb,
                       precision=precision)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    n = sum(len(b) for b in timed)
    split = " ".join(f"{k}={1e3 * v / len(timed):.0f}ms" for k, v in timer.items())
    print(f"train{tag}: {n / seconds:,.1f} interactions/s (target >= {TRAIN_TARGET:.0f}; {len(timed)} batches of "
          f"{configs.training.batch_size} after {len(warm) * configs.training.batch_size} events; "
          f"{cpu / len(timed):.1f} CPU-s per step, {n / cpu:,.1f} interactions per CPU-s; per step: {split})")
    print(f"train{tag}: peak RSS {peak_rss_mb():,.0f} MB (target <= {RSS_TARGET_MB:.0f}; now {rss_mb():,.0f} MB)")
    print(f"train{tag}: encoded {flops.computed:,} positions in {len(flops.buckets)} buckets, padding "
          f"{flops.padding:.1%} of them (the timed steps, as computed)")
    return model, (flops, seconds, cpu)


def bench_eval(configs: Configs, model: felrec.FELRec, split, args: argparse.Namespace, device: torch.device,
               precision: str = "fp32") -> tuple[EncoderFlops, float, float]:
    tag = "" if precision == "fp32" else f"[{precision}]"
    if precision != "fp32":  # a measurement only: the product's evaluation encodes in fp32
        encode_kind = model.encode_kind

        def encode_in_precision(*args_: object, **kwargs: object) -> torch.Tensor:
            with autocast(precision, device):
                return encode_kind(*args_, **kwargs).float()  # type: ignore[arg-type]
        model.encode_kind = encode_in_precision  # type: ignore[method-assign]
    store = RepresentationStore.for_cache(configs.encoder.d_model, configs.cache, device)
    online = FELRecOnline(model.eval(), store, configs.cache, protocol="serve", scoring=configs.scoring)
    for batch in iter_batches(split.train, configs.eval.batch_size):
        online.observe(batch)
    print(f"eval{tag}: RSS after replaying the training split {rss_mb():,.0f} MB (peak {peak_rss_mb():,.0f} MB)")
    mode = torch.no_grad() if args.eval_no_grad else torch.inference_mode()
    cpu = time.process_time()
    with mode, EncoderFlops(configs.encoder) as flops:
        result = evaluate(online, split.val, split.train, configs.eval)
    cpu = time.process_time() - cpu
    total = result.summary()["total"]
    print(f"eval{tag}: {len(split.val) / result.seconds:,.1f} interactions/s (target >= {EVAL_TARGET:,.0f}; serve "
          f"protocol, full-catalog rank {total['rank']:.4f}, HR@10 {total['hit_rate']:.4f}, {len(split.val)} events, "
          f"{'no_grad' if args.eval_no_grad else 'inference_mode'}; {len(split.val) / cpu:,.1f} per CPU-s)")
    print(f"eval{tag}: encoded {flops.computed:,} positions in {len(flops.buckets)} buckets, "
          f"padding {flops.padding:.1%}")
    return flops, result.seconds, cpu


def bench_large_catalog(configs: Configs, model: felrec.FELRec, n_items: int, device: torch.device) -> None:
    """1,000 events scored against n_items catalog items (FELRec scoring + rank + HR@10)."""
    D = configs.encoder.d_model
    store = RepresentationStore.for_cache(D, configs.cache, device)
    ids = np.asarray([f"i{k}" for k in range(n_items)], dtype=object)
    slots = store.items.slots(ids)
    store.items.vectors.put(torch.from_numpy(slots), torch.randn(n_items, D))
    train = make_events([f"w{k}" for k in range(n_items)], ids.tolist(), np.zeros(n_items, dtype=np.int64))
    rng = np.random.default_rng(0)
    events = make_events([f"u{k}" for k in rng.integers(0, 300, 1000)], ids[rng.integers(0, n_items, 1000)].tolist(),
                         np.arange(1, 1001), np.arange(n_items, n_items + 1000))
    with torch.inference_mode():
        result = evaluate(FELRecOnline(model.eval(), store, configs.cache), events, train, configs.eval)
    print(f"eval[{n_items:,} items]: 1,000 events in {result.seconds:.2f} s")


def torch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic", help="a connectors.datasets name, e.g. ml-100k or ml-1m")
    parser.add_argument("--path", default=None, help="the dataset's file or folder")
    parser.add_argument("--first", type=int, default=30_000, help="use the earliest N events (0 = all)")
    parser.add_argument("--warm-events", type=int, default=12_288, help="training events replayed before timing")
    parser.add_argument("--train-batches", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-buckets", action="store_true")
    parser.add_argument("--max-activation-mb", type=int, default=None, help="default: the paper preset's")
    parser.add_argument("--bucket-tokens", type=int, default=None, help="positions per bucket at most")
    parser.add_argument("--torch-dropout", action="store_true")
    parser.add_argument("--allocator", action="store_true")
    parser.add_argument("--eval-no-grad", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--catalog", type=int, default=0, help="also score 1,000 events against N catalog items")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="the configuration measured")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: after the fp32 figures, the same steps and evaluation in bf16 "
                             "(training.precision), the speed-up per CPU-second and the share of the bf16 peak")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator:
        print(f"allocator tuned: {tune_allocator()}")
    if args.torch_dropout:
        felrec.dropout = torch_dropout
    configs = Configs.load(preset_sections(args.preset), {}, environ={})  # exactly the preset
    if args.max_activation_mb is None:
        args.max_activation_mb = configs.training.max_activation_mb
    device = resolve_device(args.device)
    events = load_dataset(args.dataset, args.path) if args.dataset != "synthetic" else synthetic.generate(
        synthetic.SyntheticConfig(n_users=1000, n_items=600, n_events=args.first or 30_000, n_clusters=16)).events
    events = events.slice(0, args.first) if args.first else events
    split = chronological_split(events, configs.training.val_fraction, configs.training.test_fraction)
    print(f"device={device} threads={torch.get_num_threads()} data={args.dataset} {args.path or ''} "
          f"({len(split.train)} training events) preset {args.preset}: d={configs.encoder.d_model} "
          f"layers={configs.encoder.n_layers} heads={configs.encoder.n_heads} batch={configs.training.batch_size} "
          f"queue={configs.model.queue_size} variant={configs.model.variant} "
          f"buckets={not args.no_buckets} bucket_tokens={args.bucket_tokens or felrec.BUCKET_TOKENS} "
          f"max_activation_mb={args.max_activation_mb} "
          f"dropout={'torch' if args.torch_dropout else 'pcg64'} allocator={'tuned' if args.allocator else 'default'}")
    precisions = ["fp32"] if args.precision == "fp32" else ["fp32", args.precision]
    check_precision(args.precision, device)
    before = measure_peak(torch.get_num_threads(), device)
    measured: dict[str, dict[str, tuple[EncoderFlops, float, float] | None]] = {}
    for precision in precisions:
        model, trained = bench_training(configs, split.train, args, device, precision)
        evaluated = None if args.skip_eval else bench_eval(configs, model, split, args, device, precision)
        measured[precision] = {"train": trained, "eval": evaluated}
    if args.catalog:
        bench_large_catalog(configs, model, args.catalog, device)
    print(f"peak RSS {peak_rss_mb():,.0f} MB")
    peaks = best(before, measure_peak(torch.get_num_threads(), device))  # before and after: the higher
    for peak in peaks:
        print(peak.describe())
    report_rates(measured, peaks, device)


def report_rates(measured: dict[str, dict[str, tuple[EncoderFlops, float, float] | None]], peaks: list[Peak],
                 device: torch.device) -> None:
    """Per precision and stage the encoder's FLOP rate against the peak of its dtype (and fp32's),
    the closing share line(s), and bf16's speed-up per CPU-second over fp32 (the same steps/events)."""
    cpu_only = device.type == "cpu"
    by_dtype = {p.dtype: p for p in peaks}
    for precision, stages in measured.items():
        tag = "" if precision == "fp32" else f"[{precision}]"
        shares: dict[str, str] = {}
        for name, stage in stages.items():
            if stage is None:
                continue
            flops, seconds, cpu = stage
            print(rate_line(f"{name}{tag} rate", flops.flops, seconds, cpu if cpu_only else None, fp32(peaks)))
            own = by_dtype.get(precision, fp32(peaks))
            if own is not fp32(peaks):
                print(rate_line(f"{name}{tag} rate", flops.flops, seconds, cpu if cpu_only else None, own))
            shares[name] = f"{100 * cpu_share(flops, cpu, seconds, own):.1f}%"
        run = f" ({precision} run)" if tag else ""
        print(f"share of measured {by_dtype.get(precision, fp32(peaks)).dtype} peak{run}: "
              f"train {shares.get('train', 'n/a')}, eval {shares.get('eval', 'n/a')}")
    if len(measured) > 1:
        base, other = measured["fp32"], measured[list(measured)[-1]]
        ratios = []
        for name in ("train", "eval"):
            a, b = base.get(name), other.get(name)
            if a is not None and b is not None:  # the same steps/events: the ratio of CPU-seconds (wall on a GPU)
                ratios.append(f"{name} {(a[2] / b[2] if cpu_only else a[1] / b[1]):.2f}x "
                              f"(wall {a[1] / b[1]:.2f}x)")
        per = "CPU" if cpu_only else "wall"
        print(f"{list(measured)[-1]} speed-up over fp32 per {per}-second: {', '.join(ratios)}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
