"""Frozen, typed configs of the baselines; defaults follow the paper's appendix A.

Appendix A: embedding / latent size 128, SGD with momentum 0.9, dropout 0.1, input sequences of
up to 64 items, batch size 1024 (4096 for BPR-MF), BPR loss with 1-32 negatives (we use the top of
that range, 32, unless a config says otherwise). Learning rates and epochs are ours: the paper
tuned them per dataset on the validation split; `epochs` is a maximum, the checkpoint kept is the
one with the best validation rank.

`SIZES["small"]` shrinks every model (dims 32, few epochs) for CPU runs of the experiment harness
on ML-100K; `SIZES["tiny"]` is for tests and smoke runs; `SIZES["paper"]` are the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from felrec_stream.config import EncoderConfig, check
from felrec_stream.errors import ConfigError


@dataclass(frozen=True)
class BaselineConfig:
    """Optimisation settings shared by every baseline (one SGD step per batch)."""

    epochs: int = 50
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 1024
    num_negatives: int = 32  # BPR negatives per positive, drawn uniformly from the training items
    dropout: float = 0.1
    seed: int = 0
    eval_every: int = 1  # validate every n epochs (and after the last one)
    patience: int = 0  # stop after this many validations without improvement; 0 = never stop early
    max_grad_norm: float = 0.0  # clip the gradient norm of every step to this; 0 = no clipping
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def __post_init__(self) -> None:
        check(self.epochs >= 1 and self.batch_size >= 1, "baseline epochs and batch_size must be >= 1")
        check(1 <= self.num_negatives <= 4096, "baseline num_negatives must be in [1, 4096]")
        check(self.lr > 0 and 0 <= self.momentum < 1, "baseline lr must be > 0 and momentum in [0, 1)")
        check(0.0 <= self.dropout < 1.0, "baseline dropout must be in [0, 1)")
        check(self.eval_every >= 1 and self.patience >= 0, "baseline eval_every >= 1 and patience >= 0")
        check(self.max_grad_norm >= 0, "baseline max_grad_norm must be >= 0")


@dataclass(frozen=True)
class BPRMFConfig(BaselineConfig):
    """BPR-MF (Rendle et al.): x_ui = <p_u, q_i>, shuffled (u, i, j) triples."""

    dim: int = 128
    batch_size: int = 4096
    lr: float = 20.0  # the loss is a batch mean: a row's step is lr x its share of the batch

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.dim >= 1, "bpr-mf dim must be >= 1")


@dataclass(frozen=True)
class GRU4RecConfig(BaselineConfig):
    """GRU4Rec (Hidasi et al.): one-hot item input, stacked GRUs, per-user cached session states."""

    hidden: int = 128
    n_layers: int = 3
    lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.hidden >= 1 and self.n_layers >= 1, "gru4rec hidden and n_layers must be >= 1")


@dataclass(frozen=True)
class GRU4RecBPTTConfig(BaselineConfig):
    """GRU4Rec-BPTT: item embedding layer, BPTT over the last `max_len` items, tied prediction layer."""

    dim: int = 128
    n_layers: int = 1
    max_len: int = 64
    lr: float = 4.0
    max_grad_norm: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.dim >= 1 and self.n_layers >= 1 and self.max_len >= 1, "gru4rec-bptt dims must be >= 1")


@dataclass(frozen=True)
class SASRecConfig(BaselineConfig):
    """SASRec (Kang & McAuley) with FELRec's encoder blocks (same EncoderConfig), causal attention."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # its dropout is SASRec's dropout
    max_len: int = 64
    lr: float = 2.0
    max_grad_norm: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_len >= 1, "sasrec max_len must be >= 1")


@dataclass(frozen=True)
class JodieConfig(BaselineConfig):
    """JODIE* (Kumar et al., as modified by the FELRec paper): mutually recursive RNNs over dynamic
    user/item embeddings, learned static embeddings fed directly (no one-hot), no features, naive
    time-ordered batching; trained with BPR on -||i~ - [i_bar, i(t-)]||^2 plus JODIE's smoothness
    terms, and kept learning at test time."""

    dim: int = 128  # dynamic embedding size
    static_dim: int = 128
    bptt_batches: int = 4  # gradients flow through the dynamic state over this many batches
    lambda_u: float = 1.0  # JODIE's ||u(t) - u(t-)||^2 weight
    lambda_i: float = 1.0  # JODIE's ||i(t) - i(t-)||^2 weight
    test_time_lr: float = 0.0  # 0 = the training lr; SGD step of the test-time updates
    lr: float = 0.5
    max_grad_norm: float = 1.0  # the recursive state makes unclipped steps diverge at this lr

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.dim >= 1 and self.static_dim >= 1 and self.bptt_batches >= 1, "jodie dims must be >= 1")


