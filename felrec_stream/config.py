"""Frozen, typed configs: one per subsystem, saved inside every checkpoint and snapshot.

Defaults are the paper's hyper-parameters. A config file (YAML or JSON) holds one section per
subsystem (`encoder:`, `model:`, `training:`, `eval:`, `cache:`, `kafka:`, `worker:`); environment variables
override single fields: `FELREC_<SECTION>__<FIELD>=value`, e.g. `FELREC_TRAINING__EPOCHS=5`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from felrec_stream.errors import ConfigError

C = TypeVar("C")

# How an evaluation starts (training/felrec_online.py): "keep" continues from the training cache;
# "reset" keeps the weights with an empty cache; "zero-shot" is reset with weights trained on
# another dataset. The one list of modes: EvalConfig, the CLI's --mode and build_felrec read it.
EvalMode = Literal["keep", "reset", "zero-shot"]
EVAL_MODES: tuple[str, ...] = typing.get_args(EvalMode)
EvalProtocol = Literal["serve", "paper"]
EVAL_PROTOCOLS: tuple[str, ...] = typing.get_args(EvalProtocol)


@dataclass(frozen=True)
class EncoderConfig:
    """The shared Transformer encoder (paper section 3 / appendix A)."""

    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    type_embedding: bool = True  # ablation "-noType" sets False
    # Not in the paper. "batch": standardise the encoder outputs with BatchNorm statistics kept per
    # kind (users, items). The cache -> encoder -> cache recursion averages vectors over and over
    # (power iteration): without it every vector drifts to one shared direction; see model/felrec.py.
    # "running": the same standardisation with running statistics in training as in serving (a
    # time-ordered batch holds few distinct users, whose batch statistics misrepresent everyone).
    # "whiten": "running" that also decorrelates the dimensions (running covariance).
    output_norm: Literal["none", "batch", "running", "whiten"] = "none"
    # Recency inside the encoder: "reversed_sinusoidal" adds sinusoidal positions counted from the
    # newest element (position 0 = the latest interaction), as the reference implementation does.
    positions: Literal["none", "reversed_sinusoidal"] = "none"
    # Recency in the pooling: the final outputs are averaged with weights 0.5 ** (age / pool_halflife),
    # age 0 = the newest history element; 0 = the plain mean.
    pool_halflife: float = 0.0
    norm_first: bool = True  # pre-norm blocks (False: post-norm, as the reference)
    activation: Literal["gelu", "relu"] = "gelu"
    # Input of a history with no element (an entity's very first query encoding): "cold_start" =
    # the cache's cold_start_input (id seed or zero); "learned" = one learned vector per kind.
    empty_history: Literal["cold_start", "learned"] = "cold_start"

    def __post_init__(self) -> None:
        check(self.output_norm in ("none", "batch", "running", "whiten"),
              "encoder.output_norm must be none, batch, running or whiten")
        check(self.pool_halflife >= 0, "encoder.pool_halflife must be >= 0 (0 = plain mean)")
        check(self.d_model > 0 and self.d_model % self.n_heads == 0,
              "encoder.d_model must be a positive multiple of n_heads")
        check(self.n_layers >= 1 and self.d_ff >= 1, "encoder.n_layers and d_ff must be >= 1")
        check(0.0 <= self.dropout < 1.0, "encoder.dropout must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """FELRec-Q (MoCo-style queue + InfoNCE) or FELRec-P (BYOL-style predictor), with ablations."""

    variant: Literal["q", "p"] = "q"
    queue_size: int = 8192  # K, FELRec-Q
    temperature: float = 0.07  # T, FELRec-Q
    norm: Literal["batch", "layer"] = "batch"  # ablation "-LN" uses layer norm in the MLPs
    use_mlp: bool = True  # ablation "-noMLP": losses act on the encoder outputs directly
    share_mlp: bool = False  # ablation "-shareMLP": users and items share their MLPs
    proj_hidden: int = 256  # FELRec-P bottleneck projection 128 -> 256 -> 64
    proj_out: int = 64
    # What the cache holds after an event: "pre_event" = the paper's recursion (the encoding from the
    # history *before* the event); "post_event" = the encoding from the history *including* the event
    # (what a deployed system should serve after the event).
    cache_update: Literal["pre_event", "post_event"] = "pre_event"
    # FELRec-Q: a queued key of an event that shares the row's user or item is no negative of it
    # (the queue remembers each key's event). False: every queued key is a negative (the paper).
    mask_own_negatives: bool = False
    # FELRec-Q's negatives: "queue" = the keys of the latest events (the paper: popularity-weighted,
    # so the cosine learns log p(x|u) - log p(x)); "cache" = `negatives_per_step` entities drawn
    # uniformly from the cached vectors of every entity met so far (the cosine learns log p(x|u)
    # over the whole catalog, which is what the normalized rank scores).
    negatives: Literal["queue", "cache"] = "queue"
    negatives_per_step: int = 1024
    # FELRec-Q's positive keys: "fresh" = the other side's encoding in the same step (the paper);
    # "cached" = the vector the cache serves for it just before the batch (its fresh encoding while it
    # has none), i.e. what a query is scored against when served. The cache then acts as the slowly
    # moving target the queries learn to match, not the encoder's own output of the same step.
    positives: Literal["fresh", "cached"] = "fresh"
    # One encoder for users and items (the paper) or one per kind of encoded entity.
    share_encoder: bool = True
    # FELRec-Q's terms: "both" (the paper: users against items and items against users) or "user"
    # (users against items only: what serving ranks; an unshared item encoder then keeps its init).
    loss_terms: Literal["both", "user"] = "both"

    def __post_init__(self) -> None:
        check(self.variant in ("q", "p"), "model.variant must be 'q' or 'p'")
        check(self.norm in ("batch", "layer"), "model.norm must be 'batch' or 'layer'")
        check(self.queue_size >= 1, "model.queue_size must be >= 1")
        check(self.temperature > 0, "model.temperature must be > 0")


@dataclass(frozen=True)
class TrainingConfig:
    """Time-ordered replay training: SGD + cosine schedule with linear warm-up, per epoch."""

    epochs: int = 100
    warmup_epochs: int = 10
    lr: float = 0.01
    min_lr: float = 1e-7
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd = the paper (with momentum); adam = AdamW
    batch_size: int = 1024
    # Events per window (0 = batch_size: consecutive batches, the paper). Every event of a window
    # reads the cache as it was before the window (histories stay exact: earlier events of the
    # window included), the window is split into batches of batch_size drawn at random from all of
    # it (seeded), one optimizer step each, and the cache is written once the window is done. A
    # time-ordered batch of 256 ML-100K events holds ~7 users; a batch drawn from 4,096 holds ~80.
    window: int = 0
    # Batches per optimizer step (their gradients summed, each loss weighted 1/accumulate): a step
    # then sees many users while the cache is still written after every batch (no staleness).
    accumulate: int = 1
    # After each epoch, rebuild the cache by replaying the training events with the epoch's final
    # weights (eval mode, no gradient): every cached vector then comes from one encoder, not from
    # the weights of its step (training/train.py refresh_cache). Costs one inference pass an epoch.
    refresh_cache: bool = False
    # The learning control: the same replay, loss, cache rules and output statistics, but no
    # optimizer step, so the encoder keeps its initial weights (experiment row felrec-q-init).
    frozen: bool = False
    # The cache writer: an exponential moving average of the trained weights with this decay per
    # step (MoCo's key encoder). The encoder reads its own cached outputs, so the cache is its
    # training target and its input at once: written by fast-moving weights it chases them; the
    # average moves slowly. It is the model that validation scores and checkpoints serve. 0 = off;
    # 1 = the weights of the epoch's start write its cache, the writer takes the trained weights
    # when the epoch ends (with refresh_cache, before the cache is rebuilt).
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # Collapse guard: stop when the spread of user vectors stays below this for `collapse_patience` epochs.
    min_spread: float = 1e-3
    collapse_patience: int = 3
    # Memory: the most encoder activations (MiB) a training step keeps for backward; buckets beyond
    # it are encoded again during backward (exact: same dropout masks, same gradients; costs their
    # forward once more). 0 = no limit. See model/felrec.py ActivationBudget.
    max_activation_mb: int = 128  # paper size: peak RSS <= 1 GB (README "Memory at the paper's size")
    # bf16: the encoder's forward (and so its backward) in training steps runs under
    # torch.autocast(bfloat16); weights, optimizer, loss, cache and validation stay fp32. Only where
    # the device has bf16 matmul units (felrec_stream.device.check_precision refuses it elsewhere).
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check(self.epochs >= 0 and 0 <= self.warmup_epochs, "training.epochs and warmup_epochs must be >= 0")
        check(self.batch_size >= 1, "training.batch_size must be >= 1")
        check(self.window == 0 or self.window >= self.batch_size, "training.window must be 0 or >= batch_size")
        check(0.0 <= self.ema_decay <= 1.0, "training.ema_decay must be in [0, 1] (1: synced once an epoch)")
        check(self.accumulate >= 1, "training.accumulate must be >= 1")
        check(self.max_activation_mb >= 0, "training.max_activation_mb must be >= 0 (0 = no limit)")
        check(self.lr > 0, "training.lr must be > 0")
        check(0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
               and self.val_fraction + self.test_fraction < 1, "training val/test fractions must leave a train part")


@dataclass(frozen=True)
class EvalConfig:
    """Online evaluation protocol."""

    batch_size: int = 1024
    num_negatives: int = 100  # HR@k is computed against this many sampled negatives
    hr_k: int = 10
    seed: int = 0
    nn_neighbors: int = 10  # nearest-neighbour variant: average the scores of the user's 10 nearest users
    mode: EvalMode = "keep"
    # "serve": every event is scored with what the store served just before it, then applied (what
    # a deployed system can do; used for every comparison). "paper": the event's user and item are
    # encoded and written first, then the user is scored (the reference's protocol).
    protocol: EvalProtocol = "serve"

    def __post_init__(self) -> None:
        check(self.num_negatives >= 1 and self.hr_k >= 1, "eval.num_negatives and hr_k must be >= 1")
        check(self.mode in EVAL_MODES, f"eval.mode must be one of {', '.join(EVAL_MODES)}")
        check(self.protocol in EVAL_PROTOCOLS, f"eval.protocol must be one of {', '.join(EVAL_PROTOCOLS)}")


@dataclass(frozen=True)
class ScoringConfig:
    """How a user's vector ranks items, in the evaluator and the query API alike.

    score(u, x) = cos(u, x) + popularity_weight * log(1 + popularity(x)), popularity as kept by the
    store (`cache.popularity_halflife`). Why: InfoNCE against negatives drawn from the recent
    positives (the queue) learns log p(x|u) - log p(x) up to a constant, so ranking by p(x|u) needs
    the item prior added back. With `calibrate_popularity`, training picks the weight on the
    validation split (each epoch, from a fixed grid) and saves it in the checkpoint.
    """

    popularity_weight: float = 0.0
    calibrate_popularity: bool = False
    # Excludes the user's last `cache.history_len` items, as the query API does (`recommend`'s
    # default). The evaluator applies the same rule to every model, so tables measure what is served.
    exclude_recent: bool = True

    def __post_init__(self) -> None:
        check(self.popularity_weight >= 0, "scoring.popularity_weight must be >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """The representation cache: history length and (for the FAISS store) sharding/index."""

    history_len: int = 64
    # Input of an entity's very first encoding (empty history): "id_seed" = a fixed pseudo-random
    # vector derived from its external id (breaks the symmetry of an all-zero cache, see
    # state/engine.py); "zero" = the paper's zero vector.
    cold_start_input: Literal["id_seed", "zero"] = "id_seed"
    shards: int = 1
    index_type: Literal["flat", "hnsw", "ivf"] = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    ivf_nlist: int = 1024  # total over the shards
    ivf_nprobe: int = 16  # lists searched per query (recall/latency table: README "Queries")
    # Entities of each kind (users and items separately) held in memory; 0 = no cap. Over the cap
    # the least recently touched ones spill to Parquet files and come back on their next use
    # (felrec_stream/state/spill.py).
    max_entities: int = 0
    # Item popularity for the score's prior: interaction counts, each weighted 0.5 ** (events since
    # it / popularity_halflife); 0 = plain counts.
    popularity_halflife: float = 0.0

    def __post_init__(self) -> None:
        check(self.history_len >= 1, "cache.history_len must be >= 1")
        check(self.popularity_halflife >= 0, "cache.popularity_halflife must be >= 0 (0 = plain counts)")
        check(self.shards >= 1, "cache.shards must be >= 1")
        check(self.max_entities >= 0, "cache.max_entities must be >= 0 (0 = no cap)")
        check(self.cold_start_input in ("id_seed", "zero"), "cache.cold_start_input must be id_seed or zero")
        check(self.index_type in ("flat", "hnsw", "ivf"), "cache.index_type must be flat, hnsw or ivf")
        check(min(self.hnsw_m, self.hnsw_ef_search, self.ivf_nlist, self.ivf_nprobe) >= 1,
              "cache.hnsw_m, hnsw_ef_search, ivf_nlist and ivf_nprobe must be >= 1")


@dataclass(frozen=True)
class KafkaConfig:
    """Connection settings; `security` passes through to kafka-python (sasl_*, ssl_*, security_protocol)."""

    bootstrap_servers: str = ""  # empty = start the embedded broker
    topic: str = "interactions"
    dead_letter_topic: str = "interactions.dlq"
    partitions: int = 1
    client_id: str = "felrec-stream"
    request_timeout_ms: int = 15000
    connect_retries: int = 5
    max_message_bytes: int = 65536
    reorder_window: int = 1000  # events held back to restore event-time order across partitions
    security: Mapping[str, Any] = field(default_factory=dict)
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"  # unit of message `ts`; bounds the year-2200 check
    outage_timeout_s: float = 300.0  # a consumer waits this long for an unreachable broker before failing
    future_skew_s: float = 86400.0  # events further ahead of the wall clock are dead-lettered (0: no limit)

    def __post_init__(self) -> None:
        check(self.partitions >= 1, "kafka.partitions must be >= 1")
        check(self.reorder_window >= 0, "kafka.reorder_window must be >= 0")
        check(self.timestamp_unit in ("s", "ms", "us", "ns"), "kafka.timestamp_unit must be s, ms, us or ns")
        check(self.outage_timeout_s >= 0 and self.future_skew_s >= 0,
              "kafka.outage_timeout_s and kafka.future_skew_s must be >= 0")
        for name in ("topic", "dead_letter_topic"):
            problem = topic_name_problem(getattr(self, name))
            check(problem is None, f"kafka.{name}: {problem}")


@dataclass(frozen=True)
class ParallelConfig:
    """Data-parallel ranks under torchrun (felrec_stream/parallel.py). A deployment setting like
    kafka: not part of a trained model, never saved in a checkpoint."""

    # A collective that waits longer fails the job with an error instead of hanging (a rank that
    # died is noticed at once: its connections close). Must exceed the longest step rank 0 takes
    # alone while the others wait: a checkpoint, validation report or snapshot write.
    timeout_s: float = 300.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL for CUDA tensors where available, else gloo

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, "parallel.timeout_s must be > 0")
        check(self.backend in ("auto", "gloo", "nccl"), "parallel.backend must be auto, gloo or nccl")


@dataclass(frozen=True)
class WorkerConfig:
    """The streaming worker (pipelines/worker.py): how it cuts batches, when it snapshots, when it
    stops, what it restores, which model versions it adopts. A deployment setting like kafka: never
    saved in a checkpoint; recorded in the worker's snapshots."""

    topic: str = "interactions"  # the topic the worker consumes (`consume --topic`)
    batch_size: int = 256
    max_wait_ms: int = 50  # follow mode only: cut a short batch when its oldest event waited this long
    until_end: bool = False  # stop at the end of the topic; batches cut by count only (deterministic)
    max_events: int = 0  # stop at the first batch boundary at or after this many events of this run (0: never)
    snapshot_every_events: int = 50_000
    snapshot_every_seconds: float = 60.0
    keep_snapshots: int = 3
    allow_model_change: bool = False  # restore a snapshot made with another model
    group_id: str = ""  # consumer group for monitoring commits ("": no commits)
    reset_state: bool = False  # discard unusable snapshots instead of refusing
    # Online learning (pipelines/versions.py): adopt the weight versions `learn` publishes here ("": never).
    models_dir: str = ""
    backfill: int = 0  # after each batch, re-encode the K most popular items written by older weights

    def __post_init__(self) -> None:
        problem = topic_name_problem(self.topic)
        check(problem is None, f"worker.topic: {problem}")
        check(self.batch_size >= 1 and self.max_wait_ms >= 0, "worker.batch_size must be >= 1 and max_wait_ms >= 0")
        check(self.snapshot_every_events >= 1 and self.snapshot_every_seconds > 0,
              "worker.snapshot_every_events must be >= 1 and snapshot_every_seconds > 0")
        check(self.max_events >= 0 and self.keep_snapshots >= 1 and self.backfill >= 0,
              "worker.max_events and backfill must be >= 0, keep_snapshots >= 1")


