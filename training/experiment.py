"""The paper's experiment in one call: every model trained, checkpointed on validation, replayed on
test by the shared online evaluator, and laid out like Tables 1-3 plus Figure 2.

Rows (keys as given to `--models`):
- baselines: `bpr-mf`, `gru4rec`, `gru4rec-bptt`, `sasrec`, `jodie` (training.baselines), `popularity`,
  `popularity-recent`, `cooccurrence` (not learned: window, history, half-life and prior weight chosen
  on the validation split from COOCCURRENCE_GRID);
- FELRec: `felrec-q`, `felrec-p` and extra rows `felrec-{q,p}-<extra>`:
  `reset` (same weights, empty cache when the replay after training starts), `zero` (trained on
  another dataset, empty cache), `nn` (scores of the 10 nearest users), and the ablations `ln`
  (LayerNorm in the MLPs), `nomlp`, `sharemlp`, `notype` (ModelConfig/EncoderConfig switches), `init`
  (the learning control: never trained, `training.frozen`) and `noprior` (the base checkpoint scored by
  the cosine alone).

FELRec presets (`ExperimentConfig.felrec_preset`): "paper" = the paper's setup (MLP heads, queue
8192, T 0.07) scaled by `size`; "serve" = the recipe of `config.PRESETS` (per-kind standardisation
of the encoder outputs with running statistics, one encoder per kind, masked queue, no MLP heads,
T 0.5, queue 256, no warm-up, batch 256; at size small the "small" preset's d_model 32 / 1 layer /
2 heads / d_ff 64 / 5 epochs). Ablation rows apply their switch on top; without MLP heads `ln`,
`sharemlp` and `nomlp` switch nothing, so those rows reuse the base checkpoint and the table says
so under it. The evaluation config (`eval`) is one for all
rows, whatever the preset (the presets' `eval:` sections are not used).

Protocol, identical for every row: chronological 80/10/10 split; training on the first part; the
checkpoint with the best validation rank is kept; the evaluator replays the validation events
as warm-up (unscored) and then scores the test events (same catalog, same negatives, same
partitions). FELRec's rows `-reset`/`-nn` reuse the trained FELRec checkpoint.

A row that fails (FelrecError, e.g. a representation collapse) is shown as failed, with its
reason under the table and no numbers; it writes no result file, so the next run retries it.

Output in `out_dir`: `results/<key>.json` (one row: summary, parameter count, training log) and
`results/<key>.parquet` (per event), `table.md`, `table.json`, `figure2.png`. A row whose
result file exists is not recomputed (resumable); FELRec training also resumes from its last
checkpoint. Every number in the table comes from these result files. With a FELRec preset other
than "paper", FELRec result files and checkpoints are keyed `<key>@<preset>` and the table files
are `table-<preset>.md/.json`, `figure2-<preset>.png`: both presets can share one folder (and its
baseline rows, which do not depend on the preset) without mixing their FELRec rows.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from felrec_stream.config import (CacheConfig, Configs, EncoderConfig, EvalConfig, ModelConfig, ScoringConfig,
                                  TrainingConfig, preset_sections, replace, to_dict)
from felrec_stream.data.split import Split, chronological_split
from felrec_stream.device import resolve_device
from felrec_stream.errors import ConfigError, FelrecError
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import count_parameters
from felrec_stream.model.metrics import NaNScoresError
from felrec_stream.state.checkpoint import load_checkpoint
from training.baselines import build_baseline, fit, make_config
from training.baselines.configs import config_to_dict
from training.baselines.configs import CooccurrenceConfig
from training.baselines.cooccurrence import CooccurrenceOnline
from training.evaluate import DEFAULT_EXCLUDE_RECENT, EvalResult, evaluate, evaluate_variants, warmup_events
from training.felrec_online import PopularityOnline, build_felrec
from training.protocol import EVAL_PARTITIONS
from training.report import EXCLUDED_NOTE, DASH, PARTITION_TITLES, plot_rank_vs_prior, rules_title
from training.train import choose_popularity_halflife, train

log = get_logger(__name__)

BASELINE_ROWS = {"bpr-mf": "BPR-MF", "gru4rec": "GRU4Rec", "gru4rec-bptt": "GRU4Rec-BPTT", "sasrec": "SASRec",
                 "jodie": "JODIE*", "popularity": "Popularity", "popularity-recent": "Popularity (recent)",
                 "cooccurrence": "Co-occurrence (item-kNN)"}
POPULARITY_ROWS = ("popularity", "popularity-recent")
# cooccurrence: every (window, history, halflife) is replayed on validation once, scoring every prior
# weight of the grid in that replay (`evaluate_variants`); halflife 0 = no decay over the history.
COOCCURRENCE_GRID = {"window": (1, 3, 10, 50), "history": (8, 16, 64), "halflife": (1.0, 2.0, 4.0, 8.0, 0.0)}
COOCCURRENCE_PRIOR_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
FELREC_EXTRAS = {"reset": "-reset", "zero": "-zero", "nn": "-NN", "ln": "-LN", "nomlp": "-noMLP",
                 "sharemlp": "-shareMLP", "notype": "-noType", "paper": " (paper protocol)",
                 "init": " (initial weights)", "noprior": " (prior off)"}
REUSES_BASE = ("reset", "nn", "paper", "noprior")  # rows evaluated differently from the base row's checkpoint
ABLATIONS = ("ln", "nomlp", "sharemlp", "notype")
MLP_ABLATIONS = ("ln", "sharemlp", "nomlp")  # switches of the MLP heads: no-ops when the base has none
FELREC_PRESETS = ("paper", "serve")
# config.PRESETS entry holding the serve recipe at each experiment size ("small" = serve, CPU-sized)
SERVE_PRESET_OF_SIZE = {"paper": "serve", "small": "small", "tiny": "serve"}
DEFAULT_MODELS = ("felrec-q", "felrec-p", "sasrec", "gru4rec", "gru4rec-bptt", "bpr-mf", "jodie", "popularity")
FIGURE_ROWS = ("felrec-q", "felrec-p", "sasrec")  # Figure 2 overlays FELRec and SASRec


@dataclass(frozen=True)
class RowSpec:
    """One table row: which model, trained how, evaluated how."""

    key: str  # e.g. "felrec-q-ln"
    display: str  # e.g. "FELRec-Q-LN"
    family: Literal["felrec", "baseline", "popularity", "cooccurrence"]
    variant: str | None = None  # FELRec "q" / "p"
    extra: str | None = None  # one of FELREC_EXTRAS

    @property
    def train_key(self) -> str:
        """Checkpoint folder: -reset and -nn reuse the plain FELRec training."""
        return f"felrec-{self.variant}" if self.extra in (None, *REUSES_BASE) else self.key


def parse_row(key: str) -> RowSpec:
    key = key.strip().lower()
    if key in POPULARITY_ROWS:
        return RowSpec(key, BASELINE_ROWS[key], "popularity")
    if key == "cooccurrence":
        return RowSpec(key, BASELINE_ROWS[key], "cooccurrence")
    if key in BASELINE_ROWS:
        return RowSpec(key, BASELINE_ROWS[key], "baseline")
    parts = key.split("-")
    if parts[0] == "felrec" and len(parts) in (2, 3) and parts[1] in ("q", "p"):
        extra = parts[2] if len(parts) == 3 else None
        if extra is None or extra in FELREC_EXTRAS:
            display = f"FELRec-{parts[1].upper()}" + (FELREC_EXTRAS[extra] if extra else "")
            return RowSpec(key, display, "felrec", parts[1], extra)
    known = list(BASELINE_ROWS) + ["felrec-q", "felrec-p"] + [f"felrec-q-{e}" for e in FELREC_EXTRAS]
    raise ConfigError(f"unknown model {key!r}; known: {', '.join(known)} (and felrec-p-<extra>)")


def expand_models(names: Sequence[str], zero_shot: bool) -> list[str]:
    """Model keys; "all" = every row (the -zero rows only with a zero-shot dataset)."""
    out: list[str] = []
    for name in names:
        if name.strip().lower() == "all":
            extras = [e for e in FELREC_EXTRAS if zero_shot or e != "zero"]
            out += [f"felrec-{v}" for v in "qp"] + [f"felrec-{v}-{e}" for v in "qp" for e in extras]
            out += list(BASELINE_ROWS)
        else:
            out.append(name.strip().lower())
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class FELRecSetup:
    encoder: EncoderConfig
    model: ModelConfig
    training: TrainingConfig
    cache: CacheConfig
    scoring: ScoringConfig = ScoringConfig()


def felrec_setup(size: str, variant: str, extra: str | None, seed: int, preset: str = "paper") -> FELRecSetup:
    """FELRec configs of a size and FELRec preset, with the row's ablation switch applied on top."""
    if preset not in FELREC_PRESETS:
        raise ConfigError(f"unknown FELRec preset {preset!r}; known: {', '.join(FELREC_PRESETS)}")
    setup = _serve_setup(size, variant, seed) if preset == "serve" else _paper_setup(size, variant, seed)
    switches = {"ln": {"norm": "layer"}, "nomlp": {"use_mlp": False}, "sharemlp": {"share_mlp": True}}
    if extra in switches:
        setup = replace(setup, model=replace(setup.model, **switches[extra]))
    if extra == "notype":
        setup = replace(setup, encoder=replace(setup.encoder, type_embedding=False))
    if extra == "init":  # the learning control: the same replays and cache rules, no optimizer step
        setup = replace(setup, training=replace(setup.training, frozen=True))
    return setup


