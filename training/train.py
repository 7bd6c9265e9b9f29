"""The FELRec training job: time-ordered replay of the training events, one epoch at a time.

Per epoch (paper section 3.3): the cache is emptied, the training events are replayed in time
order in micro-batches (never shuffled: a history must only hold the past); per batch the shared
engine gathers the histories' cached vectors, the encoder produces u and x, the FELRec-Q/-P loss
takes one SGD step, and the (detached) u and x are written back to the cache. After the epoch the
online evaluator scores the validation events, continuing from the epoch's cache; the last and the
best (lowest validation rank) checkpoints are written. A collapse guard stops a run whose user
vectors all point the same way.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from felrec_stream.config import CacheConfig, Configs, EvalConfig, ModelConfig, ScoringConfig, TrainingConfig, replace
from felrec_stream.data.split import chronological_split
from felrec_stream.device import autocast, check_precision, release_freed_memory, resolve_device
from felrec_stream.errors import ConfigError, ModelError, TrainingError
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import ActivationBudget, FELRec, Negatives
from felrec_stream.model.norms import adapting_norms
from felrec_stream.model.losses import representation_spread
from felrec_stream.progress import ProgressLog
from felrec_stream.state.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from felrec_stream.parallel import Ranks, sync_batch_norms
from felrec_stream.state.engine import (DEFAULT_CACHE, BatchInputs, Sequences, commit_batch,
                                        encode_sequences, event_sequences, infer_batch, prepare_batch,
                                        whole_after, whole_rows, with_after)
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch, iter_batches
from training.evaluate import DEFAULT_EXCLUDE_RECENT, EvalResult, evaluate, evaluate_variants
from training.felrec_online import FELRecOnline, PopularityOnline
from training.schedule import CosineWarmupSchedule

log = get_logger(__name__)

LAST, BEST = "last.pt", "best.pt"
# scoring.calibrate_popularity: the popularity half-lives (events; 0 = plain counts) tried on the
# validation split before training (popularity alone), and the prior's weights tried every epoch.
POPULARITY_HALFLIVES = (0.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0)
POPULARITY_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    epochs_completed: int
    best_val_rank: float
    best_epoch: int  # 1-based epoch of the best checkpoint, -1 if none
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _State:
    """Everything that changes while training and is saved in a checkpoint."""

    model: FELRec
    store: RepresentationStore
    optimizer: torch.optim.Optimizer
    schedule: CosineWarmupSchedule
    configs: Configs
    ranks: Ranks | None = None  # data-parallel job (None: one process)
    writer: FELRec | None = None  # training.ema_decay > 0: the moving average that writes the cache
    epoch: int = 0
    best_val_rank: float = math.inf
    best_epoch: int = -1
    spread_history: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train(events: pa.Table, configs: Configs, out_dir: str | Path, resume: bool = False,
          ranks: Ranks | None = None) -> TrainResult:
    """Train FELRec on the chronological training part of `events`; checkpoints go to out_dir.

    With data-parallel `ranks` (felrec_stream.parallel) every rank runs this on the same events,
    each encoding its slice of every batch; only rank 0 writes the checkpoints."""
    out = Path(out_dir)
    training_cfg = configs.training
    split = chronological_split(events, training_cfg.val_fraction, training_cfg.test_fraction)
    device = resolve_device(training_cfg.device)
    if ranks is not None:
        device = ranks.place(device)
        if training_cfg.ema_decay > 0:
            raise ConfigError("training.ema_decay is not supported with data-parallel ranks yet")
    check_precision(training_cfg.precision, device)
    if training_cfg.ema_decay > 0 and configs.encoder.output_norm == "batch":
        raise ConfigError("training.ema_decay needs encoder.output_norm running, whiten or none: the moving "
                          "average encodes in eval mode, where batch statistics would stay at their start")
    if configs.scoring.calibrate_popularity:  # deterministic: a resumed run (and every rank) chooses the same
        configs = replace(configs, cache=replace(configs.cache, popularity_halflife=choose_popularity_halflife(
            split.train, split.val, configs.eval, configs.excluded_recent)))
    state = _new_state(configs, device, ranks)
    if resume:
        _resume(state, out / LAST)
    if training_cfg.warmup_epochs >= training_cfg.epochs > 0:
        log.warning("warmup_covers_all_epochs", warmup_epochs=training_cfg.warmup_epochs, epochs=training_cfg.epochs)
    log.info("training_started", train_events=len(split.train), val_events=len(split.val),
             test_events=len(split.test), variant=configs.model.variant, device=str(device),
             start_epoch=state.epoch, epochs=training_cfg.epochs, out_dir=str(out),
             ranks=1 if ranks is None else ranks.size)
    while state.epoch < training_cfg.epochs:
        _run_epoch(state, split.train, split.val, out)
    return TrainResult(out, out / LAST, out / BEST if (out / BEST).exists() else None, state.epoch,
                       state.best_val_rank, state.best_epoch, list(state.history))


def _new_state(configs: Configs, device: torch.device, ranks: Ranks | None = None) -> _State:
    training_cfg = configs.training
    seed_everything(training_cfg.seed)
    model = FELRec(configs.encoder, configs.model).to(device)
    if ranks is not None:
        ranks.replicate(model)
        sync_batch_norms(model, ranks)  # training batch statistics = the whole batch's
    store = RepresentationStore.for_cache(configs.encoder.d_model, configs.cache, device)
    optimizer = make_optimizer(model, training_cfg)
    schedule = CosineWarmupSchedule(optimizer, training_cfg.lr, training_cfg.min_lr,
                                    training_cfg.warmup_epochs, training_cfg.epochs)
    writer = moving_average_of(model) if training_cfg.ema_decay > 0 else None
    return _State(model, store, optimizer, schedule, configs, ranks=ranks, writer=writer)


def make_optimizer(model: FELRec, training_cfg: TrainingConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer `training.optimizer` names (learning rate `lr`, default training.lr)."""
    lr = training_cfg.lr if lr is None else lr
    if training_cfg.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=training_cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=training_cfg.momentum,
                           weight_decay=training_cfg.weight_decay)