@dataclass(frozen=True)
class LearnConfig:
    """Online learning (`felrec-stream learn`, training/learn.py): the encoder keeps training on the
    live topic and publishes weight versions. Saved in the learner's snapshots."""

    topic: str = "interactions"
    batch_size: int = 0  # events per training step (0: the checkpoint's training.batch_size)
    lr: float = 0.0  # constant learning rate (0: the checkpoint's training.lr)
    publish_every: int = 10_000  # events between two published versions
    start: Literal["checkpoint", "earliest", "latest"] = "checkpoint"  # where the first run starts (see learn.py)
    reservoir_size: int = 10_000  # older events kept (seeded reservoir sampling) against forgetting
    replay_ratio: float = 0.0  # reservoir events mixed into each step, per live event (0: none)
    guard_window: int = 2_000  # the most recent events before a publish on which the guard scores
    guard_tolerance: float = 0.02  # refuse a version whose guard rank is worse than its parent's by more
    min_spread: float = 1e-4  # refuse a version whose user vectors collapse (all alike)
    keep_versions: int = 10  # older versions are deleted unless a kept snapshot refers to them
    keep_snapshots: int = 2
    seed: int = 0
    until_end: bool = False  # stop at the end of the topic (count-only batches: deterministic)

    def __post_init__(self) -> None:
        problem = topic_name_problem(self.topic)
        check(problem is None, f"learn.topic: {problem}")
        check(self.batch_size >= 0 and self.lr >= 0, "learn.batch_size and learn.lr must be >= 0 (0: the checkpoint's)")
        check(self.publish_every >= 1 and self.keep_versions >= 1 and self.keep_snapshots >= 1,
              "learn.publish_every, keep_versions and keep_snapshots must be >= 1")
        check(self.reservoir_size >= 0 and self.replay_ratio >= 0, "learn.reservoir_size and replay_ratio must be >= 0")
        check(self.guard_window >= 0 and self.guard_tolerance >= 0,
              "learn.guard_window and guard_tolerance must be >= 0")
        check(self.start in ("checkpoint", "earliest", "latest"), "learn.start must be checkpoint, earliest or latest")


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_TOPIC_CHARS = 249


