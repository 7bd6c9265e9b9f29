"""Prototype of the next step for issue 17: a query encoder trained beside the cache loop.

The cache loop of `--preset small` runs with its initial weights (the learning control's replay:
`training.frozen`), and a copy of its user encoder — the query encoder — is trained online on every
training batch: the encoding of each event's user history (before the event) against the cached
vectors of every item met so far (full softmax, temperature T, Adam), the event's item the positive.
After each epoch both are scored on the validation split exactly as `train` validates (serve
protocol, already-seen items excluded, the prior's weight chosen on validation): the control
serving users by their cached vectors, the prototype serving them by the query encoder
(`FELRecOnline(query_model=...)`). Evaluator only: the worker and the query API do not serve it.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/check_query_encoder.py --path ../shared/data/ml-100k
     (amazon-magazine: --dataset csv --path .../Magazine_Subscriptions.csv --dataset-option header=false
      --dataset-option user=1 --dataset-option item=0 --dataset-option timestamp=3)
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from connectors.datasets import load_dataset  # noqa: E402
from felrec_stream.config import Configs, preset_sections, replace  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.state.engine import encode_sequences, prepare_batch  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import EventBatch, iter_batches  # noqa: E402
from training.evaluate import evaluate_variants  # noqa: E402
from training.felrec_online import FELRecOnline  # noqa: E402
from training.train import POPULARITY_WEIGHTS, choose_popularity_halflife, seed_everything, train_window  # noqa: E402


def query_step(query: FELRec, optimizer: torch.optim.Optimizer, store: RepresentationStore, batch: EventBatch,
               cfg: Configs, T: float) -> float | None:
    """One Adam step of the query encoder on a batch, against the cache as it is before the batch."""
    items = np.flatnonzero(store.items.history.counts[: len(store.items)] > 0)
    inputs = prepare_batch(store, batch, "cpu", cfg.cache)
    known = store.items.history.counts[inputs.item_slots] > 0  # events whose item has a cached vector
    if known.sum() < 2:
        return None
    column = {int(s): i for i, s in enumerate(items)}
    keys = F.normalize(store.items.vectors.get(torch.from_numpy(items)).float(), dim=1)  # (C, D)
    query.train()
    q = F.normalize(encode_sequences(query, inputs.users_before), dim=1)[torch.from_numpy(known)]  # (b, D)
    target = torch.tensor([column[int(s)] for s in inputs.item_slots[known]])
    loss = F.cross_entropy(q @ keys.T / T, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def best_rank(online: FELRecOnline, split, cfg: Configs) -> tuple[float, float]:
    """(validation rank, chosen prior weight), as `train` validates."""
    results = evaluate_variants(online, split.val, split.train, cfg.eval, popularity_weights=POPULARITY_WEIGHTS,
                                exclude_recent=cfg.excluded_recent)
    best = int(np.argmin([r.mean_rank for r in results]))
    return results[best].mean_rank, POPULARITY_WEIGHTS[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--path", default="../shared/data/ml-100k")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="loader option, as `experiment --dataset-option`")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Configs.from_dict(preset_sections("small"))
    options = dict(option.split("=", 1) for option in args.dataset_option)
    split = chronological_split(load_dataset(args.dataset, args.path, **options), 0.1, 0.1)
    halflife = choose_popularity_halflife(split.train, split.val, cfg.eval, cfg.excluded_recent)
    cfg = replace(cfg, cache=replace(cfg.cache, popularity_halflife=halflife))
    seed_everything(0)
    writer = FELRec(cfg.encoder, cfg.model)
    query = copy.deepcopy(writer)
    optimizer = torch.optim.Adam(query.parameters(), lr=args.lr)
    frozen = torch.optim.SGD(writer.parameters(), lr=cfg.training.lr)  # never steps (frozen=True)
    for epoch in range(1, args.epochs + 1):
        store = RepresentationStore.for_cache(cfg.encoder.d_model, cfg.cache)
        writer.train()
        losses = []
        for batch in iter_batches(split.train, cfg.training.batch_size):
            loss = query_step(query, optimizer, store, batch, cfg, args.temperature)
            losses += [] if loss is None else [loss]
            train_window(writer, store, frozen, batch, cfg.training.batch_size, cfg.cache, frozen=True)
        state = store.state_dict()
        ranks = {}
        for name, query_model in (("query encoder", query), ("control", None)):
            replica = RepresentationStore.for_cache(cfg.encoder.d_model, cfg.cache)
            replica.load_state_dict(state)
            ranks[name] = best_rank(FELRecOnline(writer, replica, cfg.cache, scoring=cfg.scoring,
                                                 query_model=query_model), split, cfg)
        print(f"epoch {epoch}: query loss {np.mean(losses):.3f}; validation rank with the query encoder "
              f"{ranks['query encoder'][0]:.4f} (w {ranks['query encoder'][1]:g}), control (initial weights, cached "
              f"user vectors) {ranks['control'][0]:.4f} (w {ranks['control'][1]:g})", flush=True)


if __name__ == "__main__":
    main()
