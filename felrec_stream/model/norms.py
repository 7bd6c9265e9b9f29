"""The encoder's output norms (`encoder.output_norm`), one per kind: `batch`, `running`, `whiten`.

`KindNorm` (batch) standardises with the batch's statistics in training and the running ones in
serving; `RunningNorm` (running) and `RunningWhitening` (whiten) use the running, lagged statistics
in both, so the cache holds what serving would compute. `adapting_norms` lets them follow a replay
that rebuilds a cache from empty. Pure modules, like the rest of felrec_stream/model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class KindNorm(nn.BatchNorm1d):
    """The output standardisation of one kind: no affine parameters; batch statistics in training when
    the batch has >= 2 rows, the running ones otherwise (and in eval); no rows, nothing to do.
    (felrec_stream.parallel swaps in a norm with the statistics of every rank's rows.)"""

    def __init__(self, D: int) -> None:
        super().__init__(D, affine=False, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        return F.batch_norm(x, self.running_mean, self.running_var, training=self.training and x.shape[0] >= 2,
                            momentum=self.momentum, eps=self.eps)


class RunningNorm(KindNorm):
    """The output standardisation with running statistics in training as in serving: a row is
    normalised with the statistics gathered *before* its batch, then the batch updates them. The
    encoder is the same function at training and serving time (a training-cache vector equals a
    serve-time re-encoding of its history, up to dropout), and a batch of few distinct entities
    (time-ordered streams: a handful of users per batch) no longer rescales its own rows."""

    lagged = True  # felrec_stream.parallel: normalise with the statistics before the batch

    def __init__(self, D: int) -> None:
        super().__init__(D)
        self.momentum = 0.05
        # Update the statistics in eval mode too: a replay that rebuilds a cache from empty must
        # follow the vectors it writes (fixed statistics let the recursion collapse).
        self.adapting = False

    def updates(self, x: torch.Tensor) -> bool:
        """Whether `x` moves the statistics: in training or adapting, from two rows on."""
        return (self.training or self.adapting) and x.shape[0] >= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        update = self.updates(x)
        mean, var = self.running_mean, self.running_var
        if update:  # copies: the update below must not change what backward reads
            mean, var = mean.clone(), var.clone()
        y = F.batch_norm(x, mean, var, training=False, eps=self.eps)
        if update:
            with torch.no_grad():  # updates the running statistics in place; the result is unused
                F.batch_norm(x.detach(), self.running_mean, self.running_var, training=True,
                             momentum=self.momentum, eps=self.eps)
        return y


class RunningWhitening(RunningNorm):
    """RunningNorm that also decorrelates the dimensions: x -> (x - mean) @ cov^(-1/2), both running
    (lagged, as RunningNorm). The encoder reads its own outputs back from the cache, so a learned
    linear map is applied over and over: without decorrelation its leading directions take over
    the cache (dimensional collapse), which per-dimension scaling does not undo."""

    def __init__(self, D: int) -> None:
        super().__init__(D)
        self.register_buffer("running_cov", torch.eye(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        evals, evecs = torch.linalg.eigh(self.running_cov.double())
        # directions the outputs hardly use are not blown up: eigenvalues floored relative to the largest
        floor = max(self.eps, 1e-3 * float(evals.max()))
        W = (evecs * evals.clamp(min=floor).rsqrt()) @ evecs.T  # (D, D) cov^(-1/2)
        y = (x - self.running_mean) @ W.to(x.dtype)
        if self.updates(x):
            with torch.no_grad():
                xd = x.detach()
                mean = xd.mean(dim=0)
                cov = torch.cov(xd.T).reshape(self.running_cov.shape)
                self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
                self.running_cov.mul_(1 - self.momentum).add_(cov, alpha=self.momentum)
                self.running_var.copy_(torch.diagonal(self.running_cov))
        return y


@contextlib.contextmanager
def adapting_norms(module: nn.Module) -> Iterator[None]:
    """Within the block every RunningNorm under `module` (or its data-parallel stand-in) updates its
    statistics in eval mode too."""
    norms = [m for m in module.modules() if hasattr(m, "adapting")]
    for norm in norms:
        norm.adapting = True
    try:
        yield
    finally:
        for norm in norms:
            norm.adapting = False