def ablation_is_noop(base: FELRecSetup, extra: str | None) -> bool:
    """-LN/-shareMLP/-noMLP change the MLP heads only: without heads the model is the base model."""
    return extra in MLP_ABLATIONS and not base.model.use_mlp


def _serve_setup(size: str, variant: str, seed: int) -> FELRecSetup:
    """config.PRESETS' serve recipe over the typed defaults (tiny: over the tiny sizes)."""
    if size not in SERVE_PRESET_OF_SIZE:
        raise ConfigError(f"unknown size {size!r}; known: small, paper, tiny")
    base = (_paper_setup("tiny", variant, seed) if size == "tiny" else
            FELRecSetup(EncoderConfig(), ModelConfig(variant=variant), TrainingConfig(seed=seed), CacheConfig()))
    sections = preset_sections(SERVE_PRESET_OF_SIZE[size])
    return FELRecSetup(replace(base.encoder, **sections.get("encoder", {})),
                       replace(base.model, **sections.get("model", {})),
                       replace(base.training, **sections.get("training", {})),
                       replace(base.cache, **sections.get("cache", {})),
                       replace(base.scoring, **sections.get("scoring", {})))


def _paper_setup(size: str, variant: str, seed: int) -> FELRecSetup:
    """The paper's setup (MLP heads, queue, T 0.07) at a size."""
    if size == "paper":
        setup = FELRecSetup(EncoderConfig(), ModelConfig(variant=variant), TrainingConfig(seed=seed), CacheConfig())
    elif size == "small":  # about 20 s per ML-100K epoch on one CPU core
        setup = FELRecSetup(EncoderConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64),
                            ModelConfig(variant=variant, queue_size=1024, proj_hidden=64, proj_out=16),
                            TrainingConfig(epochs=5, warmup_epochs=1, lr=0.01, seed=seed),
                            CacheConfig(history_len=16))
    elif size == "tiny":  # tests and smoke runs
        setup = FELRecSetup(EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32),
                            ModelConfig(variant=variant, queue_size=256, proj_hidden=32, proj_out=8),
                            TrainingConfig(epochs=2, warmup_epochs=1, lr=0.01, batch_size=256, seed=seed),
                            CacheConfig(history_len=8))
    else:
        raise ConfigError(f"unknown size {size!r}; known: small, paper, tiny")
    return setup


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str  # label shown in the table
    models: tuple[str, ...] = DEFAULT_MODELS
    size: Literal["small", "paper", "tiny"] = "small"
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero_shot_dataset: str | None = None  # label of the dataset the -zero rows were trained on
    felrec_preset: Literal["paper", "serve"] = "paper"  # FELRec rows' recipe (baselines do not depend on it)
    # Every row is scored without the items of the user's last n interactions (the query API's
    # default rule with the default cache.history_len), so the rows compare what would be served.
    exclude_recent: int = DEFAULT_EXCLUDE_RECENT

    def __post_init__(self) -> None:
        if self.felrec_preset not in FELREC_PRESETS:
            raise ConfigError(f"unknown FELRec preset {self.felrec_preset!r}; known: {', '.join(FELREC_PRESETS)}")

    def result_key(self, spec: RowSpec) -> str:
        """File stem of a row's results/checkpoints: FELRec rows of a non-paper preset get "@<preset>"."""
        if spec.family != "felrec" or self.felrec_preset == "paper":
            return spec.key
        return f"{spec.key}@{self.felrec_preset}"

    def output_name(self, stem: str, suffix: str) -> str:
        """table.md / figure2.png (paper) or table-serve.md / figure2-serve.png."""
        return f"{stem}{suffix}" if self.felrec_preset == "paper" else f"{stem}-{self.felrec_preset}{suffix}"


