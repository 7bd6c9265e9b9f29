"""The online evaluator: replay events in time order, score each against the catalog so far.

The catalog holds every item met so far (training items, then warm-up items, then evaluation
items as they occur). Events are replayed in micro-batches, but batching is an implementation
detail: event i is ranked among the items met before it plus its own item (`catalog_sizes`), and
every model scores it with what it knew just before event i (`eval.protocol` "serve"; see
training/protocol.py for the contract and training/felrec_online.py for FELRec's "paper" protocol).
Each event gets
- its normalized rank among those catalog items (0 best, ties half),
- a sampled HR@k hit (true item vs `num_negatives` random items of the same catalog prefix),
- its partition (`event_partitions`): observed / new_user / new_item relative to the training
  events, and first_item for an item's very first interaction, which no deployed model can serve:
  it is reported on its own row and left out of the total under "serve",
- the number of interactions its item had before it (training + warm-up + earlier events).
Partitions a model does not serve are reported as missing, never as numbers.

Already-seen items (`exclude_recent`, the query API's rule: `ScoringConfig.exclude_recent`,
`QueryEngine.recommend`): for event i of user u, the items among u's last `exclude_recent`
interactions strictly before event i (training, warm-up and earlier evaluation events, earlier
events of the same batch included) score -inf before ranking, whatever the model. If the true item
is among them (a repeat interaction) it is excluded too: it ranks behind every other item (ties
with the other excluded items count half) and is no HR@k hit unless its negatives are excluded
too; HR@k negatives are drawn from the items that are not excluded. 0 turns the rule off.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from felrec_stream.config import Configs, EvalConfig
from felrec_stream.data.split import Split, label_partitions
from felrec_stream.device import release_freed_memory
from felrec_stream.log import get_logger
from felrec_stream.model.metrics import hit_rate_against, normalized_rank, sample_negatives
from felrec_stream.progress import ProgressLog
from felrec_stream.state.store import HistoryBuffer, IdMap
from felrec_stream.stream.events import EventBatch, iter_batches
from training.protocol import EVAL_PARTITIONS, ItemCatalog, OnlineModel

log = get_logger(__name__)

# The default rule: every table leaves out what the query API leaves out by default (last 64 items).
DEFAULT_EXCLUDE_RECENT = Configs().excluded_recent

EVENT_RESULT_SCHEMA = pa.schema([
    pa.field("event_id", pa.int64()), pa.field("user", pa.string()), pa.field("item", pa.string()),
    pa.field("partition", pa.string()), pa.field("rank", pa.float64()), pa.field("hit", pa.bool_()),
    pa.field("item_prior_interactions", pa.int64()),
])


@dataclass
class EvalResult:
    """Per-event results of one model plus their summary (see `summary()`)."""

    model: str
    served: frozenset[str]  # partitions the model serves
    events: pa.Table  # EVENT_RESULT_SCHEMA
    hr_k: int
    num_negatives: int
    seconds: float = 0.0
    protocol: str = "serve"
    exclude_recent: int = 0  # the user's last n items scored -inf (0: none)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: per-partition and total count/share/rank/hit_rate, rank vs item history."""
        return summarize(self.model, self.served, self.events, self.hr_k, self.num_negatives, self.seconds,
                         self.protocol, self.exclude_recent)

    @property
    def mean_rank(self) -> float:
        return float(self.summary()["total"]["rank"])

    def save(self, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write `<stem>.json` (summary) and `<stem>.parquet` (per event) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or _slug(self.model)
        paths = {"json": out / f"{stem}.json", "parquet": out / f"{stem}.parquet"}
        paths["json"].write_text(json.dumps(self.summary(), indent=2))
        pq.write_table(self.events, paths["parquet"])
        return paths


def evaluate(model: OnlineModel, events: pa.Table, train: pa.Table, eval_cfg: EvalConfig,
             warmup: pa.Table | None = None, exclude_recent: int = DEFAULT_EXCLUDE_RECENT) -> EvalResult:
    """Replay `warmup` (unscored), then score every event of `events` in time order, leaving out
    the items of the user's last `exclude_recent` interactions (`Configs.excluded_recent`)."""
    return evaluate_variants(model, events, train, eval_cfg, warmup, exclude_recent=exclude_recent)[0]


def evaluate_variants(model: OnlineModel, events: pa.Table, train: pa.Table, eval_cfg: EvalConfig,
                      warmup: pa.Table | None = None, popularity_weights: Sequence[float] | None = None,
                      exclude_recent: int = DEFAULT_EXCLUDE_RECENT) -> list[EvalResult]:
    """`evaluate`, or with `popularity_weights` (a model with `score_parts`, e.g. FELRecOnline) one
    result per weight of the popularity prior from a single replay (same negatives for each)."""
    started = time.perf_counter()
    catalog = ItemCatalog()
    catalog.add(np.asarray(pc.unique(train.column("item")).to_pylist(), dtype=object))
    recent = RecentItems(exclude_recent) if exclude_recent else None
    if recent is not None:  # (a reset/zero-shot warm-up replays train again: the last-n item sets stay the same)
        for batch in iter_batches(train, eval_cfg.batch_size):
            recent.before(batch, catalog)
    if warmup is not None and len(warmup):
        _warm_up(model, warmup, catalog, eval_cfg.batch_size, recent)
    ranks, hits = _score_events(model, events, catalog, eval_cfg, popularity_weights, recent)
    history = [train] + ([warmup] if warmup is not None else [])
    columns = {
        "event_id": events.column("event_id"), "user": events.column("user"), "item": events.column("item"),
        "partition": pa.array(event_partitions(train, events, history).tolist(), pa.string()),
        "item_prior_interactions": pa.array(item_prior_interactions(history, events), pa.int64()),
    }
    served = frozenset(model.partitions)
    names = [model.name] if popularity_weights is None else [f"{model.name} w={w:g}" for w in popularity_weights]
    results = []
    for name, rank, hit in zip(names, ranks, hits):
        table = pa.table({**columns, "rank": pa.array(rank, pa.float64()), "hit": pa.array(hit, pa.bool_())},
                         schema=EVENT_RESULT_SCHEMA)
        results.append(EvalResult(name, served, table, eval_cfg.hr_k, eval_cfg.num_negatives,
                                  time.perf_counter() - started, eval_cfg.protocol, exclude_recent))
    for result in results:
        total = result.summary()["total"]
        log.info("evaluation_done", model=result.model, protocol=eval_cfg.protocol, events=len(events),
                 rank=total["rank"], hit_rate=total["hit_rate"], seconds=round(result.seconds, 3))
    return results


def _warm_up(model: OnlineModel, warmup: pa.Table, catalog: ItemCatalog, batch_size: int,
             recent: RecentItems | None = None) -> None:
    """Replay events into the model's state (and the users' recent items) without scoring them."""
    observe = getattr(model, "observe", None)
    for batch in iter_batches(warmup, batch_size):
        catalog.add(batch.item)
        if recent is not None:
            recent.before(batch, catalog)
        if observe is not None:
            observe(batch)
        else:
            model.score_batch(batch, catalog)  # updates the model's state; scores unused


def evaluate_and_report(models: list[OnlineModel], split: Split, eval_cfg: EvalConfig, title: str,
                        out_dir: str | Path | None = None, plot_title: str | None = None,
                        exclude_recent: int = DEFAULT_EXCLUDE_RECENT) -> str:
    """Evaluate every model on the test events (after replaying validation) and render Table 1.

    With `out_dir`: per-model JSON/Parquet, report.md and the rank-vs-prior plot (Figure 2).
    """
    from training.report import plot_rank_vs_prior, table1_markdown

    results = [evaluate(m, split.test, split.train, eval_cfg, warmup=warmup_events(split, getattr(m, "mode", "keep")),
                        exclude_recent=exclude_recent) for m in models]
    summaries = [r.summary() for r in results]
    report = table1_markdown(summaries, title=title)
    if out_dir is not None:
        out = Path(out_dir)
        for result in results:
            result.save(out)
        (out / "report.md").write_text(report)
        plot_rank_vs_prior(summaries, out / "rank_vs_prior.png", title=plot_title or title)
    return report


def warmup_events(split: Split, mode: str = "keep") -> pa.Table:
    """Events replayed unscored before the test events: the validation events; from an empty cache
    (FELRec modes "reset", "zero-shot") the training events first, as the reference replays them."""
    return split.val if mode == "keep" else pa.concat_tables([split.train, split.val])


def _score_events(model: OnlineModel, events: pa.Table, catalog: ItemCatalog, eval_cfg: EvalConfig,
                  popularity_weights: Sequence[float] | None = None,
                  recent: RecentItems | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per variant, (N,) normalized ranks and (N,) HR@k hits of the events, batch by batch. Event i
    of a batch is ranked among the items met before it and its own (`catalog_sizes`), the user's
    recent items (`recent`) left out."""
    n_variants = 1 if popularity_weights is None else len(popularity_weights)
    ranks: list[list[np.ndarray]] = [[] for _ in range(n_variants)]
    hits: list[list[np.ndarray]] = [[] for _ in range(n_variants)]
    generator: torch.Generator | None = None
    progress = ProgressLog("eval_progress", total_events=len(events), model=model.name)
    for batch in iter_batches(events, eval_cfg.batch_size):
        progress.update(len(batch))
        sizes = catalog_sizes(catalog, batch.item)
        seen = None if recent is None else recent.before(batch, catalog)  # (B, n) before each event
        variants = _score_variants(model, batch, catalog, popularity_weights)
        first = next(variants)
        device = first.device
        target = torch.from_numpy(catalog.index(batch.item)).to(device)  # (B,)
        sizes_t = torch.from_numpy(sizes).to(device)
        excluded = None if seen is None else torch.from_numpy(seen).to(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(eval_cfg.seed)
        negatives = sample_negatives(target, first.shape[1], eval_cfg.num_negatives, generator, sizes_t, excluded)
        for n, scores in enumerate(itertools.chain([first], variants)):
            scores = scores if excluded is None else exclude_items(scores, excluded)
            ranks[n].append(normalized_rank(scores, target, sizes_t).cpu().numpy())
            hits[n].append(hit_rate_against(scores, target, negatives, eval_cfg.hr_k).cpu().numpy())
        release_freed_memory()  # a validation pass inside training runs on its fragmented heap: ~0.1-0.5 GB
    progress.finish()
    if not ranks[0]:
        return [np.zeros(0)] * n_variants, [np.zeros(0, dtype=bool)] * n_variants
    return ([np.concatenate(r).astype(np.float64) for r in ranks], [np.concatenate(h) for h in hits])


def _score_variants(model: OnlineModel, batch: EventBatch, catalog: ItemCatalog,
                    popularity_weights: Sequence[float] | None) -> Iterator[torch.Tensor]:
    """(B, C) scores of the batch, one per popularity weight (lazily: one (B, C) matrix at a time)."""
    if popularity_weights is None:
        yield model.score_batch(batch, catalog)
        return
    similarity, prior = model.score_parts(batch, catalog)  # type: ignore[attr-defined]
    for weight in popularity_weights:
        yield similarity if weight == 0 else similarity + weight * prior


class RecentItems:
    """Catalog positions of each user's last `length` interactions as the evaluator replays the
    events (the store's history rule: `HistoryBuffer.plan`), i.e. what the query API's
    `exclude_recent` leaves out of a user's recommendations, exact per event."""

    def __init__(self, length: int) -> None:
        self._users = IdMap()
        self._history = HistoryBuffer(length)

    def before(self, batch: EventBatch, catalog: ItemCatalog) -> np.ndarray:
        """(B, length) items of each event's user history just before the event (earlier events of
        the batch included; -1 padding), then the batch is added. Its items must be in `catalog`."""
        users = self._users.lookup(batch.user, create=True)
        self._history.ensure(len(self._users))
        plan = self._history.plan(users, catalog.index(batch.item))
        self._history.apply(plan)
        return plan.event_history


def exclude_items(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """scores (B, C) with -inf at each row's `excluded` (B, L) columns (-1 = none); a new tensor
    (the model's scores may be reused for the next popularity-weight variant)."""
    rows, cols = torch.nonzero(excluded >= 0, as_tuple=True)
    return scores.index_put((rows, excluded[rows, cols]), torch.tensor(float("-inf"), device=scores.device))


def catalog_sizes(catalog: ItemCatalog, items: np.ndarray) -> np.ndarray:
    """Add the batch's items to the catalog; (B,) catalog size each event is ranked in: the items
    met before the event plus the event's own item (an item first met later in the batch does not
    exist yet for an earlier event)."""
    before = len(catalog)
    catalog.add(items)
    index = catalog.index(items)
    return np.maximum.accumulate(np.maximum(index + 1, before)).astype(np.int64)


def item_prior_interactions(history: list[pa.Table], events: pa.Table) -> np.ndarray:
    """(N,) interactions of each event's item before it: in `history`, then earlier in `events`."""
    base: dict[str, int] = {}
    for table in history:
        counts = pc.value_counts(table.column("item"))
        for item, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            base[item] = base.get(item, 0) + n
    items = np.asarray(events.column("item").to_pylist(), dtype=object)
    if len(items) == 0:
        return np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(items, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # each item's events, in time order
    sorted_codes = inverse[order]
    starts = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    first = np.flatnonzero(starts)
    occurrence = np.empty(len(items), dtype=np.int64)
    occurrence[order] = np.arange(len(items)) - first[np.cumsum(starts) - 1]
    prior_base = np.fromiter((base.get(i, 0) for i in unique), dtype=np.int64, count=len(unique))
    return prior_base[inverse] + occurrence


def event_partitions(train: pa.Table, events: pa.Table, history: list[pa.Table]) -> np.ndarray:
    """Cold-start partition of each event relative to the training events (`label_partitions`),
    except that an item's very first interaction (none in `history` nor earlier in `events`) is
    "first_item": no model can serve an item before it exists."""
    labels = label_partitions(train, events).astype(object)
    labels[item_prior_interactions(history, events) == 0] = "first_item"
    return labels


def summarize(model: str, served: frozenset[str], events: pa.Table, hr_k: int, num_negatives: int,
              seconds: float = 0.0, protocol: str = "serve", exclude_recent: int = 0) -> dict[str, Any]:
    """Means and shares per partition and in total (over served partitions only)."""
    partition = np.asarray(events.column("partition").to_pylist(), dtype=object)
    rank = events.column("rank").to_numpy()
    hit = events.column("hit").to_numpy(zero_copy_only=False).astype(bool)
    n = len(partition)
    parts = {}
    for name in EVAL_PARTITIONS:
        mask = partition == name
        parts[name] = _cell(mask, rank, hit, n, name in served)
    # serve cannot rank an item before it exists: its first interaction is reported, not totalled
    in_total = served - ({"first_item"} if protocol == "serve" else set())
    served_mask = np.isin(partition, sorted(in_total))
    prior = events.column("item_prior_interactions").to_numpy()
    figure_mask = np.isin(partition, sorted(served))
    return {"model": model, "protocol": protocol, "exclude_recent": exclude_recent, "hr_k": hr_k,
            "num_negatives": num_negatives, "n_events": n,
            "served": sorted(served), "partitions": parts, "total": _cell(served_mask, rank, hit, n, True),
            "rank_by_prior": log_binned_means(prior[figure_mask], rank[figure_mask]),
            "seconds": round(seconds, 3)}


def _cell(mask: np.ndarray, rank: np.ndarray, hit: np.ndarray, n: int, served: bool) -> dict[str, Any]:
    count = int(mask.sum())
    ok = served and count > 0
    return {"count": count, "share": count / n if n else 0.0, "served": served,
            "rank": float(rank[mask].mean()) if ok else None, "hit_rate": float(hit[mask].mean()) if ok else None}


def log_binned_means(x: np.ndarray, y: np.ndarray) -> list[dict[str, Any]]:
    """Mean of y in bins of x: [0, 0], [1, 1], [2, 3], [4, 7], ... (powers of two); empty bins dropped."""
    x = np.asarray(x, dtype=np.int64)
    codes = np.where(x <= 0, 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) + 1)
    bins = []
    for code in np.unique(codes):
        lo, hi = (0, 0) if code == 0 else (2 ** (code - 1), 2 ** code - 1)
        mask = codes == code
        bins.append({"lo": int(lo), "hi": int(hi), "count": int(mask.sum()), "rank": float(np.mean(y[mask]))})
    return bins


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "model"
