"""Nested state <-> flat arrays + a JSON spec: the format snapshots store a state in (no pickle).

`flatten_state` splits dicts of numpy arrays, tensors, str lists and JSON scalars into arrays keyed
by path plus a JSON-able spec; `unflatten_state` rebuilds the state exactly from both.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from felrec_stream.errors import StoreError


def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a nested state (dicts, numpy arrays, tensors, str lists, JSON scalars) into
    (arrays keyed by path, JSON-able spec) so `unflatten_state` rebuilds it exactly.

    Why not pickle: snapshots outlive code versions and are read after crashes; .npy + JSON are
    inspectable and cannot execute code. String lists (entity ids) become UTF-8 bytes + offsets
    arrays (compact, no per-id JSON overhead). Tuples come back as lists.
    """
    arrays: dict[str, np.ndarray] = {}
    spec = _flatten(state, "", arrays)
    return arrays, spec


def unflatten_state(arrays: Mapping[str, np.ndarray], spec: Any) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(spec, list):
        return [unflatten_state(arrays, item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if "__array__" in spec:
        return arrays[spec["__array__"]]
    if "__tensor__" in spec:
        return torch.from_numpy(np.array(arrays[spec["__tensor__"]]))
    if "__strings__" in spec:
        strings = _decode_strings(arrays, spec["__strings__"])
        return np.asarray(strings, dtype=object) if spec.get("as") == "ndarray" else strings
    return {key: unflatten_state(arrays, value) for key, value in spec.items()}


def _flatten(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, Mapping):
        return {key: _flatten(item, _child(path, key), arrays) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        arrays[path] = value.detach().cpu().numpy()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return _encode_strings(value.tolist(), path, arrays, "ndarray")
        arrays[path] = value
        return {"__array__": path}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, str) for item in value):
            return _encode_strings(list(value), path, arrays, "list")
        return [_flatten(item, f"{path}/{n}", arrays) for n, item in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StoreError(f"cannot snapshot {type(value).__name__} at {path or '<root>'}")


def _child(path: str, key: Any) -> str:
    if not isinstance(key, str) or "/" in key or key.startswith("__"):
        raise StoreError(f"state keys must be str without '/' or leading '__', got {key!r} under {path or '<root>'}")
    return f"{path}/{key}" if path else key


def _encode_strings(strings: list[Any], path: str, arrays: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
    if not all(isinstance(s, str) for s in strings):
        raise StoreError(f"object array at {path} must hold only str")
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    arrays[f"{path}#utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    arrays[f"{path}#offsets"] = offsets
    return {"__strings__": path, "as": kind}


def _decode_strings(arrays: Mapping[str, np.ndarray], path: str) -> list[str]:
    data = arrays[f"{path}#utf8"].tobytes()
    offsets = arrays[f"{path}#offsets"].tolist()
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
