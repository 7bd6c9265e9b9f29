"""Training and serving encode with the same function? (issue 17, item 3)

Trains `--preset small` (with overrides) on the training events of a dataset for one epoch, then,
for the touched users and items of every `--every`-th training batch of a second pass, compares the
vector training writes to the cache (train mode: dropout, the output norm's training rule) with the
serve-time encoding of the very same inputs (eval mode), and prints the mean cosine per kind.
"running" is the same function in both modes but for dropout, so its figure is what dropout alone
costs; "batch" (the old default) adds the batch statistics of ~7 users. Target: >= 0.95 for users and items.

Run: OMP_WAIT_POLICY=PASSIVE python benchmarks/check_train_serve_norm.py --dataset ml-100k \
    --path ../shared/data/ml-100k [--norms batch,running]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from connectors.datasets import load_dataset  # noqa: E402
from felrec_stream.config import Configs, merge_sections, preset_sections  # noqa: E402
from felrec_stream.data.split import chronological_split  # noqa: E402
from felrec_stream.model.felrec import FELRec  # noqa: E402
from felrec_stream.state.engine import encode_after, prepare_batch, with_after  # noqa: E402
from felrec_stream.state.store import RepresentationStore  # noqa: E402
from felrec_stream.stream.events import iter_batches  # noqa: E402
from training.train import seed_everything, train_epoch, train_window  # noqa: E402


def cosines(norm: str, events, args) -> dict[str, float]:
    """Mean cosine between the train-mode and eval-mode encodings of the same after-batch inputs."""
    cfg = Configs.from_dict(merge_sections(preset_sections("small"), {"encoder": {"output_norm": norm}}))
    seed_everything(0)
    model = FELRec(cfg.encoder, cfg.model)
    store = RepresentationStore.for_cache(cfg.encoder.d_model, cfg.cache)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.training.lr, momentum=cfg.training.momentum)
    B = cfg.training.batch_size
    train_epoch(model, store, optimizer, events, B, cfg.cache)
    store.reset()
    found: dict[str, list[float]] = {"users": [], "items": []}
    for n, batch in enumerate(iter_batches(events, B)):
        if n % args.every == 0:
            inputs = with_after(store, prepare_batch(store, batch, "cpu", cfg.cache, before=False), "cpu", cfg.cache)
            state = torch.get_rng_state()
            model.train()
            with torch.no_grad():
                written = encode_after(model, inputs)  # what training writes (updates running statistics)
            model.eval()
            with torch.no_grad():
                served = encode_after(model, inputs)
            torch.set_rng_state(state)
            for name, a, b in (("users", written[0], served[0]), ("items", written[1], served[1])):
                found[name] += F.cosine_similarity(a, b, dim=1).tolist()
        train_window(model, store, optimizer, batch, B, cfg.cache, np.random.default_rng(n))
    return {name: float(np.mean(v)) for name, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--path", default="../shared/data/ml-100k")
    parser.add_argument("--norms", default="batch,running")
    parser.add_argument("--every", type=int, default=10, help="compare every N-th batch of the second pass")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    events = chronological_split(load_dataset(args.dataset, args.path), 0.1, 0.1).train
    for norm in args.norms.split(","):
        c = cosines(norm, events, args)
        print(f"encoder.output_norm={norm}: cosine(training-cache vector, serve-time encoding of the same inputs) "
              f"users {c['users']:.3f}, items {c['items']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
