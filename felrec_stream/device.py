"""The one place a device name from a config or an option becomes a torch.device, and the allocator
settings of the process (`tune_allocator`)."""

from __future__ import annotations

import ctypes
import platform

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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Largest request glibc still serves from its heaps (its limit: half of a 64 MiB heap); the most
# free memory kept at the heap's top instead of being returned to the kernel.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def tune_allocator() -> bool:
    """Let glibc keep and reuse the large tensor buffers of training and evaluation.

    By default glibc serves requests over 128 KiB-32 MiB (an adaptive threshold) with a fresh mmap
    and returns the memory on free, so every large temporary of every step is page-faulted in and
    zeroed by the kernel again: half of a CPU training step was system time. Fixed thresholds keep
    requests up to 32 MiB on the heap and freed memory there for the next step. Process-wide; called
    by the CLI at start. Returns False where the C library is not glibc (nothing changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except OSError:
        return False
