"""The one place a device name from a config or an option becomes a torch.device, and what a
device can compute in: bf16 units (`bf16_units`, `check_precision`) and the `autocast` of
`training.precision`; host memory handed back (`release_freed_memory`)."""

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


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the CPU's bf16 matmul units


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_units() -> str | None:
    """'AMX', 'AMX + AVX512-BF16' or 'AVX512-BF16' where the CPU has bf16 matmul units, else None
    (read from the flags, never assumed: without them torch emulates bf16, ~20x slower than fp32)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX" + (" + AVX512-BF16" if "avx512_bf16" in flags else "")
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse `training.precision=bf16` where the device has no bf16 matmul units (one line)."""
    if precision != "bf16":
        return
    if device.type == "cpu" and bf16_units() is None:
        raise ConfigError("training.precision=bf16 needs a CPU with bf16 matmul units (AVX512-BF16 or AMX); "
                          "this CPU has neither: use fp32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.precision=bf16 needs bf16 support, which {device} lacks: use fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16: torch.autocast to bfloat16 on `device`'s type (matmuls in bf16, weights stay fp32);
    fp32: nothing at all (the default path is unchanged, bit for bit)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