@dataclass
class ExperimentResult:
    rows: list[dict[str, Any]]
    table_md: Path
    table_json: Path
    figure: Path | None
    computed: list[str]  # keys trained/evaluated in this call (the others came from result files)


def run_experiment(events: pa.Table, cfg: ExperimentConfig, out_dir: str | Path,
                   zero_shot_events: pa.Table | None = None) -> ExperimentResult:
    """Train and evaluate every row of `cfg.models` (skipping rows with a result file), then render."""
    out = Path(out_dir)
    specs = [parse_row(k) for k in expand_models(cfg.models, zero_shot_events is not None)]
    if any(s.extra == "zero" for s in specs) and zero_shot_events is None:
        raise ConfigError("the -zero rows need another dataset to train on (--zero-shot-from DATASET:PATH)")
    split = chronological_split(events, TrainingConfig().val_fraction, TrainingConfig().test_fraction)
    log.info("experiment_started", dataset=cfg.dataset, size=cfg.size, felrec_preset=cfg.felrec_preset,
             rows=len(specs), out_dir=str(out), train=len(split.train), val=len(split.val), test=len(split.test))
    rows, computed = [], []
    for spec in specs:
        path = out / "results" / f"{cfg.result_key(spec)}.json"
        if path.is_file():
            rows.append(_finished_row(path, spec, cfg))
            log.info("experiment_row_skipped", model=spec.key, result=str(path))
            continue
        try:
            rows.append(_run_row(spec, cfg, events, split, out, zero_shot_events))
            computed.append(spec.key)
        except FelrecError as exc:  # e.g. a collapsed FELRec: the other rows still run
            log.error("experiment_row_failed", model=spec.key, error=str(exc))
            rows.append({"key": spec.key, "model": spec.display, "failed": str(exc)})
    return _render(rows, cfg, out, computed)


