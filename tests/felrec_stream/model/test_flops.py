"""encoder_flops against a brute-force count of the real encoder's matrix products.

torch.utils.flop_counter.FlopCounterMode counts exactly what encoder_flops counts: mm, addmm, bmm
(2 FLOPs per multiply-add), nothing element-wise. The encoder is counted in training mode with
dropout, where attention on the CPU runs as explicit matmuls (`felrec._attention`); the fused CPU
scaled_dot_product_attention of evaluation has no FLOP formula in torch 2.13 (uncounted there). Both
count the same products, so the tolerance is exact equality.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from felrec_stream.config import EncoderConfig
from felrec_stream.model.felrec import Encoder, length_buckets
from felrec_stream.model.flops import encoder_flops, training_flops

PAPER = EncoderConfig()
SMALL = EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.1)


def _counted(encoder: Encoder, h: torch.Tensor, mask: torch.Tensor, backward: bool) -> int:
    kinds = torch.zeros(h.shape[0], dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = encoder(h, mask, kinds)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("config", [PAPER, SMALL], ids=["paper", "small"])
@pytest.mark.parametrize("rows,length", [(1, 1), (7, 13), (32, 64)])
def test_encoder_flops_match_the_counted_products(config: EncoderConfig, rows: int, length: int) -> None:
    torch.manual_seed(0)
    encoder = Encoder(config).train()
    h = torch.randn(rows, length, config.d_model)
    mask = torch.ones(rows, length, dtype=torch.bool)
    assert _counted(encoder, h, mask, backward=False) == encoder_flops(config, rows, length)
    assert _counted(encoder, h, mask, backward=True) == training_flops(config, rows, length)


def test_bucketed_batch_costs_the_sum_of_its_buckets() -> None:
    """Mixed history lengths: the encoder computes each length bucket padded to its longest."""
    torch.manual_seed(0)
    encoder = Encoder(SMALL).train()
    encoder.bucket_overhead = 4  # cheap buckets: several of them
    lengths = torch.tensor([64, 60, 3, 1, 17, 64, 2, 30, 31, 5])
    positions = torch.arange(64).unsqueeze(0)
    mask = positions >= 64 - lengths.unsqueeze(1)  # right-aligned
    buckets = length_buckets(lengths, encoder.bucket_tokens, encoder.bucket_overhead)
    assert len(buckets) > 1
    expected = sum(encoder_flops(SMALL, b.rows_in(mask), b.length) for b in buckets)
    assert _counted(encoder, torch.randn(10, 64, SMALL.d_model), mask, backward=True) == 3 * expected


def test_formula_by_hand() -> None:
    """d=128, 3 layers, d_ff=256: one sequence of 64 positions."""
    n, D, F = 64, 128, 256
    block = 2 * n * D * 3 * D + 2 * n * D * D + 2 * 2 * n * D * F + 2 * 2 * n * n * D
    assert encoder_flops(PAPER, 1, n) == 3 * block + 2 * D * D == 56_655_872
