"""The one place a device name from a config or an option becomes a torch.device; host memory handed back."""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Any

import torch

from felrec_stream.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is passed to torch.device.

    Asking for CUDA where torch sees none fails here, with one line, instead of as a torch
    traceback at the first tensor moved there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message for a malformed name is multi-line
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: fail later, obscurely
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but torch sees no MPS device")
    return device


_LIBC: Any = None  # glibc, once loaded (False where there is none)


def release_freed_memory() -> bool:
    """Hand the free pages of the C heap back to the OS (glibc's `malloc_trim(0)`; False, and
    nothing done, without glibc). Tensors freed by torch go back to glibc, which keeps most of them
    mapped: at paper size a training epoch's RSS crept from ~0.9 to ~1.6 GB with ~0.5 GB live
    (README "Memory at the paper's size"). Allocator bookkeeping only: no result depends on it."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            with contextlib.suppress(OSError):
                _LIBC = ctypes.CDLL("libc.so.6")
    return bool(_LIBC) and bool(_LIBC.malloc_trim(0))
