"""The trained encoder as the worker runs it: weights, configs, the version recorded in snapshots.

One `load_model` for the worker, its followers (pipelines/replicas.py) and the online learner's
published versions (pipelines/versions.py); the checkpoint -> model step itself is
`felrec_stream.state.checkpoint.model_from`, shared with the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from felrec_stream.config import CacheConfig, Configs, replace
from felrec_stream.device import resolve_device
from felrec_stream.errors import ConfigError
from felrec_stream.model.felrec import FELRec
from felrec_stream.parallel import Ranks
from felrec_stream.state.checkpoint import load_checkpoint, model_from
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.spill import SPILL_DIR
from felrec_stream.state.store import RepresentationStore
from felrec_stream.state.versions import VersionStore, model_version


@dataclass(frozen=True)
class ModelBundle:
    """The trained encoder (eval mode) plus the configs and version the worker records in snapshots."""

    model: FELRec
    cache: CacheConfig  # as run: the checkpoint's, with the worker's shards/index_type overrides
    configs: Configs  # as saved in the checkpoint
    version: str
    path: str

    @property
    def dim(self) -> int:
        return self.model.encoder_config.d_model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """Load a trained FELRec checkpoint for inference (eval mode: no dropout, BatchNorm frozen)."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    model = model_from(checkpoint, device, path)
    configs = checkpoint.configs
    return ModelBundle(model, configs.cache, configs, model_version(checkpoint.model_state, configs), str(path))


def model_and_store(checkpoint: str | Path, *, shards: int | None = None, index_type: str | None = None,
                    max_entities: int | None = None, spill_dir: Path | None = None,
                    device: str = "auto", ranks: Ranks | None = None) -> tuple[ModelBundle, RepresentationStore]:
    """The trained encoder (with the worker's shards/index_type/max_entities overrides) and an empty
    FAISS store (a capped one spills into `spill_dir`; None: a temporary folder)."""
    torch_device = resolve_device(device)
    if ranks is not None:
        torch_device = ranks.place(torch_device)
    bundle = load_model(checkpoint, torch_device)
    overrides = {k: v for k, v in (("shards", shards), ("index_type", index_type), ("max_entities", max_entities))
                 if v is not None}
    cache = replace(bundle.cache, **overrides)
    if ranks is not None and cache.max_entities:
        # Followers restore rank 0's state and apply its batches; a spill would have to be shared too.
        raise ConfigError("cache.max_entities (a spilling store) is not supported with data-parallel ranks yet")
    bundle = ModelBundle(bundle.model, cache, bundle.configs, bundle.version, bundle.path)
    return bundle, make_store(bundle.dim, cache, torch_device, spill_dir=spill_dir)


def spill_dir_for(snapshot_dir: str | Path | None) -> Path | None:
    """Where a capped store spills: next to the snapshots that refer to its files (None: a temp dir)."""
    return None if snapshot_dir is None else Path(snapshot_dir) / SPILL_DIR


def bundle_from_version(versions: VersionStore, name: str, running: ModelBundle) -> ModelBundle:
    """A published version as the worker runs it: its weights and configs, on the running model's
    device, with the running cache settings (shards, index, cap: the store does not change)."""
    checkpoint = versions.checkpoint(name)
    device = next(running.model.parameters()).device
    model = model_from(checkpoint, device, versions.weights_path(name))
    return ModelBundle(model, running.cache, checkpoint.configs, model_version(checkpoint.model_state,
                                                                               checkpoint.configs),
                       str(versions.weights_path(name)))