def _finished_row(path: Path, spec: RowSpec, cfg: ExperimentConfig) -> dict[str, Any]:
    row = json.loads(path.read_text())
    excluded = row.get("summary", {}).get("exclude_recent", 0)  # rows written before the rule excluded nothing
    if excluded != cfg.exclude_recent:
        raise ConfigError(f"{path} was scored with the user's last {excluded} items excluded, not "
                          f"{cfg.exclude_recent}; move it away or use another output folder")
    found = row.get("felrec_preset", "paper")  # rows written before presets existed are paper rows
    if spec.family == "felrec" and found != cfg.felrec_preset:
        raise ConfigError(f"{path} holds a FELRec row of preset {found!r}, not {cfg.felrec_preset!r}; "
                          "move it away or use another output folder")
    return row


def _run_row(spec: RowSpec, cfg: ExperimentConfig, events: pa.Table, split: Split, out: Path,
             zero_shot_events: pa.Table | None) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if spec.family == "popularity":
        # recent popularity counts with the half-life the serve preset's FELRec chooses on validation
        recent = spec.key == "popularity-recent"
        halflife = choose_popularity_halflife(split.train, split.val, cfg.eval, cfg.exclude_recent) if recent else 0.0
        popularity = PopularityOnline([split.train], halflife)
        result = evaluate(popularity, split.test, split.train, cfg.eval, warmup=split.val,
                          exclude_recent=cfg.exclude_recent)
        info: dict[str, Any] = {"params": 0, "params_grow": False, "train": {}, "config": {"halflife": halflife}}
    elif spec.family == "baseline":
        result, info = _run_baseline(spec, cfg, split)
    elif spec.family == "cooccurrence":
        result, info = _run_cooccurrence(cfg, split)
    else:
        result, info = _run_felrec(spec, cfg, events, split, out, zero_shot_events)
    result.model = spec.display
    stem = cfg.result_key(spec)
    preset = {"felrec_preset": cfg.felrec_preset} if spec.family == "felrec" else {}
    row = {"key": spec.key, "result_key": stem, "model": spec.display, "dataset": cfg.dataset, "size": cfg.size,
           **preset, **info, "summary": result.summary(), "seconds": round(time.perf_counter() - started, 1)}
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    pq.write_table(served_events(result), results / f"{stem}.parquet")
    _write_atomic(results / f"{stem}.json", json.dumps(row, indent=2))  # written last: marks the row done
    total = row["summary"]["total"]
    log.info("experiment_row_done", model=spec.key, rank=total["rank"], hit_rate=total["hit_rate"],
             params=row["params"], seconds=row["seconds"])
    return row


