"""The machine's measured matmul peak and the encoder's achieved FLOP rate, shared by the benchmarks
(bench_train_eval.py, bench_worker.py, bench_distributed.py; imported as a sibling module).

- `measure_peak(threads, device)`: a (2048 x 2048) @ (2048 x 2048) fp32 matmul, `repeats` times
  after one warm-up, with `threads` torch threads, in this process: the best repetition's GFLOP/s
  per wall-second and per CPU-second of the process (on the CPU). bf16 as well where the CPU has
  AVX512-BF16 or AMX (`felrec_stream.device.bf16_units`: /proc/cpuinfo's flags, never assumed),
  reported as such. On CUDA: per wall-second only (the GPU's time is not CPU time), fp32 with TF32
  as torch has it set.
- `EncoderFlops`: records every length bucket the FELRec encoder computes while it is active (it
  wraps `felrec.length_buckets`, which `Encoder.forward` calls once per forward), with whether
  autograd was recording: such a forward is counted with its backward (3 x forward,
  `felrec_stream.model.flops`). Also the positions computed and the valid ones (padding share).
  Model FLOPs: buckets that `ActivationBudget` re-encodes for backward are counted once.
- `rate_line(...)`: one printed line, achieved next to the peak, and the share.

Ratios to the peak measured in the same run, not absolute times, are the figures to track on a
shared machine; per CPU-second is the robust one (the wall time includes waiting for a core).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from felrec_stream.config import EncoderConfig
from felrec_stream.device import bf16_units
from felrec_stream.model import felrec
from felrec_stream.model.flops import encoder_flops

MATMUL_SIZE = 2048


@dataclass(frozen=True)
class Peak:
    """Best-repetition matmul rate (GFLOP/s); per_cpu is None on a GPU."""

    dtype: str
    threads: int
    per_wall: float
    per_cpu: float | None
    note: str = ""

    def describe(self) -> str:
        cpu = "" if self.per_cpu is None else f"{self.per_cpu:,.1f} GFLOP/s per CPU-s, "
        return (f"measured {self.dtype} peak ({MATMUL_SIZE}x{MATMUL_SIZE} matmul, {self.threads} thread(s)"
                f"{', ' + self.note if self.note else ''}): {cpu}{self.per_wall:,.1f} per wall-s")


def _matmul_peak(dtype: torch.dtype, threads: int, device: torch.device, repeats: int) -> tuple[float, float | None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = MATMUL_SIZE
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        flops = 2 * n ** 3
        torch.matmul(a, b)  # warm-up: kernels chosen, pages touched
        _sync(device)
        wall, cpu = [], []
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            torch.matmul(a, b)
            _sync(device)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        per_cpu = None if device.type != "cpu" else flops / max(min(cpu), 1e-9) / 1e9
        return flops / min(wall) / 1e9, per_cpu
    finally:
        torch.set_num_threads(previous)


def measure_peak(threads: int | None = None, device: torch.device | str = "cpu", repeats: int = 8) -> list[Peak]:
    """fp32 peak, then bf16 where the device has bf16 matmul units (CPU: AVX512-BF16 or AMX)."""
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    peaks = [Peak("fp32", threads, *_matmul_peak(torch.float32, threads, device, repeats))]
    units = "CUDA" if device.type == "cuda" else bf16_units()
    if units is not None:
        peaks.append(Peak("bf16", threads, *_matmul_peak(torch.bfloat16, threads, device, repeats), note=units))
    return peaks


def best(*runs: list[Peak]) -> list[Peak]:
    """Per dtype, the higher of several measurements, per wall-second and per CPU-second each (the
    machine's load moves during a run)."""
    out: dict[str, Peak] = {}
    for peak in (p for run in runs for p in run):
        old = out.setdefault(peak.dtype, peak)
        cpus = [c for c in (old.per_cpu, peak.per_cpu) if c is not None]
        out[peak.dtype] = replace(old, per_wall=max(old.per_wall, peak.per_wall), per_cpu=max(cpus) if cpus else None)
    return list(out.values())


def fp32(peaks: list[Peak]) -> Peak:
    return next(p for p in peaks if p.dtype == "fp32")


@dataclass
class EncoderFlops:
    """Context manager: the encoder's FLOPs (forward, + backward where autograd records) and its
    computed and valid positions, over every forward while active."""

    config: EncoderConfig
    flops: int = 0
    computed: int = 0
    valid: int = 0
    buckets: list[tuple[int, int, bool]] = field(default_factory=list)  # (rows, length, with backward)

    def __enter__(self) -> EncoderFlops:
        self._inner = felrec.length_buckets

        def recording(lengths: torch.Tensor, *args: Any, **kwargs: Any) -> list[felrec.Bucket]:
            out = self._inner(lengths, *args, **kwargs)
            grad = torch.is_grad_enabled()
            for bucket in out:
                rows = len(lengths) if bucket.rows is None else len(bucket.rows)
                self.buckets.append((rows, bucket.length, grad))
                self.flops += (3 if grad else 1) * encoder_flops(self.config, rows, bucket.length)
                self.computed += rows * bucket.length
            self.valid += int(lengths.sum())
            return out

        felrec.length_buckets = recording
        return self

    def __exit__(self, *exc: object) -> None:
        felrec.length_buckets = self._inner

    @property
    def padding(self) -> float:
        """Share of the encoded positions that are padding."""
        return 1 - self.valid / self.computed if self.computed else 0.0


def rate_line(label: str, flops: float, wall_s: float, cpu_s: float | None, peak: Peak) -> str:
    """'<label>: X GFLOP/s per CPU-s, Y per wall-s (encoder, N GFLOP); measured fp32 peak P / Q: p% / q%'."""
    wall = flops / wall_s / 1e9
    if cpu_s is None or peak.per_cpu is None:
        return (f"{label}: {wall:,.2f} GFLOP/s per wall-s (encoder, {flops / 1e9:,.1f} GFLOP); measured "
                f"{peak.dtype} peak {peak.per_wall:,.1f} per wall-s: {wall / peak.per_wall:.1%} of it")
    cpu = flops / cpu_s / 1e9
    return (f"{label}: {cpu:,.2f} GFLOP/s per CPU-s, {wall:,.2f} per wall-s (encoder, {flops / 1e9:,.1f} GFLOP); "
            f"measured {peak.dtype} peak {peak.per_cpu:,.1f} / {peak.per_wall:,.1f}: "
            f"{cpu / peak.per_cpu:.1%} per CPU-s, {wall / peak.per_wall:.1%} per wall-s")


def share(flops: float, seconds: float, peak_rate: float | None) -> float:
    """Achieved rate over seconds as a share of a peak rate (GFLOP/s); nan without a peak."""
    return float("nan") if not peak_rate or seconds <= 0 else flops / seconds / 1e9 / peak_rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":  # the peak alone: python benchmarks/flop_rate.py [threads [device]]
    import sys

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = int(sys.argv[1]) if len(sys.argv) > 1 and int(sys.argv[1]) > 0 else None
    for p in measure_peak(threads, sys.argv[2] if len(sys.argv) > 2 else "cpu"):
        print(f"{sys.argv[2] if len(sys.argv) > 2 else 'cpu'}: {p.describe()}")