def _resume(state: _State, path: Path) -> None:
    if state.ranks is None:
        checkpoint = load_checkpoint(path, map_location=state.store.device)
    else:  # every rank resumes from rank 0's file (the ranks need not share a file system)
        checkpoint = state.ranks.from_leader(lambda: load_checkpoint(path, map_location="cpu"))
    for name in ("encoder", "model", "cache"):
        saved, requested = getattr(checkpoint.configs, name), getattr(state.configs, name)
        if saved != requested:
            raise ModelError(f"cannot resume from {path}: its {name} config {saved} "
                             f"differs from the requested {requested}")
    # model_state: what wrote the cache (the moving average when there was one); online_state: the
    # trained weights the optimizer state belongs to (absent without a moving average)
    state.model.load_state_dict(checkpoint.online_state or checkpoint.model_state)
    if state.writer is not None:
        state.writer.load_state_dict(checkpoint.model_state)
    if checkpoint.optimizer_state is not None:
        state.optimizer.load_state_dict(checkpoint.optimizer_state)
    if checkpoint.schedule_state is not None:
        state.schedule.load_state_dict(checkpoint.schedule_state)
    state.epoch, state.best_val_rank = checkpoint.epoch, checkpoint.best_val_rank
    state.best_epoch = checkpoint.best_epoch
    state.spread_history, state.history = list(checkpoint.spread_history), list(checkpoint.history)
    log.info("training_resumed", path=str(path), epoch=state.epoch, best_val_rank=state.best_val_rank)