def served_events(result: EvalResult) -> pa.Table:
    """Per-event results with rank/hit set to null for events of partitions the model does not serve
    (what it returned there, e.g. ties against -inf, is no measurement)."""
    table = result.events
    served = pc.is_in(table.column("partition"), value_set=pa.array(sorted(result.served), pa.string()))
    for name, kind in (("rank", pa.float64()), ("hit", pa.bool_())):
        column = pc.if_else(served, table.column(name), pa.scalar(None, kind))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _run_baseline(spec: RowSpec, cfg: ExperimentConfig, split: Split) -> tuple[EvalResult, dict[str, Any]]:
    config = make_config(spec.key, cfg.size, seed=cfg.seed)
    adapter = build_baseline(spec.key, config, split.train)
    fitted = fit(adapter, split.train, lambda m: _validation_rank(m, split, cfg.eval, cfg.exclude_recent))
    result = evaluate(fitted.model, split.test, split.train, cfg.eval, warmup=split.val,
                      exclude_recent=cfg.exclude_recent)
    train_info = {"best_epoch": fitted.best_epoch, "best_val_rank": fitted.best_val_rank, "history": fitted.history}
    return result, {"params": fitted.model.num_parameters, "params_grow": fitted.model.params_grow_with_data,
                    "train": train_info, "config": config_to_dict(config)}


def _run_cooccurrence(cfg: ExperimentConfig, split: Split,
                      grid: dict[str, Sequence[float]] | None = None) -> tuple[EvalResult, dict[str, Any]]:
    """Choose the settings on validation (COOCCURRENCE_GRID; the prior's half-life as popularity-recent
    chooses it), then replay validation and score the test events with them."""
    prior_halflife = choose_popularity_halflife(split.train, split.val, cfg.eval, cfg.exclude_recent)
    best, tried = choose_cooccurrence(split, cfg, prior_halflife, grid or COOCCURRENCE_GRID)
    model = CooccurrenceOnline(best, [split.train])
    result = evaluate(model, split.test, split.train, cfg.eval, warmup=split.val, exclude_recent=cfg.exclude_recent)
    chosen = min(tried, key=lambda t: t["val_rank"])
    return result, {"params": 0, "params_grow": False, "train": {"best_val_rank": chosen["val_rank"], "grid": tried},
                    "config": to_dict(best)}


def choose_cooccurrence(split: Split, cfg: ExperimentConfig, prior_halflife: float,
                        grid: dict[str, Sequence[float]]) -> tuple[CooccurrenceConfig, list[dict[str, Any]]]:
    """The grid point (and prior weight) with the best validation rank, and every point's rank."""
    tried: list[dict[str, Any]] = []
    for window, history, halflife in itertools.product(grid["window"], grid["history"], grid["halflife"]):
        point = CooccurrenceConfig(int(window), int(history), float(halflife), prior_halflife=prior_halflife)
        results = evaluate_variants(CooccurrenceOnline(point, [split.train]), split.val, split.train, cfg.eval,
                                    popularity_weights=COOCCURRENCE_PRIOR_WEIGHTS, exclude_recent=cfg.exclude_recent)
        tried += [{**to_dict(replace(point, prior_weight=w)), "val_rank": r.mean_rank}
                  for w, r in zip(COOCCURRENCE_PRIOR_WEIGHTS, results)]
    best = min(tried, key=lambda t: t["val_rank"])
    log.info("cooccurrence_chosen", **{k: v for k, v in best.items() if k != "max_dense_items"})
    return CooccurrenceConfig(**{k: v for k, v in best.items() if k != "val_rank"}), tried


