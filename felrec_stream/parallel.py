"""Data-parallel FELRec on torch.distributed: every rank holds a replica of the model and the cache.

Launch any of `felrec-stream train|evaluate|consume` under torchrun (`torchrun --standalone
--nproc-per-node N --no-python felrec-stream train ...`) or with `felrec-stream --nproc N ...`,
which runs torchrun for you. `init()` reads torchrun's environment; one process (no torchrun, or
N = 1) gets None and runs the single-process code unchanged, bit for bit.

Why N ranks end where one process with the same global batch ends (within float rounding), and
why the replicas stay identical:

- Same micro-batches in the same order on every rank: rank 0 loads the events (a file or a whole
  topic) and broadcasts the table (`from_leader`); the streaming worker's rank 0 reads Kafka and
  sends every batch it applies (pipelines/replicas.py). One read means one content, even of a topic
  that is still being written, and follow-mode batch cuts that depend on timing are rank 0's alone.
- Per batch every rank registers the new ids and plans the histories of the whole batch (cheap,
  numpy), but gathers and encodes only its contiguous slice of the rows (`span`). The slices'
  outputs are all-gathered in rank order, which is row order (`gather_rows`), so every replica
  commits the whole batch: the caches stay bit-identical across ranks by construction.
- The loss is a mean over events, so each rank's slice contributes its per-event sum / B and the
  gradients are *summed* over ranks (`sum_gradients`, one flat all_reduce): the full-batch
  gradient. Explicit rather than DDP: the model is driven through `encode_kind`/`loss`, not
  `forward` (DDP only hooks forward), the parameters a slice uses vary (the learned empty-history
  input: DDP would need find_unused_parameters), and one coalesced all_reduce after backward is
  all DDP's bucketing would buy for models this size.
- BatchNorm in training uses the statistics of the whole batch: `sync_batch_norms` swaps every
  BatchNorm1d (the encoder's per-kind output norms, the heads' norms) for `SyncedBatchNorm`, whose
  row count, sum and sum of squares are all-reduced (differentiably: the gradient reaches every
  rank's rows). torch's SyncBatchNorm runs on GPUs only.
- FELRec-Q's queue receives the keys of every rank in event order (`loss(gather_keys=...)`), as
  MoCo gathers its keys.
- Dropout: rank 0 draws from the single-process seed, rank r from seed + r * 2**32 (`seed`), so N = 1
  under the launcher is the single process; with dropout > 0, N ranks draw other (equally valid)
  masks than one process and only agree with it in distribution.

Tolerance (measured in tests/felrec_stream/test_parallel.py and tests/training/test_train_distributed.py):
kernels on a slice round differently from the full batch (padding trimmed per slice, BatchNorm
moments in float64, partial gradient sums), about 1e-6 relative per step; two runs with the same N
are bit-identical on CPU (gloo reduces in a fixed order).

Failure: a collective that fails (a rank died: its connections close at once) or waits longer than
`ParallelConfig.timeout_s` (a rank hangs) raises `ParallelError`; the CLI exits non-zero and
torchrun stops the other ranks. Only rank 0 writes checkpoints, reports, snapshots and offsets.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import structlog
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from felrec_stream.config import ParallelConfig
from felrec_stream.errors import ConfigError, FelrecError, ParallelError
from felrec_stream.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")
SEED_STRIDE = 2**32  # rank r's dropout seed: the single-process seed + r * SEED_STRIDE


class Ranks:
    """The ranks of a data-parallel job, as one of them sees it. Every method is a collective
    (all ranks call it, in the same order) except `span`, `leader`, `seed` and `place`."""

    def __init__(self, rank: int, size: int, local_rank: int, timeout_s: float,
                 group: Any = None, control: Any = None) -> None:
        self.rank, self.size, self.local_rank, self.timeout_s = rank, size, local_rank, timeout_s
        self.group = group  # tensors (gloo, or NCCL for CUDA tensors)
        self.control = control  # pickled objects, always gloo (CPU)

    @property
    def leader(self) -> bool:
        """Rank 0: reads the input, writes checkpoints, reports, snapshots, offsets."""
        return self.rank == 0

    def span(self, n: int, rank: int | None = None) -> slice:
        """This rank's (or `rank`'s) contiguous share of n rows: [n*r//size, n*(r+1)//size)."""
        r = self.rank if rank is None else rank
        return slice(n * r // self.size, n * (r + 1) // self.size)

    def seed(self, base: int) -> int:
        """The RNG seed of this rank for a single-process seed `base` (rank 0: base itself)."""
        return base + self.rank * SEED_STRIDE

    def place(self, device: torch.device) -> torch.device:
        """A CUDA device means this rank's own GPU (LOCAL_RANK), as torchrun lays them out."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    # ---- tensors --------------------------------------------------------------------------------

    def gather_rows(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """(n, ...) every rank's `span(n)` rows, in row order (detached); `rows` = this rank's."""
        if n == 0:  # every rank knows: no collective
            return rows.detach()
        most = -(-n // self.size)
        padded = rows.new_zeros((most,) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows.detach()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with self._collective("all_gather"):
            dist.all_gather(parts, padded, group=self.group)
        spans = [self.span(n, r) for r in range(self.size)]
        return torch.cat([part[: s.stop - s.start] for part, s in zip(parts, spans)])

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sum every gradient over the ranks (one all_reduce of a flat buffer). A parameter that no
        rank used keeps grad None, as in one process, so the optimizer leaves it and its momentum."""
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        used = [p.grad is not None for p in params]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor(used, dtype=params[0].dtype, device=params[0].device)])
        with self._collective("all_reduce"):
            dist.all_reduce(flat, group=self.group)
        flags, offset = flat[-len(params):].tolist(), 0
        for p, flag in zip(params, flags):
            p.grad = flat[offset: offset + p.numel()].view_as(p) if flag > 0 else None
            offset += p.numel()

    def sum(self, value: float) -> float:
        """The sum of a float over the ranks (float64)."""
        t = torch.tensor([value], dtype=torch.float64)
        with self._collective("all_reduce"):
            dist.all_reduce(t, group=self.control)
        return float(t[0])

    def moments(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Row count, mean (D,) and biased variance (D,) of the rows x (n, D) of every rank together.
        Differentiable: the gradient flows back to each rank's own rows. Float64 sums, so the
        E[x^2] - E[x]^2 form loses nothing to a large shared mean (the direction BatchNorm removes)."""
        x64 = x.to(torch.float64)
        local = torch.cat([x64.new_full((1,), float(x.shape[0])), x64.sum(0), (x64 * x64).sum(0)])
        total = _SumOverRanks.apply(local, self)
        D, n = x.shape[1], int(total[0].item())
        mean = total[1: D + 1] / max(n, 1)
        var = (total[D + 1:] / max(n, 1) - mean * mean).clamp(min=0)
        return n, mean.to(x.dtype), var.to(x.dtype)

    def replicate(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (a seeded init is already equal;
        this makes it so whatever the device or library)."""
        with self._collective("broadcast"), torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0, group=self.group)

    # ---- objects (pickled, over gloo) -----------------------------------------------------------

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        box = [obj if self.leader else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def exchange(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        with self._collective("all_gather"):
            dist.all_gather_object(out, obj, group=self.control)
        return out

    def from_leader(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 only (reading a file or a topic), its result on every rank. A
        FelrecError it raises is raised on every rank, so all stop with the same one-line error."""
        result: Any = None
        error: FelrecError | None = None
        if self.leader:
            try:
                result = make()
            except FelrecError as exc:
                error = exc
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def agree(self, state: Any, what: str) -> None:
        """Raise ParallelError on every rank unless every rank's `state` has the same `digest`."""
        digests = self.exchange(digest(state))
        if len(set(digests)) > 1:
            log.error("replicas_diverged", what=what, digests=digests)
            raise ParallelError(f"the ranks' {what} differ (digests {', '.join(d[:12] for d in digests)}): "
                                "the replicas diverged")

    @contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # gloo/NCCL: peer closed the connection, or the timeout passed
            raise ParallelError(f"rank {self.rank} of {self.size}: {name} failed (another rank stopped, or "
                                f"hangs past parallel.timeout_s={self.timeout_s:g} s): {_first_line(exc)}") from None


class Leader:
    """Rank 0's side of a leader/follower protocol (the streaming worker's, pipelines/replicas.py, and
    the learner's, training/learn_ranks.py): one message to every rank per turn; a follower's reply
    is None or its stop request, which stops rank 0 gracefully."""

    def __init__(self, ranks: Ranks, request_stop: Callable[[str], None]) -> None:
        self.ranks, self.request_stop = ranks, request_stop

    def send(self, kind: str, payload: Any = None) -> None:
        replies = self.ranks.exchange((kind, payload))
        asked = [reply for reply in replies[1:] if reply]
        if asked and kind != "stop":
            log.info("peer_stop_requested", reason=asked[0])
            self.request_stop(f"peer_{asked[0]}")

    def check(self, store_state: dict[str, Any]) -> None:
        """Before a snapshot: every rank's store must equal rank 0's (raises ParallelError)."""
        self.send("check")
        self.ranks.agree(store_state, "stores")


class FollowerBase:
    """A rank > 0's side of `Leader`'s protocol: `follow` hands each of rank 0's messages to
    `_handle` until rank 0 says ("stop", reason); a stop this rank is asked for (a signal) travels
    back to rank 0 with its next reply, and rank 0 stops everyone. Subclasses: the streaming
    worker's `pipelines.replicas.Follower`, the learner's `training.learn_ranks.LearnFollower`."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._asked: str | None = None

    @property
    def stopping(self) -> bool:
        return self._asked is not None

    def request_stop(self, reason: str = "signal") -> None:
        """Passed on to rank 0 with the next reply (safe in a signal handler)."""
        if self._asked is None:
            self._asked = reason

    def follow(self) -> str:
        """Rank 0's messages to `_handle` until its stop; returns rank 0's reason."""
        while True:
            kind, payload = self.ranks.exchange(self._asked)[0]
            if kind == "stop":
                return str(payload)
            self._handle(kind, payload)

    def _handle(self, kind: str, payload: Any) -> None:
        raise NotImplementedError


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: the sum feeds every rank's loss, so each rank's input
    gradient is the sum of all ranks' output gradients (another all_reduce, in backward)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, ranks: Ranks) -> torch.Tensor:  # type: ignore[override]
        ctx.ranks = ranks
        total = local.clone()
        with ranks._collective("all_reduce"):
            dist.all_reduce(total, group=ranks.group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        with ctx.ranks._collective("all_reduce"):
            dist.all_reduce(grad, group=ctx.ranks.group)
        return grad, None


class SyncedBatchNorm(nn.BatchNorm1d):
    """A BatchNorm1d (or the encoder's KindNorm) that, in training, normalises with the statistics
    of every rank's rows together, exactly as the single process does with the whole batch. It
    shares the original's parameters and buffers, so state dicts and checkpoints are unchanged;
    in eval it is the original (running statistics)."""

    def __init__(self, norm: nn.BatchNorm1d, ranks: Ranks) -> None:
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        self.weight, self.bias = norm.weight, norm.bias
        self.running_mean, self.running_var = norm.running_mean, norm.running_var
        self.num_batches_tracked = norm.num_batches_tracked
        self._local_forward = type(norm).forward
        # RunningNorm: normalise with the running statistics from before the batch, then update them
        self._lagged = getattr(norm, "lagged", False)
        if hasattr(norm, "running_cov"):
            raise ConfigError("encoder.output_norm=whiten is not supported with data-parallel ranks (its "
                              "covariance is not synchronised); use running")
        self.adapting = False
        # KindNorm counts nothing (functional batch_norm); nn.BatchNorm1d counts batches
        self._counts_batches = type(norm).forward is nn.BatchNorm1d.forward
        self._ranks = ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not (self._lagged and self.adapting):
            return self._local_forward(self, x)
        if self._lagged:
            # copies: the update below must not change what backward reads
            y = F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), None, None, False, 0.0, self.eps)
        n, mean, var = self._ranks.moments(x)
        if self._lagged:
            if n >= 2:
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                    self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            return y
        if n < 2:  # KindNorm's rule for fewer than two rows in the whole batch: running statistics
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                if self._counts_batches:
                    self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y if self.weight is None else y * self.weight + self.bias


def sync_batch_norms(module: nn.Module, ranks: Ranks) -> int:
    """Swap every BatchNorm1d under `module` for a SyncedBatchNorm (in place); returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, SyncedBatchNorm):
            continue
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, SyncedBatchNorm(child, ranks))
            count += 1
        else:
            count += sync_batch_norms(child, ranks)
    return count


def digest(state: Any) -> str:
    """sha256 of a nested state (dicts, lists, tensors, arrays, scalars, strings): replica checks."""
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                sha.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif isinstance(value, torch.Tensor):
            feed(value.detach().cpu().numpy())
        elif isinstance(value, np.ndarray) and value.dtype != object:
            sha.update(f"{value.dtype}{value.shape}".encode())
            sha.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, np.ndarray):
            feed(value.tolist())
        else:
            sha.update(repr(value).encode())

    feed(state)
    return sha.hexdigest()


# ---- the job's process group ------------------------------------------------------------------

def init(config: ParallelConfig | None = None) -> Ranks | None:
    """Join the job torchrun started (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); None when
    this is the only process (no torchrun, or WORLD_SIZE 1): the single-process code then runs."""
    config = config or ParallelConfig()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = config.backend
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if backend == "nccl" and not cuda:
        raise ParallelError("parallel.backend nccl needs CUDA and a torch with NCCL; use gloo")
    if cuda and backend != "gloo":
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (objects, CPU runs) over gloo, CUDA ones over NCCL
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=config.timeout_s)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timeout)  # env:// from torchrun
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    except (RuntimeError, ValueError) as exc:
        raise ParallelError(f"rank {rank} of {size} could not join the job: {_first_line(exc)}") from None
    atexit.register(shutdown)
    # every log line says which rank wrote it; dist_rank, because `rank` is an evaluation metric's field
    structlog.contextvars.bind_contextvars(dist_rank=rank)
    log.info("ranks_joined", world_size=size, backend=backend, timeout_s=config.timeout_s)
    return Ranks(rank, size, local_rank, config.timeout_s, dist.group.WORLD, control)


def shutdown() -> None:
    """Leave the process group (at exit; harmless when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]