def _run_epoch(state: _State, train_events: pa.Table, val_events: pa.Table, out: Path) -> None:
    """One epoch: replay, validate, checkpoint, collapse check."""
    cfgs, ranks = state.configs, state.ranks
    epoch = state.epoch
    seed = cfgs.training.seed + epoch  # per-epoch seed: a resumed run replays identically
    torch.manual_seed(seed if ranks is None else ranks.seed(seed))  # rank 0 draws what one process draws
    lr = state.schedule.start_epoch(epoch)
    started = time.perf_counter()
    stats = train_epoch(state.model, state.store, state.optimizer, train_events, cfgs.training.batch_size,
                        cfgs.cache, desc=f"epoch {epoch + 1}/{cfgs.training.epochs}", ranks=ranks,
                        max_activation_mb=cfgs.training.max_activation_mb, window=cfgs.training.window, seed=seed,
                        frozen=cfgs.training.frozen, writer=state.writer, ema_decay=cfgs.training.ema_decay,
                        accumulate=cfgs.training.accumulate, precision=cfgs.training.precision)
    if state.writer is not None and cfgs.training.ema_decay == 1.0:  # synced once an epoch
        state.writer.load_state_dict(state.model.state_dict())
    served = state.writer or state.model  # the weights that wrote the cache
    seconds = time.perf_counter() - started
    if cfgs.training.refresh_cache:
        refresh_cache(served, state.store, train_events, cfgs, ranks)
    spread = float(representation_spread(state.store.users.vectors.all()))
    store_state = state.store.state_dict()  # the cache after training, before validation moves it on
    if ranks is not None:  # cheap insurance once an epoch: the replicas must be bit-identical
        ranks.agree({"model": served.state_dict(), "store": store_state}, "model and cache after the epoch")
    release_freed_memory()
    val, scoring = validate(served, state.store, cfgs, val_events, train_events, ranks)
    val_rank = val.mean_rank
    state.epoch = epoch + 1
    state.spread_history.append(spread)
    record = {"epoch": epoch + 1, "loss": stats.loss, "chance_loss": stats.chance,
              "users_per_batch": stats.users_per_batch, "lr": lr, "val_rank": val_rank,
              "val_hit_rate": val.summary()["total"]["hit_rate"], "popularity_weight": scoring.popularity_weight,
              "spread": spread, "seconds": round(seconds, 3),
              "events_per_s": round(len(train_events) / max(seconds, 1e-9), 1)}
    state.history.append(record)
    log.info("epoch_done", **record)
    improved = val_rank < state.best_val_rank
    if improved:
        state.best_val_rank, state.best_epoch = val_rank, epoch + 1
    if ranks is None or ranks.leader:  # one writer
        checkpoint = _checkpoint(state, store_state, replace(cfgs, scoring=scoring))
        save_checkpoint(checkpoint, out / LAST)
        if improved:
            save_checkpoint(checkpoint, out / BEST)
    if is_collapsed(state.spread_history, cfgs.training.min_spread, cfgs.training.collapse_patience):
        log.error("representation_collapse", epoch=epoch + 1, spread=spread,
                  min_spread=cfgs.training.min_spread, patience=cfgs.training.collapse_patience)
        raise TrainingError(
            f"representation collapse: the spread of the user vectors stayed below "
            f"{cfgs.training.min_spread} for {cfgs.training.collapse_patience} epoch(s) "
            f"(last {spread:.2e}); every user gets the same vector. Check cache.cold_start_input "
            f"(id_seed avoids the all-zero start), lower the learning rate, or use the other variant.")


def moving_average_of(model: FELRec) -> FELRec:
    """A frozen copy of `model` in eval mode, for `update_moving_average` (training.ema_decay)."""
    writer = copy.deepcopy(model).eval()
    for p in writer.parameters():
        p.requires_grad_(False)
    return writer


@torch.no_grad()
def update_moving_average(writer: FELRec, model: FELRec, decay: float) -> None:
    """writer <- decay * writer + (1 - decay) * model, parameters only: the writer's output
    statistics follow its own outputs (it encodes under `adapting_norms`)."""
    for mine, theirs in zip(writer.parameters(), model.parameters()):
        mine.lerp_(theirs, 1.0 - decay)


def refresh_cache(model: FELRec, store: RepresentationStore, events: pa.Table, cfgs: Configs,
                  ranks: Ranks | None = None) -> None:
    """Rebuild the cache with the final weights (training.refresh_cache): empty it and replay
    `events` in order without gradients, in eval mode, as the evaluator and the worker apply events.

    During the epoch every vector was written by the weights of its time: the cache mixes the
    output spaces of every step, and a served user vector meets item vectors written hundreds of
    steps earlier. After the replay every vector comes from one encoder."""
    store.reset()
    online = FELRecOnline(model, store, cfgs.cache, ranks=ranks)
    online.mode = "reset"  # a cache rebuilt from empty: the output statistics follow it (`observe`)
    for batch in iter_batches(events, cfgs.training.batch_size):
        online.observe(batch)