def _validation_rank(model: Any, split: Split, eval_cfg: EvalConfig, exclude_recent: int) -> float:
    """Mean validation rank; NaN when the model scores NaN, which `fit` takes for divergence (it
    stops and keeps the best earlier epoch) instead of failing the whole row."""
    try:
        return evaluate(model, split.val, split.train, eval_cfg, exclude_recent=exclude_recent).mean_rank
    except NaNScoresError as exc:
        log.warning("baseline_nan_scores", model=getattr(model, "name", "?"), error=str(exc))
        return math.nan


def _run_felrec(spec: RowSpec, cfg: ExperimentConfig, events: pa.Table, split: Split, out: Path,
                zero_shot_events: pa.Table | None) -> tuple[EvalResult, dict[str, Any]]:
    """Train (or resume / reuse) the row's FELRec, then replay validation + test with it."""
    assert spec.variant is not None
    setup = felrec_setup(cfg.size, spec.variant, spec.extra, cfg.seed, cfg.felrec_preset)
    base = felrec_setup(cfg.size, spec.variant, None, cfg.seed, cfg.felrec_preset)
    noop = ablation_is_noop(base, spec.extra)
    if noop:  # the same model as the base row (bit-identical training): reuse its checkpoint
        spec_trained, setup = parse_row(f"felrec-{spec.variant}"), base
    else:
        spec_trained = parse_row(spec.train_key)
    train_events = zero_shot_events if spec.extra == "zero" else events
    ckpt_dir = out / "checkpoints" / cfg.result_key(spec_trained)
    configs = Configs(setup.encoder, setup.model, setup.training, cfg.eval, setup.cache, setup.scoring)
    trained = train(train_events, configs, ckpt_dir, resume=(ckpt_dir / "last.pt").is_file())
    checkpoint = load_checkpoint(trained.best_checkpoint or trained.last_checkpoint)
    mode = {"reset": "reset", "zero": "zero-shot"}.get(spec.extra or "", "keep")
    protocol = "paper" if spec.extra == "paper" else cfg.eval.protocol
    if protocol == "paper":  # the reference's protocol and score: no popularity prior
        checkpoint = replace(checkpoint, configs=replace(checkpoint.configs, scoring=ScoringConfig()))
    if spec.extra == "noprior":  # the cosine alone: what the encoder carries without the popularity prior
        scoring = replace(checkpoint.configs.scoring, popularity_weight=0.0)
        checkpoint = replace(checkpoint, configs=replace(checkpoint.configs, scoring=scoring))
    online = build_felrec(checkpoint, mode, resolve_device(setup.training.device),
                          nn_neighbors=cfg.eval.nn_neighbors if spec.extra == "nn" else None, protocol=protocol)
    result = evaluate(online, split.test, split.train, replace(cfg.eval, protocol=protocol),
                      warmup=warmup_events(split, mode), exclude_recent=cfg.exclude_recent)
    train_info = {"best_epoch": trained.best_epoch, "best_val_rank": trained.best_val_rank,
                  "history": trained.history, "checkpoint": str(ckpt_dir),
                  "trained_on": cfg.zero_shot_dataset if spec.extra == "zero" else cfg.dataset, "mode": mode}
    if noop:
        train_info["same_model_as"] = spec_trained.key
    config = {"encoder": to_dict(setup.encoder), "model": to_dict(setup.model),
              "training": to_dict(setup.training),
              "cache": to_dict(checkpoint.configs.cache),  # with the popularity half-life chosen in training
              "scoring": to_dict(checkpoint.configs.scoring), "protocol": protocol}
    return result, {"params": count_parameters(online.model), "params_grow": False, "train": train_info,
                    "config": config}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Rendering (Tables 1-3 layout, Figure 2)



