"""Data-parallel training and evaluation on 2 gloo ranks equal one process with the same global batch.

One spawn of 2 ranks runs every scenario (tests/distributed.py); the single-process references run
here. Tolerances: a slice is encoded with its own padding and batch size, BatchNorm moments are
summed in float64 and gradients in two partial sums, so floats round differently, ~1e-6 per step;
dropout is 0 (with dropout N ranks draw other masks than one process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from felrec_stream.config import (CacheConfig, Configs, EncoderConfig, EvalConfig, ModelConfig, ScoringConfig,
                                  TrainingConfig, replace)
from felrec_stream.data import synthetic
from felrec_stream.data.split import chronological_split
from felrec_stream.errors import ParallelError
from felrec_stream.model.felrec import FELRec
from felrec_stream.parallel import Ranks, sync_batch_norms
from felrec_stream.state.checkpoint import load_checkpoint
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import iter_batches
from tests.distributed import run_ranks
from training.evaluate import evaluate
from training.felrec_online import build_felrec
from training.train import train, train_step

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
CACHE = CacheConfig(history_len=8)
EVAL = EvalConfig(batch_size=64, num_negatives=20)
TRAINING = TrainingConfig(epochs=2, warmup_epochs=0, batch_size=64, device="cpu")
SETUPS = {  # the serve recipe; the paper's Q (MLP heads with BatchNorm, learned empty-history input); P
    "serve": Configs(replace(ENC, output_norm="batch"),
                     ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event"),
                     TRAINING, EVAL, CACHE, ScoringConfig(calibrate_popularity=True)),
    "paper_q": Configs(replace(ENC, empty_history="learned"), ModelConfig(queue_size=64), TRAINING, EVAL, CACHE),
    "p": Configs(replace(ENC, output_norm="batch"), ModelConfig(variant="p", proj_hidden=32, proj_out=16),
                 TRAINING, EVAL, CACHE),
    # the serve recipe after issue 17: running output statistics, one encoder per kind, masked queue
    "serve_running": Configs(replace(ENC, output_norm="running"),
                             ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update="post_event",
                                         mask_own_negatives=True, share_encoder=False),
                             TRAINING, EVAL, CACHE, ScoringConfig(calibrate_popularity=True)),
}
STEPS = 4
pytestmark = pytest.mark.slow  # ~30 s on 2 loaded cores (one spawn of 2 ranks); CI runs it


def _events():
    config = synthetic.SyntheticConfig(n_users=40, n_items=30, n_events=600, n_clusters=4, seed=1)
    return synthetic.generate(config).events


def _steps(configs: Configs, ranks: Ranks | None) -> dict:
    """STEPS SGD steps (momentum) from the same seeded model: losses, weights, buffers, cache."""
    torch.manual_seed(0)
    model = FELRec(configs.encoder, configs.model)
    if ranks is not None:
        ranks.replicate(model)
        sync_batch_norms(model, ranks)
    store = RepresentationStore.for_cache(configs.encoder.d_model, configs.cache)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = iter_batches(_events().slice(0, STEPS * 64), 64)
    losses = [train_step(model, store, optimizer, batch, configs.cache, ranks=ranks) for batch in batches]
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "users": store.users.vectors.all().clone(), "items": store.items.vectors.all().clone()}


def _train(configs: Configs, out: Path, ranks: Ranks | None, resume_after: int | None = None) -> dict:
    if resume_after is not None:
        train(_events(), replace(configs, training=replace(configs.training, epochs=resume_after)), out, ranks=ranks)
    result = train(_events(), configs, out, resume=resume_after is not None, ranks=ranks)
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    timeless = [{k: v for k, v in record.items() if k not in ("seconds", "events_per_s")} for record in result.history]
    return {"history": timeless, "files": files}


def _evaluate(checkpoint: Path, ranks: Ranks | None) -> np.ndarray:
    split = chronological_split(_events(), 0.1, 0.1)
    online = build_felrec(load_checkpoint(checkpoint), "keep", ranks=ranks)
    return evaluate(online, split.test, split.train, EVAL, warmup=split.val).events.column("rank").to_numpy()


def _scenarios(ranks: Ranks, tmp: str) -> dict:
    out: dict = {"steps": {name: _steps(configs, ranks) for name, configs in SETUPS.items()}}
    runs = {name: Path(tmp, name, f"rank{ranks.rank}") for name in ("a", "resumed")}
    try:  # diverged replicas stop training on every rank alike: the step tests above still report
        out["a"] = _train(SETUPS["serve"], runs["a"], ranks)
        out["resumed"] = _train(SETUPS["serve"], runs["resumed"], ranks, resume_after=1)  # a second run, in two
        ranks.exchange(None)  # rank 0's checkpoint is written before anyone reads it
        out["checkpoint"] = load_checkpoint(Path(tmp, "a", "rank0", "last.pt"))
        out["eval_ranks"] = _evaluate(Path(tmp, "a", "rank0", "best.pt"), ranks)
        out["eval_ranks_again"] = _evaluate(Path(tmp, "a", "rank0", "best.pt"), ranks)
    except ParallelError as exc:
        out["error"] = str(exc)
    return out


def _completed(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist_train")
    return run_ranks(_scenarios, 2, tmp, str(tmp), timeout_s=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single_train") / "a"
    result = _train(SETUPS["serve"], out, None)
    return {**result, "checkpoint": load_checkpoint(out / "last.pt"), "eval_ranks": _evaluate(out / "best.pt", None)}


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_training_steps_on_two_ranks_equal_one_process(ranks_results, name):
    """Losses, weights (gradients summed over the slices), BatchNorm running statistics and batch
    counts, FELRec-Q's queue (every rank's keys, in event order) and the cache after 4 steps."""
    expected = _steps(SETUPS[name], None)
    for got in (r["steps"][name] for r in ranks_results):
        np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
        assert got["state"].keys() == expected["state"].keys()
        for key, value in expected["state"].items():
            if value.dtype == torch.long:  # batch counters, the queue pointer
                assert torch.equal(got["state"][key], value), key
            else:
                torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        for kind in ("users", "items"):
            torch.testing.assert_close(got[kind], expected[kind], rtol=1e-4, atol=1e-5)


def test_training_on_two_ranks_equals_one_process(ranks_results, single):
    """Two epochs of the serve recipe (popularity prior calibrated on validation): per-epoch loss,
    validation rank and spread, the saved weights and cache."""
    rank0 = _completed(ranks_results)[0]
    for got, expected in zip(rank0["a"]["history"], single["history"], strict=True):
        assert got["popularity_weight"] == expected["popularity_weight"]
        for key in ("loss", "val_rank", "val_hit_rate", "spread"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    a, b = rank0["checkpoint"], single["checkpoint"]
    assert a.configs == b.configs
    for key in b.model_state:
        torch.testing.assert_close(a.model_state[key].float(), b.model_state[key].float(), rtol=1e-4, atol=1e-5)
    for kind in ("users", "items"):
        np.testing.assert_allclose(a.store_state[kind]["vectors"]["vectors"], b.store_state[kind]["vectors"]["vectors"],
                                   rtol=0, atol=1e-4)


def test_two_runs_on_two_ranks_are_bit_identical_and_resume_exactly(ranks_results):
    """The second run stops after epoch 1 and resumes from rank 0's checkpoint: bit-identical."""
    for r in _completed(ranks_results):
        assert r["a"]["history"] == r["resumed"]["history"]
    assert ranks_results[0]["a"]["history"] == ranks_results[1]["a"]["history"]  # the replicas agree


def test_only_rank_0_writes_checkpoints(ranks_results):
    _completed(ranks_results)
    assert ranks_results[0]["a"]["files"] == ["best.pt", "last.pt"]
    assert ranks_results[1]["a"]["files"] == []


def test_evaluation_on_two_ranks_equals_one_process_and_repeats_bit_for_bit(ranks_results, single):
    for r in _completed(ranks_results):
        np.testing.assert_allclose(r["eval_ranks"], single["eval_ranks"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(r["eval_ranks_again"], r["eval_ranks"])
    np.testing.assert_array_equal(ranks_results[0]["eval_ranks"], ranks_results[1]["eval_ranks"])
