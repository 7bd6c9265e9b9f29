"""FELRec modules and losses: shapes, masking, queue, ablation switches, collapse measure."""

import math

import pytest
import torch
import torch.nn.functional as F

from felrec_stream.config import EncoderConfig, ModelConfig
from felrec_stream.model.felrec import ActivationBudget, Bucket, FELRec, count_parameters, length_buckets
from felrec_stream.model.losses import byol_loss, info_nce, representation_spread

TINY = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)


def test_paper_defaults():
    enc, mdl = EncoderConfig(), ModelConfig()
    assert (enc.d_model, enc.n_layers, enc.n_heads, enc.d_ff, enc.dropout) == (128, 3, 4, 256, 0.1)
    assert (mdl.queue_size, mdl.temperature, mdl.proj_hidden, mdl.proj_out) == (8192, 0.07, 256, 64)


def test_padding_does_not_change_the_representation():
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(queue_size=8)).eval()
    seq = torch.randn(1, 3, 16)
    padded = torch.cat([torch.randn(1, 2, 16) * 100, seq], dim=1)  # garbage under the mask
    mask = torch.tensor([[False, False, True, True, True]])
    kinds = torch.tensor([1])
    a = model.encoder(seq, torch.ones(1, 3, dtype=torch.bool), kinds)
    b = model.encoder(padded, mask, kinds)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encoder_is_bidirectional_and_order_invariant_without_positions():
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(queue_size=8)).eval()
    seq = torch.randn(1, 4, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    kinds = torch.tensor([0])
    torch.testing.assert_close(model.encoder(seq, mask, kinds), model.encoder(seq.flip(1), mask, kinds),
                               rtol=1e-4, atol=1e-5)


def test_type_embedding_distinguishes_user_and_item_sequences_and_can_be_ablated():
    torch.manual_seed(0)
    seq, mask = torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool)
    model = FELRec(TINY, ModelConfig(queue_size=8)).eval()
    assert not torch.allclose(model.encoder(seq, mask, torch.tensor([0])), model.encoder(seq, mask, torch.tensor([1])))
    no_type = FELRec(EncoderConfig(**{**TINY.__dict__, "type_embedding": False}), ModelConfig(queue_size=8)).eval()
    torch.testing.assert_close(no_type.encoder(seq, mask, torch.tensor([0])),
                               no_type.encoder(seq, mask, torch.tensor([1])))


def test_info_nce_equals_cross_entropy_by_hand():
    torch.manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 8), dim=1) for n in (4, 4, 6))
    T = 0.07
    expected = 0.0
    for i in range(4):
        logits = torch.cat([(q[i] * k[i]).sum().view(1), queue @ q[i]]) / T
        expected += -torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(info_nce(q, k, queue, T), expected / 4)


def test_info_nce_of_identical_vectors_is_ln_k_plus_1():
    """The collapse signature measured on the paper's code: loss = ln(K+1) per direction."""
    v = F.normalize(torch.ones(4, 8), dim=1)
    queue = v[:1].repeat(10, 1)
    assert info_nce(v, v, queue, 0.07).item() == pytest.approx(math.log(11), rel=1e-5)


def test_byol_loss_range():
    x = torch.randn(5, 8)
    assert byol_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-5)


def test_representation_spread_detects_collapse():
    assert representation_spread(torch.ones(10, 8)).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    assert representation_spread(torch.randn(1000, 8)).item() > 0.9
    assert representation_spread(torch.zeros(10, 8)).item() == 0.0  # never-written entries ignored


def test_queue_is_a_ring_buffer_for_any_batch_size():
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(queue_size=5)).train()
    u, x = torch.randn(3, 16), torch.randn(3, 16)
    model.loss(u, x)
    model.loss(u, x)
    assert int(model.queue_ptr) == 1  # 6 keys written into 5 slots


@pytest.mark.parametrize("kw", [{}, {"share_mlp": True}, {"use_mlp": False}, {"norm": "layer"}])
@pytest.mark.parametrize("variant", ["q", "p"])
def test_ablations_build_and_train(variant, kw):
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(variant=variant, queue_size=16, **kw)).train()
    u, x = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    loss = model.loss(u, x)
    loss.backward()
    assert torch.isfinite(loss) and u.grad is not None
    if kw.get("share_mlp"):
        assert model.user_projection is model.item_projection


def test_parameter_count_does_not_depend_on_the_catalog():
    assert (count_parameters(FELRec(EncoderConfig(), ModelConfig()))
            == count_parameters(FELRec(EncoderConfig(), ModelConfig())))
    assert count_parameters(FELRec(EncoderConfig(), ModelConfig()).encoder) < 500_000