def choose_popularity_halflife(train_events: pa.Table, val_events: pa.Table, eval_cfg: EvalConfig,
                               exclude_recent: int = DEFAULT_EXCLUDE_RECENT) -> float:
    """The half-life of POPULARITY_HALFLIVES whose recent popularity alone ranks the validation
    events best (a property of the stream, chosen before training: the store counts with it)."""
    ranks = [evaluate(PopularityOnline([train_events], halflife), val_events, train_events, eval_cfg,
                      exclude_recent=exclude_recent).mean_rank for halflife in POPULARITY_HALFLIVES]
    best = POPULARITY_HALFLIVES[int(np.argmin(ranks))]
    log.info("popularity_halflife_chosen", halflife=best,
             ranks={f"{h:g}": round(r, 4) for h, r in zip(POPULARITY_HALFLIVES, ranks)})
    return best


def validate(model: FELRec, store: RepresentationStore, cfgs: Configs, val_events: pa.Table,
             train_events: pa.Table, ranks: Ranks | None = None) -> tuple[EvalResult, ScoringConfig]:
    """Replay the validation events from the epoch's cache (under the eval protocol); with
    `scoring.calibrate_popularity` every weight of POPULARITY_WEIGHTS is scored in the same replay
    and the best (lowest validation rank) is kept. Returns the result and the scoring used."""
    online = FELRecOnline(model, store, cfgs.cache, protocol=cfgs.eval.protocol, scoring=cfgs.scoring, ranks=ranks)
    if not cfgs.scoring.calibrate_popularity:
        return evaluate(online, val_events, train_events, cfgs.eval, exclude_recent=cfgs.excluded_recent), cfgs.scoring
    results = evaluate_variants(online, val_events, train_events, cfgs.eval, popularity_weights=POPULARITY_WEIGHTS,
                                exclude_recent=cfgs.excluded_recent)
    best = int(np.argmin([r.mean_rank for r in results]))
    log.info("popularity_weight_calibrated", weight=POPULARITY_WEIGHTS[best],
             ranks={f"{w:g}": round(r.mean_rank, 4) for w, r in zip(POPULARITY_WEIGHTS, results)})
    return results[best], replace(cfgs.scoring, popularity_weight=POPULARITY_WEIGHTS[best])


def _checkpoint(state: _State, store_state: dict[str, Any], configs: Configs) -> Checkpoint:
    return Checkpoint(
        model_state=(state.writer or state.model).state_dict(), configs=configs, epoch=state.epoch,
        online_state=None if state.writer is None else state.model.state_dict(),
        best_val_rank=state.best_val_rank, best_epoch=state.best_epoch,
        optimizer_state=state.optimizer.state_dict(), schedule_state=state.schedule.state_dict(),
        spread_history=list(state.spread_history), history=list(state.history), store_state=store_state)


def is_collapsed(spread_history: list[float], min_spread: float, patience: int) -> bool:
    """True when the last `patience` epochs all had a spread below `min_spread`."""
    if patience < 1 or len(spread_history) < patience:
        return False
    return all(s < min_spread for s in spread_history[-patience:])


