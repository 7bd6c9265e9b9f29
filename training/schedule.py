"""The per-epoch cosine LR schedule with linear warm-up (training only; checkpoints carry its state)."""

from __future__ import annotations

import math
from typing import Any

import torch


class CosineWarmupSchedule:
    """Per-epoch LR: linear warm-up over `warmup_epochs`, then cosine from `base_lr` to `min_lr`.

    Epoch e (0-based) trains with lr_at(e): (e + 1) / warmup * base_lr during warm-up, then
    min_lr + (base_lr - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float,
                 warmup_epochs: int, epochs: int) -> None:
        self.optimizer = optimizer
        self.base_lr, self.min_lr = base_lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.epoch = 0  # the epoch whose LR is set next

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.base_lr * (epoch + 1) / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def start_epoch(self, epoch: int) -> float:
        """Set the optimizer's LR for `epoch` and return it."""
        self.epoch = epoch
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "min_lr": self.min_lr, "warmup_epochs": self.warmup_epochs,
                "epochs": self.epochs, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
