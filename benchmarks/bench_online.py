"""Does online learning help? Arms replayed on the SAME events under the serve protocol (issue
"Online learning").

The stream: offline training (`train`, the preset's recipe) on the first part of the events; the
rest is the online stretch, scored event by event (serve protocol: scored with what was served just
before the event, then applied; the user's recent items left out, as every table). Arms:

- frozen: the offline weights, never updated (the cache still follows the stream).
- online-<N>: a `Learner` (training/learn.py) trains on the same events in the same process and
  publishes a version every N events; at every evaluator batch boundary the evaluator switches to
  the newest version whose `trained_through` it has already applied (pipelines/adoption.py's
  `VersionAdoption`, the worker's rule). The learner is fed up to the evaluator's position after
  each batch: the best case for latency (a learner as fast as the worker).
- retrain-<M> (optional, `--retrain-every`): every M events, train from scratch on everything seen
  so far (offline recipe), then continue with the new weights and cache (the events after its own
  training part are replayed unscored first).

Settings (learning rate, replay ratio, and which publish interval is best) are chosen on the
validation windows, the first part of the online stretch; the test windows after it are scored
once with the chosen settings (the validation windows are replayed again in that final run, so the
arms reach the test windows in the state the rule produced). Windowed normalized rank (0 best) and
HR@10 (vs 100 sampled negatives) over the online stretch, per partition on the test windows (the
partitions are relative to the offline events; an item's first interaction is reported apart and
left out of the totals, as `evaluate` does), a PNG of the windows, and forgetting: the pre-drift
validation events re-scored at the end by each arm's final weights, from an empty cache replayed
from the first event (mode "reset"); higher rank than frozen's = forgot the old world.

Run (2 CPU cores):
  OMP_WAIT_POLICY=PASSIVE nice -n 5 python benchmarks/bench_online.py --quick        # < 10 min
  python benchmarks/bench_online.py --data ml-100k --out /work/runs/bench-online/ml-100k
  python benchmarks/bench_online.py --data amazon-magazine --out /work/runs/bench-online/amazon
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from felrec_stream.config import Configs, LearnConfig, preset_sections  # noqa: E402
from felrec_stream.data import synthetic  # noqa: E402
from felrec_stream.log import configure_logging  # noqa: E402
from felrec_stream.model.metrics import hit_rate_against, normalized_rank, sample_negatives  # noqa: E402
from felrec_stream.state.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from felrec_stream.state.snapshot import SnapshotManager  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.state.versions import VersionStore, shape_digest  # noqa: E402
from felrec_stream.stream.events import iter_batches  # noqa: E402
from felrec_stream.stream.source import InMemorySource  # noqa: E402
from pipelines.adoption import VersionAdoption  # noqa: E402
from training.evaluate import RecentItems, catalog_sizes, event_partitions, exclude_items  # noqa: E402
from training.felrec_online import FELRecOnline, build_felrec  # noqa: E402
from training.learn import Learner  # noqa: E402
from training.protocol import ItemCatalog  # noqa: E402
from training.train import train  # noqa: E402

REFERENCE_EVENTS = 100_000  # the publish intervals below are for a 100k-event stream (ML-100K)
INTERVALS = (1_000, 10_000)  # events between two published versions, arms (b) and (c)
RETRAIN_EVERY = 25_000  # events between two full retrains, arm (d)
LR_FACTORS = (0.3, 1.0, 3.0)  # learning rates tried on validation, times the checkpoint's training.lr
REPLAY_RATIOS = (0.0, 0.5)  # reservoir events per live event tried on validation
N_WINDOWS = 20  # windows over the online stretch
RECOVERY = 0.10  # "recovered": the last windows' rank within 10% of the pre-drift windowed rank
LAST_WINDOWS = 3  # ... where "the last windows" are these many


# ---- the stream ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    name: str
    events: pa.Table
    offline_end: int  # events [0, offline_end) train the offline model
    val_end: int  # [offline_end, val_end): validation windows; [val_end, n): test windows
    drift: int | None  # first event at or after the drift (synthetic)
    scale: float  # len(events) / REFERENCE_EVENTS (intervals are scaled by it)


def load_stream(args: argparse.Namespace) -> Stream:
    if args.data.startswith("synthetic"):
        kind = args.data.split("-", 1)[1] if "-" in args.data else "abrupt"
        overrides = {"n_events": args.synthetic_events} if args.synthetic_events else {}
        cfg = synthetic.config_from_options(args.size, drift=kind, drift_at=args.drift_at, seed=args.seed, **overrides)
        data = synthetic.generate(cfg)
        events = data.events
        switch = int(data.user_switch.min())
        drift = int(np.searchsorted(events.column("timestamp").to_numpy(), switch))
        n = len(events)
        # offline on the first 60% of the pre-drift events, validation on the rest before the drift:
        # the settings never see the drift; the test windows start with it
        return Stream(f"synthetic {args.size} ({cfg.n_users} users, {cfg.n_items} items), drift {kind} at "
                      f"{args.drift_at:g} of the timeline (event {drift})", events,
                      int(0.6 * drift), drift, drift, n / REFERENCE_EVENTS)
    from connectors.datasets import load_dataset

    if args.data == "ml-100k":
        events = load_dataset("ml-100k", args.path or "../shared/data/ml-100k")
    elif args.data == "amazon-magazine":
        path = args.path or "../shared/data/amazon-magazine/Magazine_Subscriptions.csv"
        events = load_dataset("csv", path, header="false", user="1", item="0", timestamp="3")
    else:
        raise SystemExit(f"unknown --data {args.data}")
    n = len(events)
    return Stream(args.data, events, n // 2, int(0.625 * n), None, n / REFERENCE_EVENTS)


# ---- offline training ---------------------------------------------------------------------------

def offline_configs(preset: str, seed: int, epochs: int | None, exclude_recent: bool) -> Configs:
    sections = preset_sections(preset)
    sections["scoring"] = {**sections.get("scoring", {}), "exclude_recent": exclude_recent}
    training = {**sections.get("training", {}), "val_fraction": 0.1, "test_fraction": 0.001, "seed": seed,
                "device": "cpu"}
    if epochs:
        training["epochs"] = epochs
    sections["training"] = training
    return Configs.load(sections)  # FELREC_<SECTION>__<FIELD> variables apply, as for every command


def train_offline(events: pa.Table, configs: Configs, out: Path) -> Checkpoint:
    """The preset's recipe on `events` (its own train/validation split); the best epoch's checkpoint."""
    result = train(events, configs, out)
    return load_checkpoint(result.best_checkpoint or result.last_checkpoint)


def cached_events(ckpt: Checkpoint) -> int:
    """How many of the stream's first events the checkpoint's cache holds (its training part)."""
    store = RepresentationStore.for_cache(ckpt.configs.encoder.d_model, ckpt.configs.cache)
    store.load_state_dict(ckpt.store_state)
    return int(store.users.history.events)


# ---- one arm ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    name: str
    interval: int = 0  # online: events between published versions (0: no learner)
    lr: float = 0.0  # online: learning rate (0: the checkpoint's)
    replay_ratio: float = 0.0
    retrain_every: int = 0  # full retrain every M events (0: none)


@dataclass
class ArmRun:
    arm: Arm
    rank: np.ndarray  # (N,) per scored event
    hit: np.ndarray  # (N,) bool
    adoptions: list[tuple[int, str, int]] = field(default_factory=list)  # (applied, version, trained_through)
    refused: int = 0
    published: int = 0
    final_state: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0


class Replay:
    """Drives one arm over events [cached, until): warm-up without scores up to `offline_end`, then
    scores each batch (serve protocol) and applies it; adoption / retrain between batches."""

    def __init__(self, stream: Stream, ckpt: Checkpoint, configs: Configs, arm: Arm, work: Path,
                 learner_lead: int = 0) -> None:
        self.stream, self.ckpt, self.configs, self.arm, self.work = stream, ckpt, configs, arm, work
        self.learner_lead = learner_lead  # events the learner reads ahead of the evaluator (tests: adoption waits)
        self.cached = cached_events(ckpt)
        self.online: FELRecOnline = build_felrec(ckpt, "keep")
        self.eval_cfg = ckpt.configs.eval
        self.catalog = ItemCatalog()
        head = stream.events.slice(0, self.cached)
        self.catalog.add(np.asarray(pc.unique(head.column("item")).to_pylist(), dtype=object))
        self.recent = RecentItems(ckpt.configs.excluded_recent) if ckpt.configs.excluded_recent else None
        if self.recent is not None:
            for batch in iter_batches(head, self.eval_cfg.batch_size):
                self.recent.before(batch, self.catalog)
        self.applied = self.cached
        self.generator = torch.Generator().manual_seed(self.eval_cfg.seed)
        self.learner: Learner | None = None
        self.adoption: VersionAdoption | None = None
        self.versions: VersionStore | None = None
        self.last_retrain = stream.offline_end
        self.adoptions: list[tuple[int, str, int]] = []

    def run(self, until: int) -> ArmRun:
        started = time.perf_counter()
        if self.arm.interval:
            self._start_learner(until)
        ranks: list[np.ndarray] = []
        hits: list[np.ndarray] = []
        try:
            warm = self.stream.events.slice(self.cached, self.stream.offline_end - self.cached)
            scored = self.stream.events.slice(self.stream.offline_end, until - self.stream.offline_end)
            for batch in iter_batches(warm, self.eval_cfg.batch_size):
                self._between_batches()
                self.catalog.add(batch.item)
                if self.recent is not None:
                    self.recent.before(batch, self.catalog)
                self.online.observe(batch)
                self._applied(len(batch))
            for batch in iter_batches(scored, self.eval_cfg.batch_size):
                self._between_batches()
                rank, hit = self._score(batch)
                ranks.append(rank)
                hits.append(hit)
                self._applied(len(batch))
        finally:
            if self.learner is not None:
                self.learner.close()
        run = ArmRun(self.arm, np.concatenate(ranks), np.concatenate(hits), list(self.adoptions),
                     seconds=time.perf_counter() - started,
                     final_state={k: v.clone() for k, v in self.online.model.state_dict().items()})
        if self.learner is not None:
            run.refused, run.published = self.learner.progress.refused, self.learner.progress.seq
        return run

    def _score(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """As training/evaluate.py `_score_events` does for one batch."""
        sizes = torch.from_numpy(catalog_sizes(self.catalog, batch.item))
        seen = None if self.recent is None else torch.from_numpy(self.recent.before(batch, self.catalog))
        scores = self.online.score_batch(batch, self.catalog)
        target = torch.from_numpy(self.catalog.index(batch.item))
        negatives = sample_negatives(target, scores.shape[1], self.eval_cfg.num_negatives, self.generator, sizes, seen)
        scores = scores if seen is None else exclude_items(scores, seen)
        return (normalized_rank(scores, target, sizes).numpy().astype(np.float64),
                hit_rate_against(scores, target, negatives, self.eval_cfg.hr_k).numpy())

    def _applied(self, n: int) -> None:
        """After a batch: the learner catches up to the evaluator's position (it trains on what
        the evaluator has applied, never ahead of the stream's present)."""
        self.applied += n
        if self.learner is None:
            return
        target = self.applied + self.learner_lead
        while not self.learner.source.exhausted and self.learner.source.positions()[0] < target:
            batch = self.learner.source.poll_batch(0.0)
            if batch is not None:
                self.learner.feed(batch)

    def _between_batches(self) -> None:
        if self.adoption is not None:
            assert self.versions is not None
            due = self.adoption.due({InMemorySource.PARTITION: self.applied}, self.applied, lambda: False)
            if due is not None:
                # the worker's rule: every event the version was trained on is already applied
                assert due.trained_through.events <= self.applied, (due.name, self.applied)
                self.online.model.load_state_dict(self.versions.checkpoint(due.name).model_state)
                self.adoption.current_seq = due.seq
                self.adoptions.append((self.applied, due.name, due.trained_through.events))
        if self.arm.retrain_every and self.applied - self.last_retrain >= self.arm.retrain_every:
            self._retrain()

    def _start_learner(self, until: int) -> None:
        root = self.work / f"learn-{self.arm.name}"
        shutil.rmtree(root, ignore_errors=True)
        config = LearnConfig(start="checkpoint", publish_every=self.arm.interval, lr=self.arm.lr,
                             # no garbage collection: a learner ahead of the evaluator keeps what it will adopt
                             replay_ratio=self.arm.replay_ratio, until_end=True, keep_versions=10_000, seed=0)
        source = InMemorySource(self.stream.events.slice(0, until), self.ckpt.configs.training.batch_size)
        self.versions = VersionStore(root / "models")
        self.learner = Learner(self.ckpt, source, self.versions, SnapshotManager(root / "state", keep=1), config)
        self.learner.begin()
        self.adoption = VersionAdoption(self.versions, shape_digest(self.ckpt.configs), until_end=False)

    def _retrain(self) -> None:
        """Arm (d): train from scratch on everything applied so far, then replay (unscored) the events
        after the new checkpoint's cache up to now with the new weights."""
        seen = self.stream.events.slice(0, self.applied)
        out = self.work / f"retrain-{self.applied}"
        ckpt = train_offline(seen, self.configs, out)
        self.online = build_felrec(ckpt, "keep")
        for batch in iter_batches(seen.slice(cached_events(ckpt)), self.eval_cfg.batch_size):
            self.online.observe(batch)
        self.last_retrain = self.applied
        self.adoptions.append((self.applied, f"retrain@{self.applied}", self.applied))
        shutil.rmtree(out, ignore_errors=True)