class Stepper:
    """Backward passes and optimizer steps: one step every `every` batches (training.accumulate),
    on the sum of their gradients, each batch's loss weighted 1/every, so a step sees the events of
    `every` consecutive batches (many users) while the cache is still written after every batch.
    Every step moves the `writer` (the weights' moving average, training.ema_decay) after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: FELRec, every: int = 1,
                 ranks: Ranks | None = None, writer: FELRec | None = None, decay: float = 0.0) -> None:
        self.optimizer, self.model, self.every, self.ranks = optimizer, model, every, ranks
        self.writer, self.decay = writer, decay
        self.pending = 0  # batches whose gradients wait for the next step

    def backward(self, loss: torch.Tensor, budget: ActivationBudget) -> None:
        if self.pending == 0:
            self.optimizer.zero_grad(set_to_none=True)
        (loss / self.every if self.every > 1 else loss).backward()
        budget.backward()
        self.pending += 1
        if self.pending == self.every:
            self.flush()

    def flush(self) -> None:
        """Step on what has accumulated (the end of an epoch steps on a partial group)."""
        if self.pending == 0:
            return
        if self.ranks is not None:
            self.ranks.sum_gradients(self.model.parameters())
        self.optimizer.step()
        self.pending = 0
        if self.writer is not None:
            update_moving_average(self.writer, self.model, self.decay)


@dataclass(frozen=True)
class StepStats:
    """One optimizer step: its loss, the loss a model that cannot tell the positive from the
    negatives would have (FELRec-Q's chance level; NaN for FELRec-P) and its distinct users."""

    loss: float
    chance: float
    users: int


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean over the steps
    chance: float  # mean chance level of the steps
    users_per_batch: float  # median distinct users of a step's events


def train_epoch(model: FELRec, store: RepresentationStore, optimizer: torch.optim.Optimizer,
                events: pa.Table, batch_size: int, cache: CacheConfig = DEFAULT_CACHE, desc: str = "epoch",
                timer: dict[str, float] | None = None, ranks: Ranks | None = None,
                max_activation_mb: int = 0, window: int = 0, seed: int = 0, frozen: bool = False,
                writer: FELRec | None = None, ema_decay: float = 0.0, accumulate: int = 1,
                precision: str = "fp32") -> EpochStats:
    """Empty the cache, replay `events` in order, window by window (`train_window`; window 0 =
    batch_size: consecutive batches); `seed` draws the batches of each window; one optimizer step
    every `accumulate` batches (`Stepper`); precision: `encode_pair`."""
    from tqdm import tqdm

    store.reset()
    model.train()
    steps: list[StepStats] = []
    window = window or batch_size
    stepper = Stepper(optimizer, model, accumulate, ranks, writer, ema_decay)
    progress = ProgressLog("train_progress", total_events=len(events), epoch=desc)  # logs outside a TTY too
    with tqdm(total=len(events), desc=desc, unit="ev", leave=False, disable=not sys.stderr.isatty()) as bar:
        for n, events_in in enumerate(iter_batches(events, window)):
            done = train_window(model, store, stepper, events_in, batch_size, cache,
                                np.random.default_rng([seed, n]), timer, ranks, max_activation_mb, frozen, precision)
            steps.extend(done)
            loss = done[-1].loss if done else None
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(len(events_in))
            progress.update(len(events_in), loss)
            release_freed_memory()  # else the heap's holes add up to ~0.7 GB of RSS over an epoch at paper size
    stepper.flush()
    progress.finish()
    if not steps:
        return EpochStats(float("nan"), float("nan"), 0.0)
    return EpochStats(float(np.mean([s.loss for s in steps])), float(np.mean([s.chance for s in steps])),
                      float(np.median([s.users for s in steps])))


def train_step(model: FELRec, store: RepresentationStore, optimizer: torch.optim.Optimizer, batch: EventBatch,
               cache: CacheConfig = DEFAULT_CACHE, timer: dict[str, float] | None = None,
               ranks: Ranks | None = None, max_activation_mb: int = 0,
               rng: np.random.Generator | None = None, precision: str = "fp32") -> float | None:
    """One optimizer step on the whole batch (`train_window` with one batch); its loss, or None
    for a batch of one event (BatchNorm needs two), which only updates the cache."""
    steps = train_window(model, store, optimizer, batch, len(batch), cache, rng, timer, ranks, max_activation_mb,
                         precision=precision)
    return steps[0].loss if steps else None


def train_window(model: FELRec, store: RepresentationStore, optimizer: torch.optim.Optimizer | Stepper,
                 window: EventBatch,
                 batch_size: int, cache: CacheConfig = DEFAULT_CACHE, rng: np.random.Generator | None = None,
                 timer: dict[str, float] | None = None, ranks: Ranks | None = None,
                 max_activation_mb: int = 0, frozen: bool = False, precision: str = "fp32") -> list[StepStats]:
    """Train on a window of time-ordered events: prepare -> per batch (encode -> loss -> step) -> commit.

    Every event of the window reads the cache as it was before the window, its histories hold
    exactly its earlier events (those of the window included): no event sees a later event's
    history or vector, whatever order the batches take. The batches are the window's events in
    order (rng None) or drawn without replacement by `rng`, so each holds many distinct users; a
    batch of one event takes no step. After the last step the cache is written once:
    cache_update="post_event" writes the encodings of the touched entities' histories after the
    window (no gradient), "pre_event" each entity's latest event encoding. With `ranks` this rank
    encodes its slice of each batch; the loss is its share of the batch mean, the gradients are
    summed over the ranks and every rank commits the whole window. The encoder keeps at most
    `max_activation_mb` of activations for backward (0 = no limit; `ActivationBudget`). frozen:
    no optimizer step (the learning control: the loss is still computed and reported). A `Stepper`
    with a writer (the weights' moving average, training.ema_decay) writes the cache instead of them.
    precision="bf16": the window's encodings in bf16 (`encode_pair`; a one-event window: fp32), the rest in fp32."""
    stepper = optimizer if isinstance(optimizer, Stepper) else Stepper(optimizer, model, ranks=ranks)
    writer = stepper.writer
    if len(window) < 2:
        with adapting_norms(writer or model):
            infer_batch(writer or model, store, window, cache, ranks)
        return []
    device = next(model.parameters()).device
    post = model.config.cache_update == "post_event"
    t0 = time.perf_counter()
    inputs = prepare_batch(store, window, device, cache, before=False, ranks=ranks)
    rng = rng if rng is not None else np.random.default_rng(0)
    order = np.arange(len(window)) if len(window) <= batch_size else rng.permutation(len(window))
    U = X = None  # (W, D) each event's own encodings, for a pre_event commit
    steps = []
    t1 = time.perf_counter()
    for first in range(0, len(window), batch_size):
        rows = np.sort(order[first:first + batch_size])  # event order inside a batch
        users, items = event_sequences(store, inputs, rows, device, cache, ranks)
        if len(rows) < 2:
            with torch.no_grad():
                u, x = encode_pair(writer or model, users, items, precision)
        else:
            negatives = draw_negatives(store, model.config, rng, device)
            u, x, stats = step_rows(model, store, stepper, inputs, rows, users, items, ranks, max_activation_mb,
                                negatives, frozen, precision)
            steps.append(stats)
            if writer is not None and not post:  # the writer's encodings are what the cache receives
                with torch.no_grad(), adapting_norms(writer):
                    u, x = encode_pair(writer, users, items, precision)
        if not post:
            u, x = whole_rows(ranks, u.detach(), x.detach(), len(rows))
            U = u.new_empty((len(window), u.shape[1])) if U is None else U
            X = x.new_empty((len(window), x.shape[1])) if X is None else X
            U[torch.from_numpy(rows).to(device)], X[torch.from_numpy(rows).to(device)] = u, x
    t2 = time.perf_counter()
    if post:
        with torch.no_grad(), adapting_norms(writer or model):
            inputs = with_after(store, inputs, device, cache, ranks)
            after = whole_after(ranks, inputs, encode_pair(writer or model, inputs.users_after, inputs.items_after,
                                                           precision))
        commit_batch(store, inputs, None, None, after)
    else:
        commit_batch(store, inputs, U, X)
    if timer is not None:
        t3 = time.perf_counter()
        for key, seconds in (("prep", t1 - t0), ("fwd_bwd", t2 - t1), ("write", t3 - t2)):
            timer[key] = timer.get(key, 0.0) + seconds
    return steps


def step_rows(model: FELRec, store: RepresentationStore, stepper: Stepper, inputs: BatchInputs,
          rows: np.ndarray,
          users: Sequences, items: Sequences, ranks: Ranks | None, max_activation_mb: int,
          negatives: Negatives | None = None, frozen: bool = False,
          precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, StepStats]:
    """encode -> loss -> optimizer step on the events `rows` of a window; (u, x) of this rank's rows.
    frozen: the loss only, no step (the learning control). precision: `encode_pair`."""
    device = users.h.device
    # freed memory goes back to the OS between the re-encoded buckets' backward passes and before the
    # loss: glibc's heap otherwise keeps those holes mapped (~0.2 GB of peak RSS at paper size)
    budget = ActivationBudget(max_activation_mb << 20, between=release_freed_memory)
    with torch.set_grad_enabled(not frozen):
        u, x = encode_pair(model, users, items, precision, budget)  # (b, D) each
    release_freed_memory()
    mine = rows if ranks is None else rows[ranks.span(len(rows))]
    ids = None
    if model.config.mask_own_negatives:
        ids = tuple(torch.from_numpy(slots[mine]).to(device) for slots in (inputs.user_slots, inputs.item_slots))
    targets = served_targets(model, store, inputs, mine, u, x)
    if ranks is None:
        loss = model.loss(u, x, ids=ids, negatives=negatives, targets=targets)
    else:  # this slice's share of the batch mean; the queue gets every rank's keys
        loss = model.loss(u, x, len(rows), functools.partial(ranks.gather_rows, n=len(rows)), ids, negatives,
                          targets)
    if not frozen:
        stepper.backward(loss, budget)
    value = float(loss.detach())  # syncs the device, so the timings are honest
    chance = float(getattr(model, "chance", math.nan))
    if ranks is not None:
        value = ranks.sum(value)  # the shares add up to the batch mean
        chance = ranks.sum(chance * len(mine)) / len(rows)
    return u, x, StepStats(value, chance, len(np.unique(inputs.user_slots[rows])))


def encode_pair(model: FELRec, users: Sequences | None, items: Sequences | None, precision: str = "fp32",
                budget: ActivationBudget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_u, D), (R_x, D) fp32 encodings of the users' and the items' sequences: the one place
    training calls the encoder. precision="bf16" (training.precision): its forward under
    torch.autocast(bfloat16) (and so its backward; a bucket the budget defers replays under it too),
    the outputs cast back to fp32 before the loss or the cache sees them; "fp32": the plain call."""
    device = next(model.parameters()).device
    with autocast(precision, device):
        u, x = encode_sequences(model, users, budget), encode_sequences(model, items, budget)
    return u.float(), x.float()


def served_targets(model: FELRec, store: RepresentationStore, inputs: BatchInputs, rows: np.ndarray, u: torch.Tensor,
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """model.positives="cached": (b, D) each, the vectors the cache serves for the users and items
    of the events `rows` just before the window; an entity without one yet keeps its fresh encoding.
    None for fresh positives."""
    if model.config.positives != "cached":
        return None
    out = []
    for table, slots, fresh in ((store.users, inputs.user_slots[rows], u), (store.items, inputs.item_slots[rows], x)):
        known = torch.from_numpy(table.history.counts[slots] > 0).to(fresh.device).unsqueeze(1)
        cached = table.vectors.get(torch.from_numpy(slots)).to(fresh.device, fresh.dtype)
        out.append(torch.where(known, cached, fresh.detach()))
    return out[0], out[1]


def draw_negatives(store: RepresentationStore, model_cfg: ModelConfig, rng: np.random.Generator,
                   device: torch.device) -> Negatives | None:
    """model.negatives="cache": `negatives_per_step` users and items drawn uniformly (with
    replacement) from the entities with a cached vector; None for the queue, or while a kind has none.
    Every data-parallel rank draws the same (same rng state)."""
    if model_cfg.variant != "q" or model_cfg.negatives != "cache":
        return None
    drawn = []
    for table in (store.users, store.items):
        written = np.flatnonzero(table.history.counts[: len(table)] > 0)
        if len(written) == 0:
            return None
        slots = written[rng.integers(0, len(written), model_cfg.negatives_per_step)]
        drawn += [table.vectors.get(torch.from_numpy(slots)).to(device, torch.float32),
                  torch.from_numpy(slots).to(device)]
    return Negatives(*drawn)