def format_params(n: int, grows: bool) -> str:
    """1234 -> "1.2K"; a trailing "+" marks counts that grow with the dataset (embedding tables)."""
    text = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)
    return text + ("+" if grows else "")


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def table_markdown(rows: Sequence[dict[str, Any]], dataset: str, notes: Sequence[str] = ()) -> str:
    """Markdown table laid out like the paper's Tables 1-3 (rows: models; per partition rank, HR@k);
    `notes`: extra paragraphs under the table's legend."""
    done = [r for r in rows if "failed" not in r]
    if not done:
        return "(no results)\n" + "".join(f"- {r['model']} failed: {r['failed']}\n" for r in rows)
    first = done[0]["summary"]
    k = first["hr_k"]
    header = ["model", "params"]
    for name in EVAL_PARTITIONS:
        share = first["partitions"][name]["share"]
        header += [f"{PARTITION_TITLES[name]} ({share:.1%}) rank ↓", f"HR@{k} ↑"]
    header += ["total rank ↓", f"HR@{k} ↑"]
    lines = [f"**{dataset}** — {first['n_events']} test events, {rules_title(first)}", "",
             "| " + " | ".join(header) + " |", "| --- | ---: |" + " ---: |" * (len(header) - 2)]
    failures = []
    for row in rows:
        if "failed" in row:
            failures.append(f"- {row['model']} failed: {row['failed']}")
            lines.append("| " + " | ".join([f"{row['model']} (failed)"] + [DASH] * (len(header) - 1)) + " |")
        else:
            lines.append("| " + " | ".join(_row_cells(row)) + " |")
    lines += ["", f"Normalized rank over the items met before each event (0 best, 0.5 random); HR@{k} against "
                  f"{first['num_negatives']} sampled negatives. {DASH}: partition the model cannot serve. "
                  f"{PROTOCOL_NOTE}{EXCLUDED_NOTE * bool(first.get('exclude_recent'))} "
                  "Params: trainable parameters; \"+\" = grows with the number of users/items. "
                  "†: total over the served partitions only (not comparable with full totals)."]
    for note in notes:
        lines += ["", note]
    lines += ["", *failures] if failures else []
    return "\n".join(lines) + "\n"


PROTOCOL_NOTE = ("Protocol serve: each event is scored with what the model served just before it, then applied; "
                 "an item's first interaction cannot be served (the item does not exist yet): its own column "
                 "shows the rank of the item's no-history representation and it is not in the total. Rows "
                 "marked \"paper protocol\" encode and write the event's user and item first, then score "
                 "(the reference's protocol; all of their events are in their total).")


def _row_cells(row: dict[str, Any]) -> list[str]:
    summary = row["summary"]
    cells = [row["model"], format_params(int(row["params"]), bool(row["params_grow"]))]
    present = {name for name, part in summary["partitions"].items() if part["count"] > 0}
    for name in EVAL_PARTITIONS:
        part = summary["partitions"][name]
        cells += [_fmt(part["rank"]), _fmt(part["hit_rate"])]
    partial = not present <= set(summary["served"])
    mark = "†" if partial and summary["total"]["rank"] is not None else ""
    cells += [_fmt(summary["total"]["rank"]) + mark, _fmt(summary["total"]["hit_rate"]) + mark]
    return cells


def _prior_note(rows: Sequence[dict[str, Any]], halflife: float, scoring: ScoringConfig) -> str:
    """The popularity prior of the base FELRec-Q row: as configured, or as chosen on validation."""
    if not scoring.calibrate_popularity:
        return f"popularity half-life {halflife:g} events, w {scoring.popularity_weight:g}"
    base = next((r for r in rows if r["key"] == "felrec-q"), None)
    chosen = "" if base is None else (f" (FELRec-Q: {base['config']['cache']['popularity_halflife']:g} events, "
                                      f"w {base['config']['scoring']['popularity_weight']:g})")
    return f"popularity half-life and w chosen on the validation split{chosen}"


