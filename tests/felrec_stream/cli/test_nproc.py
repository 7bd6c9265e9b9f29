"""`--nproc` and torchrun: train and evaluate run unchanged as 2 ranks and equal one process
(consume: tests/pipelines/test_worker_distributed.py); any other command refuses with a usage
error instead of running N times (N replays, N brokers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from felrec_stream.cli.group import main
from felrec_stream.state.checkpoint import load_checkpoint


def _usage_error(monkeypatch, capsys, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["felrec-stream", "--log-level", "ERROR", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args", [["--nproc", "2", "broker", "status"],
                                  ["--nproc", "2", "replay", "--dataset", "synthetic", "--topic", "t"]])
def test_nproc_refuses_a_command_that_runs_as_one_process(monkeypatch, capsys, args):
    err = _usage_error(monkeypatch, capsys, *args)
    assert f"`felrec-stream {args[2]}` runs as one process; only train, evaluate, consume" in err


def test_a_rank_under_torchrun_refuses_a_command_that_runs_as_one_process(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = _usage_error(monkeypatch, capsys, "replay", "--dataset", "synthetic", "--topic", "t")
    assert "`felrec-stream replay` runs as one process" in err


# ---- train and evaluate as 2 ranks, launched both ways, equal one process -----------------------

ROOT = Path(__file__).resolve().parents[3]
TINY = {"encoder": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "dropout": 0.0},
        "model": {"queue_size": 64}, "training": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64},
        "eval": {"batch_size": 64, "num_negatives": 20}}
DATA = ["--dataset", "synthetic", "--dataset-option", "n_users=40", "--dataset-option", "n_items=30",
        "--dataset-option", "n_events=600", "--dataset-option", "n_clusters=4"]


def _ranks_cli(launcher: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FELREC_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "FELREC_PARALLEL__TIMEOUT_S": "60"}
    proc = subprocess.run([*launcher, "--log-level", "WARNING", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _single_cli(monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["felrec-stream", "--log-level", "WARNING", *args])
    main()


def _event_ranks(out: Path) -> np.ndarray:
    return pq.read_table(out / "felrec_q__keep.parquet").column("rank").to_numpy()


@pytest.mark.slow
def test_train_under_torchrun_and_evaluate_with_nproc_equal_one_process(monkeypatch, tmp_path):
    """`torchrun ... felrec-stream train` and `felrec-stream --nproc 2 evaluate`, unchanged commands:
    the same validation rank, weights and test ranks as one process (tolerance of
    tests/training/test_train_distributed.py), one writer (rank 0)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    felrec = str(Path(sys.executable).with_name("felrec-stream"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--no-python", felrec]
    train = ["train", *DATA, "--config", str(config), "--device", "cpu", "--out"]
    _ranks_cli(torchrun, [*train, str(tmp_path / "ranks")], tmp_path)
    _single_cli(monkeypatch, [*train, str(tmp_path / "one")])
    got, expected = (json.loads((tmp_path / run / "train_result.json").read_text()) for run in ("ranks", "one"))
    assert got["epochs_completed"] == expected["epochs_completed"] == 1
    assert got["best_val_rank"] == pytest.approx(expected["best_val_rank"], rel=1e-4, abs=1e-6)
    a, b = (load_checkpoint(tmp_path / run / "last.pt").model_state for run in ("ranks", "one"))
    for key, value in b.items():
        torch.testing.assert_close(a[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)

    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "one" / "best.pt"), *DATA, "--baseline", "none", "--out"]
    proc = _ranks_cli([felrec, "--nproc", "2"], [*evaluate, str(tmp_path / "eval_ranks")], tmp_path)
    assert proc.stdout.count("FELRec-Q (keep)") == 1  # rank 0 alone prints the report
    _single_cli(monkeypatch, [*evaluate, str(tmp_path / "eval_one")])
    np.testing.assert_allclose(_event_ranks(tmp_path / "eval_ranks"), _event_ranks(tmp_path / "eval_one"),
                               rtol=0, atol=1e-6)


# ---- how a rank ends ---------------------------------------------------------------------------

_RANK_EXIT = """
import atexit, sys
import torch.distributed as dist
from felrec_stream.cli.group import main
if sys.argv[1] == "rank":  # a job of one rank: what every rank under torchrun has joined
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
atexit.register(lambda: print("teardown ran", flush=True))
main(sys.argv[2:])
"""


@pytest.mark.parametrize("role", ["rank", "single"])
@pytest.mark.parametrize("args,code,out", [(["--version"], 0, "felrec-stream, version"),
                                            (["no-such-command"], 2, "")])
def test_a_rank_leaves_with_its_exit_code_and_output_but_without_the_interpreter_teardown(role, args, code, out):
    """A rank's interpreter teardown could abort it at random (a gloo worker thread releasing the last
    collective's Python objects during finalization: SIGABRT after the last line, and the completed
    job exited 1): ranks leave with os._exit, their exit code and flushed output kept. One process
    (no job joined) ends as before."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RANK_EXIT, role, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert out in proc.stdout
    assert ("teardown ran" in proc.stdout) == (role == "single")
