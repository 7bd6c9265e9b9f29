"""Floating-point operations of the FELRec encoder (pure arithmetic over its config).

Counted: the matrix products, 2 FLOPs per multiply-add (the convention of
`torch.utils.flop_counter.FlopCounterMode` and of matmul peaks). For one bucket of r sequences
of n positions each (N = r n positions; D = d_model, F = d_ff, H heads of D / H), per block:

    QKV projection          2 N D (3 D)
    attention scores q k^T  2 r H n n (D / H) = 2 r n^2 D
    attention weights x V   2 r n^2 D
    output projection       2 N D D
    feed-forward            2 N D F + 2 N F D

so forward = n_layers (8 N D^2 + 4 N D F + 4 r n^2 D) + 2 r D^2 (the final linear layer `fc`,
once per row: it runs on the pooled (B, D) rows, which are the buckets' rows together).

Not counted: the O(N D) element-wise work (LayerNorm, GELU, softmax, dropout, masking, bias and
residual adds, type embedding, pooling) and the output norm; nothing outside the encoder (the
loss, its projection heads and the queue). Backward = 2 x forward: each product's gradient takes
one product for its input and one for its weight (the encoder's input requires grad through the
type embedding, so both are computed). Model FLOPs: a bucket that `ActivationBudget` re-encodes
for backward is counted once.
"""

from __future__ import annotations

from felrec_stream.config import EncoderConfig


def encoder_flops(config: EncoderConfig, rows: int, length: int) -> int:
    """Forward FLOPs of encoding one bucket of `rows` sequences of `length` positions (padding
    included: the encoder computes on it)."""
    D, F, r, n = config.d_model, config.d_ff, rows, length
    N = r * n
    per_block = 2 * N * D * 3 * D + 2 * N * D * D + 4 * N * D * F + 4 * r * n * n * D
    return config.n_layers * per_block + 2 * r * D * D


def training_flops(config: EncoderConfig, rows: int, length: int) -> int:
    """Forward + backward FLOPs of one bucket (backward = 2 x forward)."""
    return 3 * encoder_flops(config, rows, length)
