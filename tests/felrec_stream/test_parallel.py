"""felrec_stream.parallel on 2 gloo ranks: row slices and gathers, BatchNorm with the whole batch's
statistics, summed gradients, rank 0's input and errors, replica checks, a hung rank's timeout."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from felrec_stream import parallel
from felrec_stream.errors import DatasetError, ParallelError
from felrec_stream.model.norms import KindNorm
from felrec_stream.parallel import Ranks, SyncedBatchNorm, sync_batch_norms
from tests.distributed import run_ranks

ROWS = 7


def _norms() -> dict[str, nn.BatchNorm1d]:
    torch.manual_seed(0)
    affine = nn.BatchNorm1d(4)  # the heads' kind: affine, momentum 0.1, counts batches
    affine.weight.data.uniform_(0.5, 1.5)
    affine.bias.data.uniform_(-0.5, 0.5)
    return {"affine": affine, "kind": KindNorm(4), "cumulative": nn.BatchNorm1d(4, momentum=None)}


def _inputs(rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return 3.0 + 2.0 * torch.randn(rows, 4, generator=g), torch.randn(rows, 4, generator=g)  # large shared mean


def _norm_step(norm: nn.Module, x: torch.Tensor, w: torch.Tensor, ranks: Ranks | None) -> dict[str, torch.Tensor]:
    """Two training forwards (running statistics move twice) and one backward of (y * w).sum()."""
    x = x.clone().requires_grad_(True)
    norm(x.detach())
    y = norm(x)
    (y * w).sum().backward()
    params = [p for p in norm.parameters()]
    if ranks is not None:
        ranks.sum_gradients(params)
    return {"y": y.detach(), "x_grad": x.grad, "param_grads": [p.grad for p in params],
            **{name: b.clone() for name, b in norm.named_buffers()}}


def _slice(ranks: Ranks, n: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t[ranks.span(n)] for t in tensors]


def _scenarios(ranks: Ranks, tmp: str) -> dict:
    out: dict = {"rank": ranks.rank, "size": ranks.size}
    for n in (5, 1, 0):  # uneven spans; a rank without rows; no rows at all
        mine = torch.arange(n, dtype=torch.float32).repeat(2, 1).T[ranks.span(n)]  # (b, 2)
        out[f"gather_{n}"] = ranks.gather_rows(mine, n)
    for name, norm in _norms().items():
        synced = SyncedBatchNorm(copy.deepcopy(norm), ranks).train()
        x, w = _inputs()
        out[f"norm_{name}"] = _norm_step(synced, *_slice(ranks, ROWS, x, w), ranks)
    kind = nn.Sequential(KindNorm(4))  # one row in the whole batch: running statistics, nothing moves
    assert sync_batch_norms(kind, ranks) == 1 and isinstance(kind[0], SyncedBatchNorm)
    out["norm_one_row"] = _norm_step(kind[0].train(), *_slice(ranks, 1, *_inputs(1)), ranks)

    torch.manual_seed(2)
    used_by_all, used_by_rank0, unused = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    loss = used_by_all(torch.full((1, 3), float(ranks.rank + 1))).sum()
    if ranks.rank == 0:
        loss = loss + used_by_rank0(torch.ones(1, 3)).sum()
    loss.backward()
    ranks.sum_gradients(list(used_by_all.parameters()) + list(used_by_rank0.parameters()) + list(unused.parameters()))
    out["grads"] = [[None if p.grad is None else p.grad.clone() for p in m.parameters()]
                    for m in (used_by_all, used_by_rank0, unused)]

    out["from_leader"] = ranks.from_leader(lambda: {"table": [1, 2, 3]})
    try:
        ranks.from_leader(_bad_file)
    except DatasetError as exc:
        out["leader_error"] = str(exc)
    ranks.agree({"vectors": torch.ones(3)}, "equal states")
    try:
        ranks.agree({"vectors": torch.full((3,), float(ranks.rank))}, "test states")
    except ParallelError as exc:
        out["diverged"] = str(exc)
    out["timeout"] = _hung_peer(ranks, Path(tmp))
    return out


def _bad_file() -> None:
    raise DatasetError("data.csv line 3: empty user id")


def _hung_peer(ranks: Ranks, tmp: Path) -> str | None:
    """Rank 1 stays alive but skips a collective until rank 0 reports; rank 0 must time out."""
    short = dist.new_group(backend="gloo", timeout=__import__("datetime").timedelta(seconds=2))
    quick = Ranks(ranks.rank, ranks.size, ranks.local_rank, 2.0, short, short)
    flag = tmp / "rank0_timed_out"
    if ranks.rank == 1:
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    try:
        quick.sum(1.0)
        message = None
    except ParallelError as exc:
        message = str(exc)
    flag.write_text("done")
    return message


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("parallel")
    return run_ranks(_scenarios, 2, tmp, str(tmp))


def test_gather_rows_reassembles_uneven_slices_in_row_order(results):
    for n in (5, 1, 0):
        expected = torch.arange(n, dtype=torch.float32).repeat(2, 1).T
        for r in results:
            assert torch.equal(r[f"gather_{n}"], expected), (n, r["rank"])


@pytest.mark.parametrize("name", ["affine", "kind", "cumulative"])
def test_synced_batch_norm_equals_batch_norm_on_the_whole_batch(results, name):
    """Outputs, input and parameter gradients, running statistics (twice moved) and the batch count
    of the 2-rank norm equal one BatchNorm over all rows (float64 moments: ~1e-7 apart)."""
    x, w = _inputs()
    expected = _norm_step(_norms()[name].train(), x, w, None)
    for r in results:
        got, span = r[f"norm_{name}"], slice(ROWS * r["rank"] // 2, ROWS * (r["rank"] + 1) // 2)
        torch.testing.assert_close(got["y"], expected["y"][span], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["x_grad"], expected["x_grad"][span], rtol=0, atol=1e-5)
        for mine, full in zip(got["param_grads"], expected["param_grads"]):
            torch.testing.assert_close(mine, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["running_mean"], expected["running_mean"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["running_var"], expected["running_var"], rtol=1e-5, atol=1e-6)
        assert int(got["num_batches_tracked"]) == int(expected["num_batches_tracked"])


def test_a_single_row_in_the_whole_batch_reads_the_running_statistics(results):
    x, w = _inputs(1)
    expected = _norm_step(KindNorm(4).train(), x, w, None)
    rank0, rank1 = results
    assert rank0["norm_one_row"]["y"].shape == (0, 4)  # the rank without rows took part, nothing hung
    torch.testing.assert_close(rank1["norm_one_row"]["y"], expected["y"], rtol=0, atol=1e-6)
    assert torch.equal(rank1["norm_one_row"]["running_mean"], torch.zeros(4))  # unchanged


def test_gradients_are_summed_and_a_parameter_no_rank_used_keeps_none(results):
    torch.manual_seed(2)
    used_by_all, used_by_rank0 = nn.Linear(3, 2), nn.Linear(3, 2)
    total = used_by_all(torch.full((1, 3), 1.0)).sum() + used_by_all(torch.full((1, 3), 2.0)).sum()
    (total + used_by_rank0(torch.ones(1, 3)).sum()).backward()
    for r in results:
        all_grads, rank0_grads, unused_grads = r["grads"]
        params = list(used_by_all.parameters()) + list(used_by_rank0.parameters())
        for got, param in zip(all_grads + rank0_grads, params):
            torch.testing.assert_close(got, param.grad, rtol=0, atol=1e-6)
        assert unused_grads == [None, None]  # SGD then leaves it and its momentum alone, as in one process


def test_rank_0_reads_and_its_errors_reach_every_rank(results):
    for r in results:
        assert r["from_leader"] == {"table": [1, 2, 3]}
        assert r["leader_error"] == "data.csv line 3: empty user id"


def test_diverged_replicas_stop_every_rank(results):
    for r in results:
        assert "test states differ" in r["diverged"]


def test_a_hung_rank_fails_the_collective_after_the_timeout(results):
    message = results[0]["timeout"]
    assert message is not None and message.startswith("rank 0 of 2: all_reduce failed"), message
    assert "\n" not in message  # one line for the CLI


def test_one_process_under_the_launcher_runs_the_single_process_code(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert parallel.init() is None  # so every hook is skipped: N = 1 is bit for bit one process
    monkeypatch.delenv("WORLD_SIZE")
    assert parallel.init() is None