def topic_name_problem(name: str) -> str | None:
    """Why `name` is not a legal Kafka topic name (Apache Kafka's rules; Tansu checks none), or None."""
    if not name or name in (".", ".."):
        return f"topic name {name!r} is not allowed"
    if len(name) > MAX_TOPIC_CHARS:
        return f"topic name has {len(name)} characters > {MAX_TOPIC_CHARS}"
    bad = sorted(set(name) - _TOPIC_CHARS)
    if bad:
        return f"topic name {name[:80]!r} has character(s) {''.join(bad)!r}: use ASCII letters, digits, '.', '_', '-'"
    return None


@dataclass(frozen=True)
class Configs:
    """The sections that define a trained FELRec and how it was trained and evaluated.

    Saved inside every checkpoint as plain dicts (`to_dict`) and rebuilt with `from_dict`, which
    rejects unknown fields. Kafka settings are not part of it: they belong to a deployment, not
    to a model.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(getattr(self, name)) for name in BUNDLED_SECTIONS}

    @property
    def excluded_recent(self) -> int:
        """How many of the user's last interactions the served ranking leaves out (0 = none): the
        evaluator's `exclude_recent` argument for this model."""
        return self.cache.history_len if self.scoring.exclude_recent else 0

    @classmethod
    def from_dict(cls, sections: Mapping[str, Mapping[str, Any] | None] | None) -> "Configs":
        """From plain dicts (a missing section gets its defaults)."""
        sections = sections or {}
        return cls(**{name: from_dict(SECTIONS[name], sections.get(name), name) for name in BUNDLED_SECTIONS})

    @classmethod
    def load(cls, file_sections: Mapping[str, Mapping[str, Any]] | None = None,
             overrides: Mapping[str, Mapping[str, Any]] | None = None,
             environ: Mapping[str, str] | None = None) -> "Configs":
        """Every section by `load_section`: file values < environment < explicit overrides."""
        overrides = overrides or {}
        return cls(**{name: load_section(SECTIONS[name], name, file_sections, overrides.get(name), environ)
                      for name in BUNDLED_SECTIONS})