@dataclass(frozen=True)
class CooccurrenceConfig:
    """The co-occurrence (item-kNN) baseline (training/baselines/cooccurrence.py): not learned, its
    settings are chosen on the validation split (training/experiment.py COOCCURRENCE_GRID)."""

    window: int = 3  # an item co-occurs with the `window` items before it in a user's sequence
    history: int = 16  # the user's last items that vote
    halflife: float = 0.0  # the vote of the p-th newest item is 0.5 ** (p / halflife); 0 = all equal
    prior_weight: float = 0.0  # + prior_weight * log(1 + recent popularity), FELRec's prior
    prior_halflife: float = 0.0  # events, as cache.popularity_halflife (0 = plain counts)
    # Up to this many items the counts are a dense float32 (items, items) matrix (20k: 1.6 GB);
    # above, one dict per row.
    max_dense_items: int = 20000

    def __post_init__(self) -> None:
        check(self.window >= 1 and self.history >= 1, "cooccurrence window and history must be >= 1")
        check(min(self.halflife, self.prior_weight, self.prior_halflife) >= 0,
              "cooccurrence halflife, prior_weight and prior_halflife must be >= 0")


CONFIG_CLASSES: dict[str, type[BaselineConfig]] = {
    "bpr-mf": BPRMFConfig,
    "gru4rec": GRU4RecConfig,
    "gru4rec-bptt": GRU4RecBPTTConfig,
    "sasrec": SASRecConfig,
    "jodie": JodieConfig,
}

_SMALL_ENCODER = EncoderConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, dropout=0.1)
_TINY_ENCODER = EncoderConfig(d_model=16, n_layers=3, n_heads=2, d_ff=32, dropout=0.1)

# Per-size overrides of the defaults ("paper" = the defaults themselves).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {name: {} for name in CONFIG_CLASSES},
    "small": {
        "bpr-mf": {"dim": 32, "epochs": 30, "eval_every": 3},
        "gru4rec": {"hidden": 32, "epochs": 6, "eval_every": 2},
        "gru4rec-bptt": {"dim": 32, "epochs": 10, "eval_every": 2},
        "sasrec": {"encoder": _SMALL_ENCODER, "epochs": 10, "eval_every": 2},
        "jodie": {"dim": 32, "static_dim": 32, "epochs": 10, "eval_every": 2},
    },
    "tiny": {
        "bpr-mf": {"dim": 16, "epochs": 10, "batch_size": 512, "eval_every": 5},
        "gru4rec": {"hidden": 16, "n_layers": 2, "epochs": 2, "batch_size": 256},
        "gru4rec-bptt": {"dim": 16, "max_len": 16, "epochs": 3, "batch_size": 256},
        "sasrec": {"encoder": _TINY_ENCODER, "max_len": 16, "epochs": 3, "batch_size": 256},
        "jodie": {"dim": 16, "static_dim": 16, "epochs": 3, "batch_size": 256},
    },
}


def make_config(name: str, size: str = "paper", **overrides: Any) -> BaselineConfig:
    """Config of baseline `name` at preset `size`, with field overrides."""
    if name not in CONFIG_CLASSES:
        raise ConfigError(f"unknown baseline {name!r}; known: {', '.join(CONFIG_CLASSES)}")
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    cls = CONFIG_CLASSES[name]
    values = {**SIZES[size][name], **overrides}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {name} option(s): {', '.join(unknown)}")
    return cls(**values)


def config_to_dict(config: BaselineConfig) -> dict[str, Any]:
    """JSON-ready dict (the nested EncoderConfig of SASRec becomes a dict)."""
    return dataclasses.asdict(config)


def config_from_dict(name: str, values: Mapping[str, Any]) -> BaselineConfig:
    values = dict(values)
    if "encoder" in values and isinstance(values["encoder"], Mapping):
        values["encoder"] = EncoderConfig(**values["encoder"])
    return make_config(name, "paper", **values)