# Bucketed encoding: rows grouped by history length, each bucket trimmed to its longest history.
REF = EncoderConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, positions="reversed_sinusoidal",
                    norm_first=False, empty_history="learned", output_norm="batch")


def _histories(lengths: list[int], n: int = 12, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-aligned histories of the given lengths with garbage under the padding, as the engine
    builds them: an empty history is one valid input (its last position), flagged in `empty`."""
    torch.manual_seed(1)
    h = torch.randn(len(lengths), n, d)
    mask = torch.arange(n).flip(0)[None, :] < torch.tensor(lengths).clamp(min=1)[:, None]  # (R, n)
    h = torch.where(mask.unsqueeze(-1), h, 100 * torch.randn_like(h))
    return h, mask, torch.tensor(lengths) == 0


@pytest.mark.parametrize("config", [TINY, REF], ids=["default", "reference_options"])
@pytest.mark.parametrize("max_tokens", [0, 20])  # 20: long buckets are split
def test_bucketed_encoding_equals_the_padded_pass(config, max_tokens):
    """Tolerance: float rounding only (rtol 1e-4, atol 1e-5); every row, in its original order."""
    lengths = [12, 1, 3, 0, 12, 7, 2, 3, 9, 1, 0, 5, 12, 4]
    h, mask, empty = _histories(lengths)
    kinds = torch.tensor([0, 1] * 7)
    model = FELRec(config, ModelConfig(queue_size=8)).train()  # train: the output norm uses batch statistics
    model.encoder.bucket_tokens, model.encoder.bucket_overhead = max_tokens, 1
    assert len(length_buckets(mask.sum(1), max_tokens, 1)) > 3
    bucketed = model.encoder(h, mask, kinds, empty)
    padded = model.encoder.head(model.encoder.pool(h, mask, kinds, empty, Bucket(None, h.shape[1])), kinds)
    torch.testing.assert_close(bucketed, padded, rtol=1e-4, atol=1e-5)


def test_length_buckets_cover_every_row_once_and_trade_padding_against_overhead():
    lengths = torch.tensor([64] * 10 + [5] * 500 + [6] * 3)
    cheap, dear = length_buckets(lengths, overhead=1), length_buckets(lengths, overhead=10**9)
    assert [b.length for b in cheap] == [64, 6, 5] and [b.length for b in dear] == [64]
    for buckets in (cheap, dear, length_buckets(lengths, max_tokens=700, overhead=1)):
        rows = torch.cat([torch.arange(len(lengths)) if b.rows is None else b.rows for b in buckets])
        assert sorted(rows.tolist()) == list(range(len(lengths)))
        assert all(int(lengths[b.rows].max()) <= b.length for b in buckets if b.rows is not None)


def test_activation_budget_gives_the_gradients_of_the_plain_step():
    """Buckets beyond the budget are encoded again during backward with the same dropout masks:
    same loss, same gradients (up to float rounding), and the random stream continues as without it."""
    config = EncoderConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.3, empty_history="learned")
    h, mask, empty = _histories([12, 1, 3, 0, 12, 7, 2, 3, 9, 1, 0, 5])
    model = FELRec(config, ModelConfig(queue_size=8)).train()
    model.encoder.bucket_overhead = 1
    start = {k: v.clone() for k, v in model.state_dict().items()}  # the loss moves the queue on

    def step(budget, seed=0):
        model.load_state_dict(start)
        torch.manual_seed(seed)
        model.zero_grad()
        u = model.encode_kind(h, mask, 0, empty, budget)
        x = model.encode_kind(h.flip(0), mask.flip(0), 1, empty.flip(0), budget)
        loss = model.loss(u, x)
        loss.backward()
        if budget is not None:
            budget.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, \
            torch.rand(1)

    plain, bounded = step(None), step(ActivationBudget(1))  # 1 byte: every bucket is deferred
    torch.testing.assert_close(bounded[0], plain[0])
    assert bounded[1].keys() == plain[1].keys() and "encoder.prior" in plain[1]
    for key in plain[1]:
        torch.testing.assert_close(bounded[1][key], plain[1][key], rtol=1e-4, atol=1e-6, msg=key)
    assert torch.equal(bounded[2], plain[2])
    other_masks = step(None, seed=1)[1]  # other dropout masks, other gradients: the check above can fail
    assert not torch.allclose(other_masks["encoder.fc.weight"], plain[1]["encoder.fc.weight"], rtol=1e-2)
