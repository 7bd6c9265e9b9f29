"""Run a function on N gloo ranks in fresh processes, with the environment torchrun would give them.

`run_ranks(fn, n, tmp_path, *args)` spawns n processes; rank r calls `fn(ranks, *args)` with the
`felrec_stream.parallel.Ranks` that `parallel.init()` returns there, and its return value comes
back (pickled through a file) in rank order. fn must be a module-level function (spawn imports it).
A rank that raises fails the call with its traceback; ranks still running after `timeout_s` are
killed and the call fails: a hang is a test failure, never a stuck suite.

Processes start from a forkserver that imported torch and the project once (a fresh interpreter
per rank spends seconds importing torch on a loaded 2-core machine; forking a process that runs
nothing else is safe, unlike forking pytest with its threads).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from felrec_stream import parallel
from felrec_stream.config import ParallelConfig

mp.set_forkserver_preload(["torch", "felrec_stream.parallel", "training.train", "pipelines.worker",
                           "tests.distributed"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    """What torchrun sets for a rank on one machine."""
    return {"WORLD_SIZE": str(size), "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_ranks(fn: Callable[..., Any], size: int, tmp_path: Path, *args: Any, timeout_s: float = 120.0,
              collective_timeout_s: float = 60.0) -> list[Any]:
    out = Path(tmp_path) / f"ranks-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    context = mp.start_processes(_entry, args=(fn, size, free_port(), str(out), args, collective_timeout_s),
                                 nprocs=size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{size} ranks still running after {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(size)]


def _entry(rank: int, fn: Callable[..., Any], size: int, port: int, out: str, args: tuple,
           collective_timeout_s: float) -> None:
    os.environ.update(rank_env(rank, size, port))
    torch.set_num_threads(1)
    ranks = parallel.init(ParallelConfig(timeout_s=collective_timeout_s))
    result = fn(ranks, *args)
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    parallel.shutdown()
