"""FELRec modules and losses: shapes, masking, queue, ablation switches, collapse measure."""

import math

import pytest
import torch
import torch.nn.functional as F

from felrec_stream.config import EncoderConfig, ModelConfig
from felrec_stream.model.felrec import FELRec, count_parameters
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
