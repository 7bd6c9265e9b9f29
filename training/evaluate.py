"""The online evaluator: replay events in time order, score each against the catalog so far.

Protocol (paper section 4): the catalog holds every item seen so far (training items, then warm-up
items, then evaluation items as their batches arrive). For each micro-batch the model scores every
event's user against the whole catalog (`OnlineModel.score_batch`), and each event gets
- its normalized rank among all catalog items (0 best, ties half),
- a sampled HR@k hit (true item vs `num_negatives` random catalog items),
- its cold-start partition relative to the training events (`split.label_partitions`),
- the number of interactions its item had before it (training + warm-up + earlier events).
Partitions a model does not serve are reported as missing, never as numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from felrec_stream.config import EvalConfig
from felrec_stream.data.split import Split, label_partitions
from felrec_stream.log import get_logger
from felrec_stream.model.ranking import normalized_rank, sampled_hit_rate
from felrec_stream.stream.events import iter_batches
from training.protocol import PARTITIONS, ItemCatalog, OnlineModel

log = get_logger(__name__)

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

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: per-partition and total count/share/rank/hit_rate, rank vs item history."""
        return summarize(self.model, self.served, self.events, self.hr_k, self.num_negatives, self.seconds)

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
             warmup: pa.Table | None = None) -> EvalResult:
    """Replay `warmup` (unscored), then score every event of `events` in time order."""
    started = time.perf_counter()
    catalog = ItemCatalog()
    catalog.add(np.asarray(pc.unique(train.column("item")).to_pylist(), dtype=object))
    if warmup is not None and len(warmup):
        for batch in iter_batches(warmup, eval_cfg.batch_size):
            catalog.add(batch.item)
            model.score_batch(batch, catalog)  # updates the model's state; scores unused
    ranks, hits = _score_events(model, events, catalog, eval_cfg)
    history = [train] + ([warmup] if warmup is not None else [])
    table = pa.table({
        "event_id": events.column("event_id"), "user": events.column("user"), "item": events.column("item"),
        "partition": pa.array(label_partitions(train, events).tolist(), pa.string()),
        "rank": pa.array(ranks, pa.float64()), "hit": pa.array(hits, pa.bool_()),
        "item_prior_interactions": pa.array(item_prior_interactions(history, events), pa.int64()),
    }, schema=EVENT_RESULT_SCHEMA)
    result = EvalResult(model.name, frozenset(model.partitions), table, eval_cfg.hr_k, eval_cfg.num_negatives,
                        time.perf_counter() - started)
    total = result.summary()["total"]
    log.info("evaluation_done", model=model.name, events=len(events), rank=total["rank"],
             hit_rate=total["hit_rate"], seconds=round(result.seconds, 3))
    return result


def evaluate_and_report(models: list[OnlineModel], split: Split, eval_cfg: EvalConfig, title: str,
                        out_dir: str | Path | None = None, plot_title: str | None = None) -> str:
    """Evaluate every model on the test events (after replaying validation) and render Table 1.

    With `out_dir`: per-model JSON/Parquet, report.md and the rank-vs-prior plot (Figure 2).
    """
    from training.report import plot_rank_vs_prior, table1_markdown

    results = [evaluate(m, split.test, split.train, eval_cfg, warmup=split.val) for m in models]
    summaries = [r.summary() for r in results]
    report = table1_markdown(summaries, title=title)
    if out_dir is not None:
        out = Path(out_dir)
        for result in results:
            result.save(out)
        (out / "report.md").write_text(report)
        plot_rank_vs_prior(summaries, out / "rank_vs_prior.png", title=plot_title or title)
    return report


def _score_events(model: OnlineModel, events: pa.Table, catalog: ItemCatalog,
                  eval_cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(N,) normalized ranks and (N,) HR@k hits of the events, batch by batch."""
    ranks, hits = [], []
    generator: torch.Generator | None = None
    for batch in iter_batches(events, eval_cfg.batch_size):
        catalog.add(batch.item)
        scores = model.score_batch(batch, catalog)  # (B, C)
        target = torch.from_numpy(catalog.index(batch.item)).to(scores.device)  # (B,)
        if generator is None:
            generator = torch.Generator(device=scores.device).manual_seed(eval_cfg.seed)
        ranks.append(normalized_rank(scores, target).cpu().numpy())
        hits.append(sampled_hit_rate(scores, target, eval_cfg.num_negatives, eval_cfg.hr_k, generator).cpu().numpy())
    if not ranks:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(ranks).astype(np.float64), np.concatenate(hits)


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


def summarize(model: str, served: frozenset[str], events: pa.Table, hr_k: int, num_negatives: int,
              seconds: float = 0.0) -> dict[str, Any]:
    """Means and shares per partition and in total (over served partitions only)."""
    partition = np.asarray(events.column("partition").to_pylist(), dtype=object)
    rank = events.column("rank").to_numpy()
    hit = events.column("hit").to_numpy(zero_copy_only=False).astype(bool)
    n = len(partition)
    parts = {}
    for name in PARTITIONS:
        mask = partition == name
        parts[name] = _cell(mask, rank, hit, n, name in served)
    served_mask = np.isin(partition, sorted(served))
    prior = events.column("item_prior_interactions").to_numpy()
    return {"model": model, "hr_k": hr_k, "num_negatives": num_negatives, "n_events": n,
            "served": sorted(served), "partitions": parts, "total": _cell(served_mask, rank, hit, n, True),
            "rank_by_prior": log_binned_means(prior[served_mask], rank[served_mask]),
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