# The one map from section name to config class (config files, environment, checkpoints).
SECTIONS: dict[str, type] = {**typing.get_type_hints(Configs), "kafka": KafkaConfig, "parallel": ParallelConfig,
                             "worker": WorkerConfig, "learn": LearnConfig}
BUNDLED_SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Configs))


# Named starting points below a config file: preset < file < environment < command-line options.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's hyper-parameters (the typed defaults), full size.
    "paper": {},
    # The recipe for serving, every choice made on the validation splits (README "Results"): the
    # cache holds the encoding that includes each entity's latest event (what is served), per-kind
    # standardisation of the encoder outputs with running statistics (the same function in training
    # and serving), one encoder per kind of entity, queued keys of events sharing the row's user or
    # item masked, no MLP heads, T 0.5, queue 256, and a recent-popularity prior whose half-life and
    # weight are chosen on the validation split.
    "serve": {
        "encoder": {"output_norm": "running"},
        "model": {"use_mlp": False, "temperature": 0.5, "queue_size": 256, "cache_update": "post_event",
                  "mask_own_negatives": True, "share_encoder": False},
        "training": {"warmup_epochs": 0, "batch_size": 256},
        "eval": {"batch_size": 256},
        "scoring": {"calibrate_popularity": True},
    },
    # "serve" at a size that trains in minutes on a laptop CPU (quickstart, benchmarks' small row).
    "small": {
        "encoder": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "output_norm": "running"},
        "model": {"use_mlp": False, "temperature": 0.5, "queue_size": 256, "cache_update": "post_event",
                  "mask_own_negatives": True, "share_encoder": False},
        "training": {"epochs": 5, "warmup_epochs": 0, "batch_size": 256},
        "eval": {"batch_size": 256},
        "scoring": {"calibrate_popularity": True},
    },
}
# What each preset is for and how long it takes (`train --help`, README "Configuration"). Times for
# 100k events (ML-100K: 80k training + 10k validation events an epoch) on 2 CPU cores: `small`
# measured (README "Results"); paper size estimated as small's epoch x 6.8, the small/serve training
# throughput ratio of benchmarks/bench_train_eval.py on ML-100K, 2 threads (896 / 132 interactions/s).
PRESET_DESCRIPTIONS: dict[str, str] = {
    "paper": "the paper's setup (the typed defaults), d=128, 3 layers, 100 epochs: ~6-7 min an epoch, "
             "~10-12 h (estimated)",
    "serve": "paper size, the recipe chosen on validation for serving (post-event cache, popularity prior), "
             "100 epochs: ~6-7 min an epoch, ~10-12 h (estimated)",
    "small": "serve at d=32, 1 layer, 5 epochs: about 1 min an epoch on ML-100K, ~5 min (measured)",
}


