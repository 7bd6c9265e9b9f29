"""Shared helpers for the streaming-worker tests: a tiny checkpoint, a replayed stream, offline replays."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from felrec_stream.config import CacheConfig, Configs, EncoderConfig, ModelConfig, replace
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.checkpoint import Checkpoint, save_checkpoint
from felrec_stream.state.engine import infer_batch
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import iter_batches
from tests.waiting import wait_for

TINY_ENCODER = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
TINY_CACHE = CacheConfig(history_len=8)


def write_tiny_checkpoint(path: Path, seed: int = 0, cache_update: str = "pre_event") -> Path:
    """A randomly initialised FELRec checkpoint (no training: equality tests need no quality)."""
    torch.manual_seed(seed)
    model_config = ModelConfig(queue_size=32, cache_update=cache_update)
    model = FELRec(TINY_ENCODER, model_config)
    for parameter in model.encoder.parameters():  # move off the near-identity init: a real function
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    configs = Configs(encoder=TINY_ENCODER, model=model_config, cache=TINY_CACHE)
    return save_checkpoint(Checkpoint(model.state_dict(), configs, epoch=0), path)


def synthetic_events(n_events: int, n_users: int = 60, n_items: int = 40, seed: int = 0) -> pa.Table:
    config = SyntheticConfig(n_users=n_users, n_items=n_items, n_events=n_events, n_clusters=4, seed=seed)
    return generate(config).events


def offline_replay(model: FELRec, table: pa.Table, batch_size: int, cache: CacheConfig,
                   store: RepresentationStore | None = None) -> RepresentationStore:
    """engine.infer_batch over the table in order, `batch_size` events per batch (the reference)."""
    store = store if store is not None else make_store(model.encoder_config.d_model, cache)
    for batch in iter_batches(table, batch_size):
        infer_batch(model, store, batch, cache)
    return store


def assert_same_store(actual: dict[str, Any], expected: dict[str, Any], atol: float = 0.0) -> None:
    """Field-by-field equality of two `store_fingerprint`s (ids, vectors, histories, counts)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], list):
            assert actual[key] == expected[key], key
        elif atol:
            np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=atol, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_histories_match_table(fingerprint: dict[str, Any], table: pa.Table, history_len: int) -> None:
    """Every event applied exactly once: counts and last-L histories recomputed from the table."""
    users, items = table.column("user").to_pylist(), table.column("item").to_pylist()
    for kind, keys, others in (("user", users, items), ("item", items, users)):
        ids = fingerprint[f"{kind}_ids"]
        other_ids = fingerprint[f"{'item' if kind == 'user' else 'user'}_ids"]
        seen: dict[str, list[str]] = {}
        for key, other in zip(keys, others):
            seen.setdefault(key, []).append(other)
        assert sorted(ids) == sorted(seen), f"{kind} ids differ"
        counts, rows, lengths = (fingerprint[f"{kind}_{k}"] for k in ("counts", "rows", "lengths"))
        for slot, external in enumerate(ids):
            expected = seen[external][-history_len:]
            assert counts[slot] == len(seen[external]), f"{kind} {external}: count {counts[slot]}"
            got = [other_ids[s] for s in rows[slot][history_len - lengths[slot]:]]
            assert got == expected, f"{kind} {external}: history differs"


def cache_with(shards: int = 1, index_type: str = "flat") -> CacheConfig:
    return replace(TINY_CACHE, shards=shards, index_type=index_type)


def stop_with_sigterm(proc: subprocess.Popen) -> dict[str, Any]:
    """SIGTERM a `felrec-stream consume` process; it must exit 0 with its JSON summary on stdout."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


def run_until_applied(worker: Any, n_events: int, timeout_s: float = 60) -> tuple[threading.Thread, list]:
    """Start `worker.run()` in a thread (follow mode) and wait until it applied `n_events`;
    returns the thread and the list its result lands in (stop it with `worker.request_stop`)."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(worker.run()))
    thread.start()
    wait_for(lambda: worker.progress.applied >= n_events or not thread.is_alive(), timeout_s,
             f"the worker applied {n_events} events (or stopped)")
    return thread, results
