"""The experiment harness: row parsing, FELRec switches, the table renderer, resumability, CLI."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from felrec_stream.config import PRESETS, EvalConfig, replace
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.errors import ConfigError
from training.experiment import (ExperimentConfig, ablation_is_noop, expand_models, felrec_setup, format_params,
                                 parse_row, run_experiment, table_json, table_markdown)

EVAL = EvalConfig(batch_size=256, num_negatives=50)


@pytest.fixture(scope="module")
def events():
    return generate(SyntheticConfig(n_users=120, n_items=80, n_events=3000, seed=5)).events


def test_rows_parse_and_expand():
    assert parse_row("felrec-q").family == "felrec" and parse_row("felrec-q").train_key == "felrec-q"
    ln = parse_row("felrec-p-ln")
    assert (ln.variant, ln.extra, ln.display, ln.train_key) == ("p", "ln", "FELRec-P-LN", "felrec-p-ln")
    assert parse_row("felrec-q-nn").train_key == "felrec-q" and parse_row("felrec-q-reset").train_key == "felrec-q"
    assert parse_row("FELRec-Q-noMLP").display == "FELRec-Q-noMLP"
    assert parse_row("jodie").display == "JODIE*" and parse_row("popularity").family == "popularity"
    for bad in ("felrec-x", "felrec-q-foo", "svd"):
        with pytest.raises(ConfigError):
            parse_row(bad)
    every = expand_models(["all"], zero_shot=False)
    assert "felrec-q-zero" not in every and "felrec-p-notype" in every and "popularity" in every
    assert "felrec-q-zero" in expand_models(["all"], zero_shot=True)
    assert expand_models(["sasrec", "sasrec", "bpr-mf"], False) == ["sasrec", "bpr-mf"]


def test_felrec_ablation_switches():
    base = felrec_setup("small", "q", None, 0)
    assert felrec_setup("small", "q", "ln", 0).model.norm == "layer" and base.model.norm == "batch"
    assert felrec_setup("small", "p", "nomlp", 0).model.use_mlp is False
    assert felrec_setup("small", "q", "sharemlp", 0).model.share_mlp is True
    assert felrec_setup("small", "q", "notype", 0).encoder.type_embedding is False
    assert (felrec_setup("paper", "p", None, 3).model.variant == "p"
            and felrec_setup("paper", "p", None, 3).training.seed == 3)
    assert felrec_setup("paper", "q", None, 0).encoder.d_model == 128
    with pytest.raises(ConfigError):
        felrec_setup("huge", "q", None, 0)


def test_serve_preset_configs():
    """The serve recipe at every size, from config.PRESETS; ablations on top."""
    for size in ("tiny", "small", "paper"):
        s = felrec_setup(size, "q", None, 4, "serve")
        assert s.encoder.output_norm == "running" and s.model.use_mlp is False and s.model.variant == "q"
        assert s.model.share_encoder is False and s.model.mask_own_negatives is True
        assert (s.model.temperature, s.model.queue_size) == (0.5, 256)
        assert (s.training.warmup_epochs, s.training.batch_size, s.training.seed) == (0, 256, 4)
        assert felrec_setup(size, "q", None, 4).model.use_mlp is True  # paper preset unchanged
    small = felrec_setup("small", "p", None, 0, "serve")
    enc = PRESETS["small"]["encoder"]
    assert (small.encoder.d_model, small.encoder.n_layers, small.encoder.n_heads, small.encoder.d_ff) == (
        enc["d_model"], enc["n_layers"], enc["n_heads"], enc["d_ff"]) == (32, 1, 2, 64)
    assert small.training.epochs == 5 and small.training.lr == 0.01 and small.model.variant == "p"
    assert felrec_setup("paper", "q", None, 0, "serve").encoder.d_model == 128
    tiny = felrec_setup("tiny", "q", None, 0, "serve")
    assert tiny.encoder.d_model == felrec_setup("tiny", "q", None, 0).encoder.d_model == 16

    notype = felrec_setup("small", "q", "notype", 0, "serve")
    assert notype.encoder.type_embedding is False and notype.encoder.output_norm == "running"
    init = felrec_setup("small", "q", "init", 0, "serve")  # the learning control: the base recipe, no step
    assert init.training.frozen and replace(init.training, frozen=False) == felrec_setup("small", "q", None, 0,
                                                                                          "serve").training
    assert felrec_setup("small", "q", "ln", 0, "serve").model.norm == "layer"
    base = felrec_setup("small", "q", None, 0, "serve")
    assert all(ablation_is_noop(base, e) for e in ("ln", "sharemlp", "nomlp"))
    assert not any(ablation_is_noop(base, e) for e in (None, "notype", "reset", "nn", "zero"))
    assert not ablation_is_noop(felrec_setup("small", "q", None, 0), "ln")  # paper heads: a real ablation
    with pytest.raises(ConfigError, match="preset"):
        felrec_setup("small", "q", None, 0, "huge")
    with pytest.raises(ConfigError, match="preset"):
        ExperimentConfig("x", felrec_preset="huge")


def test_presets_are_keyed_separately_and_share_baselines(events, tmp_path):
    models = ("popularity", "felrec-q", "felrec-q-ln", "felrec-q-notype")
    paper = run_experiment(events, ExperimentConfig("synthetic", models=models[:2], size="tiny", eval=EVAL), tmp_path)
    assert paper.computed == ["popularity", "felrec-q"]
    paper_md = paper.table_md.read_text()

    cfg = ExperimentConfig("synthetic", models=models, size="tiny", eval=EVAL, felrec_preset="serve")
    stable = run_experiment(events, cfg, tmp_path)
    assert stable.computed == ["felrec-q", "felrec-q-ln", "felrec-q-notype"]  # popularity reused
    results, ckpts = tmp_path / "results", tmp_path / "checkpoints"
    assert {p.name for p in results.glob("*.json")} == {
        "popularity.json", "felrec-q.json", "felrec-q@serve.json", "felrec-q-ln@serve.json",
        "felrec-q-notype@serve.json"}
    assert {p.name for p in ckpts.iterdir()} == {"felrec-q", "felrec-q@serve", "felrec-q-notype@serve"}
    assert stable.table_md.name == "table-serve.md" and (tmp_path / "table.md").read_text() == paper_md

    rows = {r["key"]: r for r in stable.rows}
    q, ln, notype = rows["felrec-q"], rows["felrec-q-ln"], rows["felrec-q-notype"]
    assert q["felrec_preset"] == "serve" and q["result_key"] == "felrec-q@serve"
    assert q["config"]["encoder"]["output_norm"] == "running" and q["config"]["model"]["use_mlp"] is False
    assert (q["config"]["model"]["temperature"], q["config"]["model"]["queue_size"]) == (0.5, 256)
    assert q["config"]["training"]["batch_size"] == 256 and q["config"]["training"]["warmup_epochs"] == 0
    assert notype["config"]["encoder"]["type_embedding"] is False
    assert ln["train"]["same_model_as"] == "felrec-q" and ln["train"]["checkpoint"] == q["train"]["checkpoint"]
    assert ln["summary"]["partitions"] == q["summary"]["partitions"] and ln["summary"]["total"] == q["summary"]["total"]
    paper_q = json.loads((results / "felrec-q.json").read_text())
    assert paper_q["config"]["model"]["use_mlp"] is True and paper_q["summary"]["total"] != q["summary"]["total"]
    md = stable.table_md.read_text()
    assert 'FELRec rows: preset "serve"' in md and "FELRec-Q-LN: -LN" in md and "not ablations" in md
    chosen = q["config"]["cache"]["popularity_halflife"]  # chosen in training, recorded from the checkpoint
    assert chosen > 0 and f"(FELRec-Q: {chosen:g} events, w {q['config']['scoring']['popularity_weight']:g})" in md
    assert json.loads(stable.table_json.read_text())["felrec_preset"] == "serve"

    assert run_experiment(events, cfg, tmp_path).computed == []  # resumable per preset
    (results / "felrec-q@serve.json").rename(results / "moved.json")
    (results / "felrec-q.json").rename(results / "felrec-q@serve.json")  # a paper row under a stable key
    with pytest.raises(ConfigError, match="preset 'paper'"):
        run_experiment(events, cfg, tmp_path)


def test_nan_validation_scores_end_a_baseline_like_divergence(events, monkeypatch):
    """A baseline scoring NaN at validation: fit stops and keeps the earlier epoch (not a crash, not rank < 0)."""
    import torch

    from felrec_stream.data.split import chronological_split
    from training.baselines import build_baseline, fit, make_config
    from training.experiment import _validation_rank

    split = chronological_split(events, 0.1, 0.1)
    adapter = build_baseline("bpr-mf", make_config("bpr-mf", "tiny", epochs=4, eval_every=1), split.train)
    epochs, real_train, real_score = [], adapter.train_epoch, type(adapter).score_batch

    def train_epoch(train):
        epochs.append(1)
        return real_train(train)

    def score_batch(self, batch, catalog):
        scores = real_score(self, batch, catalog)
        return scores if len(epochs) < 2 else torch.full_like(scores, float("nan"))

    monkeypatch.setattr(adapter, "train_epoch", train_epoch)
    monkeypatch.setattr(type(adapter), "score_batch", score_batch)
    fitted = fit(adapter, split.train, lambda m: _validation_rank(m, split, EVAL, 64))
    assert fitted.best_epoch == 1 and 0 <= fitted.best_val_rank <= 1
    assert len(fitted.history) == 2 and math.isnan(fitted.history[1]["val_rank"])


def _summary(served, ranks, total):
    parts = {}
    shares = {"observed": 0.6, "new_user": 0.3, "new_item": 0.05, "first_item": 0.05}
    for name, share in shares.items():
        ok = name in served
        parts[name] = {"count": int(share * 100), "share": share, "served": ok,
                       "rank": ranks.get(name) if ok else None, "hit_rate": 0.5 if ok else None}
    return {"model": "x", "protocol": "serve", "exclude_recent": 64, "hr_k": 10, "num_negatives": 100, "n_events": 100,
            "served": sorted(served),
            "partitions": parts, "total": {"count": 100, "share": 1.0, "served": True, "rank": total, "hit_rate": 0.5}}


def test_table_renderer_on_fixed_inputs():
    rows = [
        {"key": "felrec-q", "model": "FELRec-Q", "params": 123_456, "params_grow": False,
         "summary": _summary({"observed", "new_user", "new_item", "first_item"},
                             {"observed": 0.1, "new_user": 0.2, "new_item": 0.3, "first_item": 0.6}, 0.15)},
        {"key": "bpr-mf", "model": "BPR-MF", "params": 2_500_000, "params_grow": True,
         "summary": _summary({"observed"}, {"observed": 0.125}, 0.125)},
    ]
    md = table_markdown(rows, "toy")
    lines = md.splitlines()
    assert lines[0] == "**toy** — 100 test events, protocol serve, already-seen items excluded (last 64)"
    assert "observed (60.0%) rank ↓" in lines[2] and "new users (30.0%)" in lines[2] and "new items (5.0%)" in lines[2]
    assert "first interaction of an item (5.0%)" in lines[2]
    assert lines[4] == ("| FELRec-Q | 123.5K | 0.100 | 0.500 | 0.200 | 0.500 | 0.300 | 0.500 | 0.600 | 0.500 | 0.150 "
                        "| 0.500 |")
    assert lines[5] == "| BPR-MF | 2.50M+ | 0.125 | 0.500 | – | – | – | – | – | – | 0.125† | 0.500† |"
    data = table_json(rows, ExperimentConfig("toy"))
    assert data["rows"][1]["partitions"]["new_user"]["rank"] is None
    assert format_params(999, False) == "999" and format_params(1000, True) == "1.0K+"


def test_cooccurrence_row_chooses_its_settings_on_validation(events, tmp_path, monkeypatch):
    from training import experiment

    monkeypatch.setattr(experiment, "COOCCURRENCE_GRID", {"window": (1, 10), "history": (4,), "halflife": (2.0, 0.0)})
    result = run_experiment(events, ExperimentConfig("synthetic", models=("cooccurrence",), size="tiny", eval=EVAL),
                            tmp_path)
    row = result.rows[0]
    assert row["model"] == "Co-occurrence (item-kNN)" and row["params"] == 0
    grid = row["train"]["grid"]
    assert len(grid) == 4 * len(experiment.COOCCURRENCE_PRIOR_WEIGHTS)
    best = min(grid, key=lambda g: g["val_rank"])
    assert {k: row["config"][k] for k in ("window", "history", "halflife", "prior_weight")} == \
        {k: best[k] for k in ("window", "history", "halflife", "prior_weight")}
    assert row["summary"]["total"]["rank"] is not None and row["summary"]["exclude_recent"] == 64
    assert "| Co-occurrence (item-kNN) |" in result.table_md.read_text()
    mismatched = ExperimentConfig("synthetic", models=("cooccurrence",), size="tiny", eval=EVAL, exclude_recent=0)
    with pytest.raises(ConfigError, match="last 64 items excluded"):  # a finished row of another rule
        run_experiment(events, mismatched, tmp_path)


def test_runner_is_resumable(events, tmp_path):
    cfg = ExperimentConfig("synthetic", models=("popularity", "bpr-mf", "felrec-q", "felrec-q-reset"), size="tiny",
                           eval=EVAL)
    first = run_experiment(events, cfg, tmp_path)
    assert first.computed == ["popularity", "bpr-mf", "felrec-q", "felrec-q-reset"]
    results = tmp_path / "results"
    stamps = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    checkpoint = tmp_path / "checkpoints" / "felrec-q" / "best.pt"
    assert checkpoint.is_file() and not (tmp_path / "checkpoints" / "felrec-q-reset").exists()
    ckpt_stamp = checkpoint.stat().st_mtime_ns
    table = first.table_md.read_text()

    second = run_experiment(events, cfg, tmp_path)
    assert second.computed == []
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == stamps
    assert second.table_md.read_text() == table

    (results / "felrec-q-reset.json").unlink()
    third = run_experiment(events, cfg, tmp_path)
    assert third.computed == ["felrec-q-reset"] and checkpoint.stat().st_mtime_ns == ckpt_stamp
    assert third.figure is not None and third.figure.stat().st_size > 0
    row = json.loads((results / "felrec-q.json").read_text())
    assert row["params"] > 0 and row["params_grow"] is False and row["train"]["best_epoch"] >= 1
    per_event = pq.read_table(results / "bpr-mf.parquet").to_pylist()
    assert len(per_event) == row["summary"]["n_events"]
    unserved = [e for e in per_event if e["partition"] != "observed"]
    assert unserved and all(e["rank"] is None and e["hit"] is None for e in unserved)
    assert all(e["rank"] is not None for e in per_event if e["partition"] == "observed")
    bpr = json.loads((results / "bpr-mf.json").read_text())["summary"]
    assert bpr["partitions"]["new_user"]["rank"] is None and bpr["partitions"]["new_item"]["rank"] is None
    assert "| BPR-MF |" in table and "| – | – | – | – |" in table


def test_zero_shot_rows(events, tmp_path):
    cfg = ExperimentConfig("synthetic", models=("felrec-p-zero",), size="tiny", eval=EVAL, zero_shot_dataset="other")
    with pytest.raises(ConfigError, match="zero-shot"):
        run_experiment(events, cfg, tmp_path)
    other = generate(SyntheticConfig(n_users=60, n_items=50, n_events=1500, seed=9)).events
    result = run_experiment(events, cfg, tmp_path, zero_shot_events=other)
    row = result.rows[0]
    assert row["train"]["trained_on"] == "other" and row["train"]["mode"] == "zero-shot"
    assert row["summary"]["total"]["rank"] is not None


def test_cli_experiment(events, tmp_path):
    from felrec_stream.cli import cli

    data = tmp_path / "events.parquet"
    pq.write_table(events, data)
    out = tmp_path / "run"
    args = ["experiment", "--dataset", "parquet", "--path", str(data), "--models", "popularity,bpr-mf",
            "--size", "tiny", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| Popularity |" in result.output and (out / "table.json").is_file()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "nothing (all rows were finished)" in again.output
    stable = CliRunner().invoke(cli, args + ["--felrec-preset", "serve"])
    assert stable.exit_code == 0 and (out / "table-serve.md").is_file()
    assert "nothing (all rows were finished)" in stable.output  # baselines are shared between presets
    assert CliRunner().invoke(cli, args + ["--felrec-preset", "huge"]).exit_code != 0


def test_cli_experiment_on_a_csv_with_its_own_column_names(events, tmp_path, monkeypatch):
    """--dataset-option maps the columns; the table and the default folder are named after the file."""
    import pyarrow.csv as pacsv

    from felrec_stream.cli import cli

    own = events.select(["user", "item", "timestamp"]).rename_columns(["uid", "movie", "ts"])
    pacsv.write_csv(own, tmp_path / "my-clicks.csv")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["experiment", "--dataset", "csv", "--path", "my-clicks.csv",
                                      "--dataset-option", "user=uid", "--dataset-option", "item=movie",
                                      "--dataset-option", "timestamp=ts", "--models", "popularity", "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"**my-clicks.csv** — {len(events) // 10} test events")
    assert (tmp_path / "runs" / "experiment-my-clicks.csv-tiny" / "table.md").is_file()
    bad = CliRunner().invoke(cli, ["experiment", "--dataset", "csv", "--path", "my-clicks.csv",
                                   "--dataset-option", "user"])
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output


def test_failed_row_is_shown_without_numbers_and_retried(events, tmp_path, monkeypatch):
    from felrec_stream.errors import TrainingError
    import training.experiment as experiment

    def collapse(*args, **kwargs):
        raise TrainingError("representation collapse")

    monkeypatch.setattr(experiment, "_run_felrec", collapse)
    cfg = ExperimentConfig("synthetic", models=("felrec-q", "popularity"), size="tiny", eval=EVAL)
    result = run_experiment(events, cfg, tmp_path)
    assert result.computed == ["popularity"] and not (tmp_path / "results" / "felrec-q.json").exists()
    md = result.table_md.read_text()
    assert "| FELRec-Q (failed) | – | – | – | – | – | – | – | – | – |" in md
    assert "- FELRec-Q failed: representation collapse" in md
    assert json.loads(result.table_json.read_text())["rows"][1]["failed"] == "representation collapse"
    monkeypatch.undo()
    assert run_experiment(events, cfg, tmp_path).computed == ["felrec-q"]  # retried, popularity kept