def probe_rank(stream: Stream, ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Forgetting probe: the validation (pre-drift) events scored by the final weights `state` from an
    empty cache that replays every earlier event first (mode "reset"). (rank, HR@10)."""
    probe = Checkpoint(model_state=state, configs=ckpt.configs, epoch=ckpt.epoch)
    online = build_felrec(probe, "reset")
    cfg = ckpt.configs
    catalog = ItemCatalog()
    recent = RecentItems(cfg.excluded_recent) if cfg.excluded_recent else None
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    ranks, hits = [], []
    head = stream.events.slice(0, stream.offline_end)
    for batch in iter_batches(head, cfg.eval.batch_size):
        catalog.add(batch.item)
        if recent is not None:
            recent.before(batch, catalog)
        online.observe(batch)
    for batch in iter_batches(stream.events.slice(stream.offline_end, stream.val_end - stream.offline_end),
                              cfg.eval.batch_size):
        sizes = torch.from_numpy(catalog_sizes(catalog, batch.item))
        seen = None if recent is None else torch.from_numpy(recent.before(batch, catalog))
        scores = online.score_batch(batch, catalog)
        target = torch.from_numpy(catalog.index(batch.item))
        negatives = sample_negatives(target, scores.shape[1], cfg.eval.num_negatives, generator, sizes, seen)
        scores = scores if seen is None else exclude_items(scores, seen)
        ranks.append(normalized_rank(scores, target, sizes).numpy())
        hits.append(hit_rate_against(scores, target, negatives, cfg.eval.hr_k).numpy())
    partition = partitions(stream, stream.val_end)
    keep = partition != "first_item"
    return float(np.concatenate(ranks)[keep].mean()), float(np.concatenate(hits)[keep].mean())


# ---- figures ------------------------------------------------------------------------------------

def partitions(stream: Stream, until: int) -> np.ndarray:
    """Partition of every scored event [offline_end, until), relative to the offline events."""
    offline = stream.events.slice(0, stream.offline_end)
    scored = stream.events.slice(stream.offline_end, until - stream.offline_end)
    return event_partitions(offline, scored, [offline])


def windows(stream: Stream) -> list[tuple[int, int]]:
    n = len(stream.events) - stream.offline_end
    edges = np.linspace(0, n, N_WINDOWS + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def mean_over(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else float("nan")


def windowed(run: ArmRun, stream: Stream, part: np.ndarray) -> tuple[list[float], list[float]]:
    served = part != "first_item"
    index = np.arange(len(run.rank))
    out_rank, out_hit = [], []
    for a, b in windows(stream):
        mask = served & (index >= a) & (index < b)
        out_rank.append(mean_over(run.rank, mask))
        out_hit.append(mean_over(run.hit.astype(np.float64), mask))
    return out_rank, out_hit


def plot(stream: Stream, runs: list[ArmRun], part: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mids = [stream.offline_end + (a + b) / 2 for a, b in windows(stream)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        rank, hit = windowed(run, stream, part)
        axes[0].plot(mids, rank, marker="o", ms=3, label=run.arm.name)
        axes[1].plot(mids, hit, marker="o", ms=3, label=run.arm.name)
    for ax, label in zip(axes, ("normalized rank (lower is better)", "HR@10 vs 100 negatives")):
        ax.axvline(stream.val_end, color="grey", ls="--", lw=1)
        if stream.drift is not None:
            ax.axvline(stream.drift, color="red", ls=":", lw=1)
        ax.set_xlabel("event (window middle); dashed: validation | test; dotted: drift")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Online learning, serve protocol: {stream.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the benchmark ------------------------------------------------------------------------------

def served_mean(run: ArmRun, part: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """Mean rank and HR@10 of the scored events at stream positions [lo, hi), first items left out."""
    index = np.arange(len(run.rank))
    mask = (part != "first_item") & (index >= lo) & (index < hi)
    return mean_over(run.rank, mask), mean_over(run.hit.astype(np.float64), mask)


def choose_settings(stream: Stream, ckpt: Checkpoint, configs: Configs, interval: int,
                    work: Path) -> tuple[Arm, list[str]]:
    """The (lr, replay ratio) of an online arm with the best rank on the validation windows."""
    base_lr = ckpt.configs.training.lr
    part = partitions(stream, stream.val_end)
    rows, best = [], None
    for factor, ratio in itertools.product(LR_FACTORS, REPLAY_RATIOS):
        arm = Arm(f"online-{interval}", interval, base_lr * factor, ratio)
        run = Replay(stream, ckpt, configs, arm, work).run(stream.val_end)
        rank, hit = served_mean(run, part, 0, len(run.rank))
        rows.append(f"    lr {arm.lr:.4g} ({factor:g}x), replay {ratio:g}: validation rank {rank:.4f}, HR@10 {hit:.4f}"
                    f" ({run.published} versions decided, {run.refused} refused by the guard, {run.seconds:.0f} s)")
        if best is None or rank < best[0]:
            best = (rank, arm)
    assert best is not None
    return best[1], rows + [f"    validation rank {best[0]:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="synthetic abrupt drift, preset small: intervals scaled to the stream's size")
    parser.add_argument("--data", default="synthetic-abrupt",
                        help="synthetic-abrupt, synthetic-gradual, ml-100k or amazon-magazine")
    parser.add_argument("--path", default="", help="dataset file or folder (defaults under ../shared/data)")
    parser.add_argument("--size", default="small", help="synthetic size (small, medium, large)")
    parser.add_argument("--synthetic-events", type=int, default=0, help="synthetic: events (0: the size's)")
    parser.add_argument("--drift-at", type=float, default=0.5, help="synthetic: where the drift starts")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--epochs", type=int, default=0, help="offline epochs (0: the preset's)")
    parser.add_argument("--retrain-every", type=int, default=-1,
                        help="arm (d): full retrain every M events (-1: 25,000 scaled to the stream; 0: off)")
    parser.add_argument("--exclude-recent", choices=("auto", "on", "off"), default="auto",
                        help="leave the user's recent items out of the ranking (auto: on for real data as every "
                             "table; off for synthetic, whose users repeat items by design)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="", help="folder for the PNG and the per-window JSON")
    args = parser.parse_args()
    if args.quick:
        args.data, args.size, args.preset, args.synthetic_events, args.drift_at = \
            "synthetic-abrupt", "small", "small", 0, 0.5
    configure_logging("WARNING")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    stream = load_stream(args)
    n = len(stream.events)
    scale = min(stream.scale, 1.0) if args.data.startswith("synthetic") else 1.0  # real data: as specified
    intervals = [max(1, round(i * scale)) for i in INTERVALS]
    retrain = args.retrain_every if args.retrain_every >= 0 else max(1, round(RETRAIN_EVERY * scale))
    print(f"stream: {stream.name}: {n} events; offline training on [0, {stream.offline_end}), validation windows "
          f"[{stream.offline_end}, {stream.val_end}), test windows [{stream.val_end}, {n}); preset {args.preset}, "
          f"{args.threads} thread(s)")
    if scale < 1.0:
        print(f"scaled: the stream has {stream.scale:g}x the {REFERENCE_EVENTS} events of the reference, so the "
              f"publish intervals {INTERVALS[0]:,}/{INTERVALS[1]:,} become {intervals[0]}/{intervals[1]} and the "
              f"full retrain every {RETRAIN_EVERY:,} becomes {retrain}")
    work = Path(tempfile.mkdtemp(prefix="bench-online-"))
    try:
        exclude = args.exclude_recent == "on" or (args.exclude_recent == "auto" and not args.data.startswith("synth"))
        print("already-seen items: " + ("the user's recent items are left out (as every table)" if exclude else
                                        "kept in the ranking (synthetic users repeat items by design)"))
        configs = offline_configs(args.preset, args.seed, args.epochs or None, exclude)
        ckpt = train_offline(stream.events.slice(0, stream.offline_end), configs, work / "offline")
        print(f"offline: {ckpt.epoch} epochs, lr {ckpt.configs.training.lr:g}, popularity weight "
              f"{ckpt.configs.scoring.popularity_weight:g} (half-life {ckpt.configs.cache.popularity_halflife:g}), "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        report(stream, ckpt, configs, intervals, retrain, work, args, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(stream: Stream, ckpt: Checkpoint, configs: Configs, intervals: list[int], retrain: int, work: Path,
           args: argparse.Namespace, started: float) -> None:
    n = len(stream.events)
    chosen: list[Arm] = []
    val_rank: dict[str, float] = {}
    print("\nsettings chosen on the validation windows "
          f"[{stream.offline_end}, {stream.val_end}) (lowest mean rank; test windows unseen):")
    for interval in intervals:
        arm, rows = choose_settings(stream, ckpt, configs, interval, work)
        print(f"  online, publish every {interval}: chose lr {arm.lr:.4g}, replay ratio {arm.replay_ratio:g}")
        print("\n".join(rows), flush=True)
        chosen.append(arm)
        val_rank[arm.name] = float(rows[-1].split()[-1])
    best_online = min(chosen, key=lambda a: val_rank[a.name])
    print(f"  interval chosen on validation: {best_online.interval} ({best_online.name}); "
          "its arm is 'online' in the summary lines")
    arms = [Arm("frozen")] + chosen + ([Arm(f"retrain-{retrain}", retrain_every=retrain)] if retrain else [])
    part = partitions(stream, n)
    runs = []
    for arm in arms:
        run = Replay(stream, ckpt, configs, arm, work).run(n)
        runs.append(run)
        extra = ""
        if arm.interval:
            extra = f", {run.published} versions decided, {run.refused} refused, {len(run.adoptions)} adopted"
        elif arm.retrain_every:
            extra = f", {len(run.adoptions)} retrains"
        print(f"  ran {arm.name}: {run.seconds:.0f} s{extra}", flush=True)
    print_windows(stream, runs, part)
    print_partitions(stream, runs, part)
    test_lo = stream.val_end - stream.offline_end
    print("\nforgetting probe: validation events [{}, {}) re-scored at the end by each arm's final weights, cache "
          "rebuilt from empty (reset); frozen = no forgetting".format(stream.offline_end, stream.val_end))
    for run in runs:
        if run.final_state is not None:
            rank, hit = probe_rank(stream, ckpt, run.final_state)
            print(f"  {run.arm.name:>16}: rank {rank:.4f}, HR@10 {hit:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot(stream, runs, part, out / "windows.png")
        print(f"\nwindows plot: {out / 'windows.png'}")
    frozen = runs[0]
    online = runs[[r.arm.name for r in runs].index(best_online.name)]
    targets(stream, runs, part, test_lo)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    if stream.drift is not None:
        lo = stream.drift - stream.offline_end
        o, f = served_mean(online, part, max(lo, test_lo), n), served_mean(frozen, part, max(lo, test_lo), n)
        print(f"online vs frozen after drift: rank {o[0]:.4f} vs {f[0]:.4f}, HR@10 {o[1]:.4f} vs {f[1]:.4f}")
    else:
        o, f = served_mean(online, part, test_lo, n), served_mean(frozen, part, test_lo, n)
        print(f"online vs frozen on the test windows: rank {o[0]:.4f} vs {f[0]:.4f}, HR@10 {o[1]:.4f} vs {f[1]:.4f}")


def print_windows(stream: Stream, runs: list[ArmRun], part: np.ndarray) -> None:
    names = [r.arm.name for r in runs]
    table = {r.arm.name: windowed(r, stream, part) for r in runs}
    for metric, k in (("normalized rank (lower is better)", 0), ("HR@10 (higher is better)", 1)):
        print(f"\nwindowed {metric}, first items left out; V = validation window, T = test window, * = drift inside")
        print(f"{'events':>15} " + " ".join(f"{name:>16}" for name in names))
        for w, (a, b) in enumerate(windows(stream)):
            lo, hi = stream.offline_end + a, stream.offline_end + b
            tag = "V" if hi <= stream.val_end else "T"
            tag += "*" if stream.drift is not None and lo <= stream.drift < hi else " "
            print(f"{lo:>6}-{hi:<6}{tag} " + " ".join(f"{table[name][k][w]:>16.4f}" for name in names))


def print_partitions(stream: Stream, runs: list[ArmRun], part: np.ndarray) -> None:
    test = np.arange(len(part)) >= stream.val_end - stream.offline_end
    print("\ntest windows per partition (relative to the offline events): rank / HR@10 (count)")
    print(f"{'partition':>12} " + " ".join(f"{r.arm.name:>22}" for r in runs))
    for name in ("observed", "new_user", "new_item", "first_item", "all served"):
        mask = test & ((part != "first_item") if name == "all served" else (part == name))
        cells = [f"{mean_over(r.rank, mask):.4f} / {mean_over(r.hit.astype(float), mask):.4f}" for r in runs]
        print(f"{name:>12} " + " ".join(f"{c:>22}" for c in cells) + f"  ({int(mask.sum())})")


def targets(stream: Stream, runs: list[ArmRun], part: np.ndarray, test_lo: int) -> None:
    print("\ntargets:")
    n_scored = len(part)
    if stream.drift is not None:
        spans = windows(stream)
        pre = [(a, b) for a, b in spans if stream.offline_end + b <= stream.drift]
        last = spans[-LAST_WINDOWS:]
        for run in runs:
            rank = windowed(run, stream, part)[0]
            pre_rank = float(np.mean([rank[spans.index(s)] for s in pre]))
            last_rank = float(np.mean([rank[spans.index(s)] for s in last]))
            ok = last_rank <= (1 + RECOVERY) * pre_rank
            print(f"  {run.arm.name:>16}: pre-drift windowed rank {pre_rank:.4f}, last {LAST_WINDOWS} windows "
                  f"{last_rank:.4f} ({last_rank / pre_rank - 1:+.1%}): "
                  f"{'recovered' if ok else 'NOT recovered'} (target: within {RECOVERY:.0%})")
        print("  target: online recovers to within 10% of its pre-drift windowed rank while frozen does not")
    frozen = served_mean(runs[0], part, test_lo, n_scored)
    for run in runs[1:]:
        mine = served_mean(run, part, test_lo, n_scored)
        verdict = "beats" if mine[0] < frozen[0] and mine[1] > frozen[1] else "does NOT beat"
        print(f"  {run.arm.name:>16} {verdict} frozen on the test windows (rank {mine[0]:.4f} vs {frozen[0]:.4f}, "
              f"HR@10 {mine[1]:.4f} vs {frozen[1]:.4f}); target: lower rank and higher HR@10")


if __name__ == "__main__":
    main()
