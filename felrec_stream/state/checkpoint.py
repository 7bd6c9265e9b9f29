"""Training checkpoints (atomic, versioned); the LR schedule they save lives in training/schedule.py.

A checkpoint is one `torch.save` file holding plain data only (tensors, numbers, strings, lists,
dicts), so it loads with `weights_only=True` (no pickled code). Numpy arrays (the optional store
state) travel as tensors and come back as numpy arrays. Configs are saved as plain dicts
(`Configs.to_dict`) and rebuilt with `Configs.from_dict`, which rejects unknown fields.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from felrec_stream.config import Configs
from felrec_stream.errors import ModelError
from felrec_stream.model.felrec import FELRec

FORMAT_VERSION = 2
# Version 1 (nn.TransformerEncoder layers; type embedding and output norm rows keyed by the kind of
# the sequence *elements*) loads through `migrate_model_state`; the outputs are the same.
_V1_RENAMES = (("self_attn.in_proj_weight", "qkv.weight"), ("self_attn.in_proj_bias", "qkv.bias"),
               ("self_attn.out_proj.", "proj."), ("linear1.", "ff1."), ("linear2.", "ff2."))


@dataclass
class Checkpoint:
    """Everything needed to resume training or to evaluate a trained FELRec."""

    model_state: dict[str, torch.Tensor]
    configs: Configs
    epoch: int  # epochs completed
    best_val_rank: float = math.inf
    best_epoch: int = -1
    optimizer_state: dict[str, Any] | None = None
    schedule_state: dict[str, Any] | None = None
    spread_history: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # one `epoch_done` record per epoch
    store_state: dict[str, Any] | None = None  # the cache after the epoch's training pass ("keep")
    # training.ema_decay > 0: the trained (online) weights, to resume; model_state holds their moving
    # average, which wrote the cache and is what is served.
    online_state: dict[str, torch.Tensor] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def variant(self) -> str:
        return self.configs.model.variant

    def to_payload(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_state": self.model_state,
            "configs": self.configs.to_dict(),
            "variant": self.variant,
            "epoch": self.epoch,
            "best_val_rank": float(self.best_val_rank),
            "best_epoch": self.best_epoch,
            "optimizer_state": self.optimizer_state,
            "schedule_state": self.schedule_state,
            "spread_history": [float(s) for s in self.spread_history],
            "history": list(self.history),
            "store_state": _numpy_to_torch(self.store_state),
            "online_state": self.online_state,
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(checkpoint.to_payload(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign files
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise ModelError(f"{path} is not a felrec-stream checkpoint")
    if payload["format_version"] not in (1, FORMAT_VERSION):
        raise ModelError(f"checkpoint {path} has format version {payload['format_version']}, "
                         f"this felrec-stream reads versions 1 and {FORMAT_VERSION}")
    return Checkpoint(
        model_state=migrate_model_state(payload["model_state"], payload["format_version"]),
        configs=Configs.from_dict(payload["configs"]), epoch=int(payload["epoch"]),
        best_val_rank=float(payload["best_val_rank"]), best_epoch=int(payload["best_epoch"]),
        optimizer_state=payload["optimizer_state"], schedule_state=payload["schedule_state"],
        spread_history=list(payload["spread_history"]), history=list(payload["history"]),
        store_state=_torch_to_numpy(payload["store_state"]),
        online_state=payload.get("online_state"),
    )


def model_from(checkpoint: Checkpoint, device: torch.device | str = "cpu", source: str | Path = "") -> FELRec:
    """The one way a checkpoint becomes a model: its configs build it, its weights load (a mismatch
    is a one-line ModelError), eval mode (no dropout, BatchNorm frozen), no gradients, on `device`."""
    model = FELRec(checkpoint.configs.encoder, checkpoint.configs.model)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {source} does not match its own configs: {exc}") from exc
    return model.eval().requires_grad_(False).to(device)


def migrate_model_state(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint of `version` as this version's FELRec names it."""
    if version == FORMAT_VERSION:
        return state
    out = {}
    for name, tensor in state.items():
        name = name.replace("encoder.transformer.layers.", "encoder.blocks.")
        for old, new in _V1_RENAMES:
            name = name.replace(old, new)
        out[name] = tensor
    if "encoder.type_embedding.weight" in out:  # rows were the elements' kind, now the encoded entity's
        out["encoder.type_embedding.weight"] = out["encoder.type_embedding.weight"].flip(0)
    for suffix in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = f"encoder.output_norm.0.{suffix}", f"encoder.output_norm.1.{suffix}"
        if a in out:
            out[a], out[b] = out[b], out[a]
    return out


def _numpy_to_torch(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_numpy_to_torch(v) for v in obj]
    return obj


def _torch_to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu().numpy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_torch_to_numpy(v) for v in obj]
    return obj
