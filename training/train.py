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

from felrec_stream.config import CacheConfig, Configs, EvalConfig, ScoringConfig, replace
from felrec_stream.data.split import chronological_split
from felrec_stream.device import resolve_device
from felrec_stream.errors import ModelError, TrainingError
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import ActivationBudget, FELRec
from felrec_stream.model.losses import representation_spread
from felrec_stream.progress import ProgressLog
from felrec_stream.state.checkpoint import Checkpoint, CosineWarmupSchedule, load_checkpoint, save_checkpoint
from felrec_stream.parallel import Ranks, sync_batch_norms
from felrec_stream.state.engine import (DEFAULT_CACHE, commit_batch, encode, encode_after, infer_batch, prepare_batch,
                                        whole_after, whole_batch)
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch, iter_batches
from training.evaluate import DEFAULT_EXCLUDE_RECENT, EvalResult, evaluate, evaluate_variants
from training.felrec_online import FELRecOnline, PopularityOnline

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
    if training_cfg.optimizer == "adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=training_cfg.lr, weight_decay=training_cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=training_cfg.lr, momentum=training_cfg.momentum,
                                    weight_decay=training_cfg.weight_decay)
    schedule = CosineWarmupSchedule(optimizer, training_cfg.lr, training_cfg.min_lr,
                                    training_cfg.warmup_epochs, training_cfg.epochs)
    return _State(model, store, optimizer, schedule, configs, ranks=ranks)


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
    state.model.load_state_dict(checkpoint.model_state)
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
    loss = train_epoch(state.model, state.store, state.optimizer, train_events, cfgs.training.batch_size,
                       cfgs.cache, desc=f"epoch {epoch + 1}/{cfgs.training.epochs}", ranks=ranks,
                       max_activation_mb=cfgs.training.max_activation_mb)
    seconds = time.perf_counter() - started
    spread = float(representation_spread(state.store.users.vectors.all()))
    store_state = state.store.state_dict()  # the cache after training, before validation moves it on
    if ranks is not None:  # cheap insurance once an epoch: the replicas must be bit-identical
        ranks.agree({"model": state.model.state_dict(), "store": store_state}, "model and cache after the epoch")
    val, scoring = validate(state.model, state.store, cfgs, val_events, train_events, ranks)
    val_rank = val.mean_rank
    state.epoch = epoch + 1
    state.spread_history.append(spread)
    record = {"epoch": epoch + 1, "loss": loss, "lr": lr, "val_rank": val_rank,
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
        model_state=state.model.state_dict(), configs=configs, epoch=state.epoch,
        best_val_rank=state.best_val_rank, best_epoch=state.best_epoch,
        optimizer_state=state.optimizer.state_dict(), schedule_state=state.schedule.state_dict(),
        spread_history=list(state.spread_history), history=list(state.history), store_state=store_state)


def is_collapsed(spread_history: list[float], min_spread: float, patience: int) -> bool:
    """True when the last `patience` epochs all had a spread below `min_spread`."""
    if patience < 1 or len(spread_history) < patience:
        return False
    return all(s < min_spread for s in spread_history[-patience:])


def train_epoch(model: FELRec, store: RepresentationStore, optimizer: torch.optim.Optimizer,
                events: pa.Table, batch_size: int, cache: CacheConfig = DEFAULT_CACHE, desc: str = "epoch",
                timer: dict[str, float] | None = None, ranks: Ranks | None = None,
                max_activation_mb: int = 0) -> float:
    """Empty the cache, replay `events` in order; returns the mean training loss per batch."""
    from tqdm import tqdm

    store.reset()
    model.train()
    losses = []
    progress = ProgressLog("train_progress", total_events=len(events), epoch=desc)  # logs outside a TTY too
    with tqdm(total=len(events), desc=desc, unit="ev", leave=False, disable=not sys.stderr.isatty()) as bar:
        for batch in iter_batches(events, batch_size):
            loss = train_step(model, store, optimizer, batch, cache, timer, ranks, max_activation_mb)
            if loss is not None:
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(len(batch))
            progress.update(len(batch), loss)
    progress.finish()
    return float(np.mean(losses)) if losses else float("nan")


def train_step(model: FELRec, store: RepresentationStore, optimizer: torch.optim.Optimizer, batch: EventBatch,
               cache: CacheConfig = DEFAULT_CACHE, timer: dict[str, float] | None = None,
               ranks: Ranks | None = None, max_activation_mb: int = 0) -> float | None:
    """prepare -> encode -> loss -> SGD step -> commit. A batch of one event (BatchNorm needs two)
    only updates the cache. Returns the loss, or None for such a batch.

    With cache_update="post_event" the loss is the paper's (histories before the event) and the
    cache receives the encodings of the histories after the batch (no gradient). With `ranks`
    this rank encodes its slice of the batch; the loss is its share of the batch mean, the
    gradients are summed over the ranks and every rank commits the whole batch. The encoder keeps
    at most `max_activation_mb` of activations for backward (0 = no limit; `ActivationBudget`)."""
    if len(batch) < 2:
        infer_batch(model, store, batch, cache, ranks)
        return None
    device = next(model.parameters()).device
    post = model.config.cache_update == "post_event"
    t0 = time.perf_counter()
    inputs = prepare_batch(store, batch, device, cache, after=post, ranks=ranks)
    t1 = time.perf_counter()
    budget = ActivationBudget(max_activation_mb << 20)
    u, x = encode(model, inputs, budget)  # (B, D), (B, D); with ranks this rank's (b, D)
    if ranks is None:
        loss = model.loss(u, x)
    else:  # this slice's share of the batch mean; the queue gets every rank's keys
        loss = model.loss(u, x, len(batch), functools.partial(ranks.gather_rows, n=len(batch)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    budget.backward()
    if ranks is not None:
        ranks.sum_gradients(model.parameters())
    optimizer.step()
    value = float(loss.detach())  # syncs the device, so the timings below are honest
    if ranks is not None:
        value = ranks.sum(value)  # the shares add up to the batch mean
    t2 = time.perf_counter()
    u, x = whole_batch(ranks, inputs, u, x)
    if post:
        with torch.no_grad():
            after = whole_after(ranks, inputs, encode_after(model, inputs))
        commit_batch(store, inputs, u, x, after)
    else:
        commit_batch(store, inputs, u, x)
    if timer is not None:
        t3 = time.perf_counter()
        for key, seconds in (("prep", t1 - t0), ("fwd_bwd", t2 - t1), ("write", t3 - t2)):
            timer[key] = timer.get(key, 0.0) + seconds
    return value
