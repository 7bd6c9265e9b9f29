"""`--nproc` and torchrun: only train, evaluate and consume run as several ranks; any other command
refuses with a usage error instead of running N times (N replays, N brokers)."""

from __future__ import annotations

import sys

import pytest

from felrec_stream.cli.group import main


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