def preset_sections(name: str | None) -> dict[str, dict[str, Any]]:
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {section: dict(values) for section, values in PRESETS[name].items()}


def merge_sections(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones field by field."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


def literal_choices(cls: type, name: str) -> tuple[str, ...]:
    """The values a Literal-typed config field accepts (e.g. for click.Choice: one source of truth)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok: validation in every config's __post_init__."""
    if not ok:
        raise ConfigError(message)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a config dataclass."""
    return {f.name: (dict(v) if isinstance(v := getattr(config, f.name), Mapping) else v)
            for f in dataclasses.fields(config)}


def from_dict(cls: type[C], values: Mapping[str, Any] | None, section: str = "") -> C:
    """Build `cls` from a mapping, rejecting unknown keys and coercing/validating field types."""
    values = dict(values or {})
    name = section or cls.__name__
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {name} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    coerced = {key: _coerce(hints[key], value, f"{name}.{key}") for key, value in values.items()}
    try:
        return cls(**coerced)
    except TypeError as exc:
        raise ConfigError(f"invalid {name}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be a boolean, got {value!r}")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}") from None
    if origin in (Mapping, dict) or hint is Mapping:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def env_overrides(section: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`FELREC_<SECTION>__<FIELD>` variables for one section, keyed by lower-case field name."""
    environ = os.environ if environ is None else environ
    prefix = f"FELREC_{section.upper()}__"
    return {key[len(prefix):].lower(): value for key, value in environ.items() if key.startswith(prefix)}


def read_config_file(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Sections of a YAML/JSON config file (empty when `path` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) in {path}: {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return {k: dict(v or {}) for k, v in data.items()}


def load_section(cls: type[C], section: str, file_sections: Mapping[str, Mapping[str, Any]] | None = None,
                 overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> C:
    """File values < environment variables < explicit overrides (e.g. CLI options that were given)."""
    values: dict[str, Any] = dict((file_sections or {}).get(section, {}))
    values.update(env_overrides(section, environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, values, section)


def replace(config: C, **changes: Any) -> C:
    return dataclasses.replace(config, **changes)