def felrec_notes(rows: Sequence[dict[str, Any]], cfg: ExperimentConfig) -> list[str]:
    """What the FELRec rows are when they are not the paper's setup; nothing for the paper preset."""
    if cfg.felrec_preset == "paper" or not any(r["key"].startswith("felrec-") for r in rows):
        return []
    base = felrec_setup(cfg.size, "q", None, cfg.seed, cfg.felrec_preset)
    e, m, t = base.encoder, base.model, base.training
    c, sc = base.cache, base.scoring
    notes = [f"FELRec rows: preset \"{cfg.felrec_preset}\", not the paper's setup — cache holds "
             f"{m.cache_update.replace('_', '-')} encodings, encoder outputs standardised per kind "
             f"(encoder.output_norm={e.output_norm}), positions {e.positions}, "
             f"{'pre' if e.norm_first else 'post'}-norm {e.activation}, empty history input {e.empty_history}, "
             f"{'MLP heads' if m.use_mlp else 'no MLP heads (losses on the encoder outputs)'}, "
             f"{'one shared encoder' if m.share_encoder else 'one encoder per kind (users, items)'}, "
             f"{'queued keys of events sharing the row user or item masked, ' if m.mask_own_negatives else ''}"
             f"T {m.temperature:g}, queue {m.queue_size}, {t.optimizer} lr {t.lr:g}, warm-up {t.warmup_epochs} "
             f"epochs, batch {t.batch_size}, {t.epochs} epochs; d_model {e.d_model}, {e.n_layers} layer(s), "
             f"{e.n_heads} heads, d_ff {e.d_ff}, history {c.history_len}; score = cosine + w log(1 + popularity), "
             f"{_prior_note(rows, c.popularity_halflife, sc)}. "
             "Baselines and the evaluation protocol are the same as with the paper preset."]
    if any(r["key"].endswith("-init") for r in rows):
        notes.append("(initial weights): the learning control — the same architecture, replays, cache rules, output "
                     "statistics and prior calibration, but no optimizer step (training.frozen). (prior off): the "
                     "trained model's checkpoint scored by the cosine alone (w 0).")
    noop = [r["model"] for r in rows if (spec := _felrec_spec(r["key"])) and ablation_is_noop(base, spec.extra)]
    if noop:
        notes.append(f"{', '.join(noop)}: -LN (LayerNorm in the MLP heads), -shareMLP (heads shared by users and "
                     "items) and -noMLP (heads removed) only change the MLP heads, and this preset has none. These "
                     "rows are the base FELRec-Q/P model (same checkpoint, same numbers), not ablations; "
                     "re-enabling the paper's heads for them would change two things at once.")
    return notes


def _felrec_spec(key: str) -> RowSpec | None:
    try:
        spec = parse_row(key)
    except ConfigError:
        return None
    return spec if spec.family == "felrec" else None


def table_json(rows: Sequence[dict[str, Any]], cfg: ExperimentConfig) -> dict[str, Any]:
    """The table as data: per row model, params and the per-partition cells (None = not served)."""
    cells: list[dict[str, Any]] = []
    for row in rows:
        if "failed" in row:
            cells.append({"key": row["key"], "model": row["model"], "failed": row["failed"]})
            continue
        s = row["summary"]
        cells.append({"key": row["key"], "model": row["model"], "params": row["params"],
                      "params_grow": row["params_grow"], "served": s["served"],
                      "partitions": {n: {"share": p["share"], "rank": p["rank"], "hit_rate": p["hit_rate"]}
                                     for n, p in s["partitions"].items()},
                      "total": {"rank": s["total"]["rank"], "hit_rate": s["total"]["hit_rate"]}})
    return {"dataset": cfg.dataset, "size": cfg.size, "seed": cfg.seed, "felrec_preset": cfg.felrec_preset,
            "notes": felrec_notes(rows, cfg), "rows": cells}


def row_order(key: str) -> tuple[int, str]:
    """Paper order: baselines (popularity first), then FELRec-Q and its extra rows, then FELRec-P."""
    keys = ["popularity", "popularity-recent", "cooccurrence", "bpr-mf", "gru4rec", "gru4rec-bptt", "sasrec", "jodie"]
    keys += [f"felrec-{v}" + (f"-{e}" if e else "") for v in "qp" for e in (None, *FELREC_EXTRAS)]
    return (keys.index(key), key) if key in keys else (len(keys), key)


def _render(rows: list[dict[str, Any]], cfg: ExperimentConfig, out: Path, computed: list[str]) -> ExperimentResult:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: row_order(r["key"]))
    md, js = out / cfg.output_name("table", ".md"), out / cfg.output_name("table", ".json")
    _write_atomic(md, table_markdown(rows, cfg.dataset, felrec_notes(rows, cfg)))
    _write_atomic(js, json.dumps(table_json(rows, cfg), indent=2))
    figure_rows = [r for r in rows if r["key"] in FIGURE_ROWS and "failed" not in r]
    figure = None
    if figure_rows:
        summaries = [{**r["summary"], "model": r["model"]} for r in figure_rows]
        title = f"{cfg.dataset}: rank vs item prior interactions"
        if cfg.felrec_preset != "paper":
            title += f" (FELRec preset {cfg.felrec_preset})"
        figure = plot_rank_vs_prior(summaries, out / cfg.output_name("figure2", ".png"), title)
    log.info("experiment_done", table=str(md), rows=len(rows), computed=len(computed))
    return ExperimentResult(rows, md, js, figure, computed)
