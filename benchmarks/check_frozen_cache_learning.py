"""Can the encoder learn when its cache holds still? (issue 17 diagnosis)

Builds the cache of `--preset small` with the initial weights over the first `--head` training
events (the learning control's replay), then freezes it. A copy of the encoder is trained as a user
(query) encoder on the next training events (full softmax over the cached item vectors, Adam), and
the validation events are ranked by cos(trained user encoding, cached item vector) — the prior off,
the user's last items excluded as the query API does. Printed: the rank of the initial weights,
then every 100 steps the rank with the items as cached (written by the initial weights) and with
the items re-encoded by the trained weights (what the trained model would serve: with `--shared`
one encoder for both kinds, else the items' own encoder, which the user loss leaves untouched).

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/check_frozen_cache_learning.py --path ../shared/data/ml-100k
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from connectors.datasets import load_dataset  # noqa: E402
from felrec_stream.config import Configs, preset_sections  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.state.engine import encode_sequences, event_sequences, prepare_batch, stored_sequences  # noqa: E402
from felrec_stream.state.store import Kind, RepresentationStore  # noqa: E402
from felrec_stream.stream.events import EventBatch  # noqa: E402
from training.train import seed_everything, train_epoch  # noqa: E402


class FrozenCache:
    """The cache after `head`, the exact histories of the later events, the cached item vectors."""

    def __init__(self, cfg: Configs, head: pa.Table, later: pa.Table) -> None:
        seed_everything(0)
        self.cfg, self.model = cfg, FELRec(cfg.encoder, cfg.model)
        self.store = RepresentationStore.for_cache(cfg.encoder.d_model, cfg.cache)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.training.lr)
        train_epoch(self.model, self.store, optimizer, head, cfg.training.batch_size, cfg.cache, frozen=True)
        self.inputs = prepare_batch(self.store, EventBatch.from_table(later), "cpu", cfg.cache, before=False)
        self.items = np.flatnonzero(self.store.items.history.counts[: len(self.store.items)] > 0)
        self.column = {int(s): i for i, s in enumerate(self.items)}
        self.cached = self.item_vectors(self.model)

    def item_vectors(self, encoder: FELRec) -> torch.Tensor:
        """(C, D) unit item vectors: as cached, or re-encoded by `encoder` from the stored histories."""
        if encoder is self.model:
            return F.normalize(self.store.items.vectors.get(torch.from_numpy(self.items)).float(), dim=1)
        seqs = stored_sequences(self.store, Kind.ITEM, self.items, "cpu", self.cfg.cache)
        encoder.eval()
        with torch.no_grad():
            return F.normalize(encode_sequences(encoder, seqs), dim=1)

    def users(self, encoder: FELRec, rows: np.ndarray) -> torch.Tensor:
        seqs, _ = event_sequences(self.store, self.inputs, rows, "cpu", self.cfg.cache)
        return F.normalize(encode_sequences(encoder, seqs), dim=1)

    def rank(self, encoder: FELRec, rows: np.ndarray, items: torch.Tensor) -> float:
        """Mean normalized rank (ties half) of each event's item among the cached items."""
        encoder.eval()
        ranks = []
        with torch.no_grad():
            for start in range(0, len(rows), 512):
                part = rows[start:start + 512]
                scores = self.users(encoder, part) @ items.T
                for k, e in enumerate(part):
                    ranks += self._rank_of(scores[k], e)
        return float(np.mean(ranks))

    def _rank_of(self, scores: torch.Tensor, e: int) -> list[float]:
        target = self.column.get(int(self.inputs.item_slots[e]))
        if target is None:
            return []
        seen = self.inputs.user_plan.event_history[e]
        excluded = [self.column[int(s)] for s in seen if self.column.get(int(s), target) != target]
        scores = scores.clone()
        scores[excluded] = -float("inf")
        v = scores[target]
        above, ties = float((scores > v).sum()), float((scores == v).sum()) - 1
        return [(above + 0.5 * ties) / (len(scores) - 1 - len(excluded))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--path", default="../shared/data/ml-100k")
    parser.add_argument("--head", type=int, default=75_000, help="training events replayed into the cache")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--shared", action="store_true", help="one encoder for users and items (the paper)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = preset_sections("small")
    sections["model"]["share_encoder"] = args.shared
    cfg = Configs.from_dict(sections)
    split = chronological_split(load_dataset(args.dataset, args.path), 0.1, 0.1)
    tail = split.train.slice(args.head)
    cache = FrozenCache(cfg, split.train.slice(0, args.head), pa.concat_tables([tail, split.val]))
    val_rows = np.arange(len(tail), len(tail) + len(split.val))
    train_rows = np.array([e for e in range(len(tail)) if int(cache.inputs.item_slots[e]) in cache.column])
    print(f"initial weights: validation rank {cache.rank(cache.model, val_rows, cache.cached):.4f} (prior off)")
    trained = copy.deepcopy(cache.model)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for step in range(1, args.steps + 1):
        trained.train()
        rows = np.sort(rng.choice(train_rows, 256, replace=False))
        target = torch.tensor([cache.column[int(cache.inputs.item_slots[e])] for e in rows])
        loss = F.cross_entropy(cache.users(trained, rows) @ cache.cached.T / args.temperature, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            as_cached = cache.rank(trained, val_rows, cache.cached)
            re_encoded = cache.rank(trained, val_rows, cache.item_vectors(trained))
            print(f"step {step}: loss {float(loss):.3f}, validation rank {as_cached:.4f} against the cached items, "
                  f"{re_encoded:.4f} with the items re-encoded by the trained weights")


if __name__ == "__main__":
    main()
