"""The learning rules of issue 17 at the module level: negatives that are no negatives, the chance
level of the loss, the output norm that is the same function in training and serving, recency pooling."""

import math

import pytest
import torch
import torch.nn.functional as F

from felrec_stream.config import EncoderConfig, ModelConfig, replace
from felrec_stream.model.felrec import Bucket, FELRec, Negatives, recency_weights
from felrec_stream.model.losses import info_nce, info_nce_chance
from felrec_stream.model.norms import RunningNorm, RunningWhitening, adapting_norms

TINY = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_info_nce_exclude_equals_the_loss_without_those_negatives():
    torch.manual_seed(0)
    q, k, queue = _unit(3, 8), _unit(3, 8), _unit(6, 8)
    exclude = torch.tensor([[True, False, False, True, False, False],
                            [False] * 6,
                            [True] * 5 + [False]])
    masked = info_nce(q, k, queue, 0.2, exclude=exclude)
    by_row = [info_nce(q[i:i + 1], k[i:i + 1], queue[~exclude[i]], 0.2) for i in range(3)]
    torch.testing.assert_close(masked, torch.stack(by_row).mean())


def test_chance_is_the_loss_of_a_model_that_cannot_tell_the_positive():
    q = F.normalize(torch.ones(2, 4), dim=-1)  # positive and every negative identical: equal logits
    queue = q[:1].expand(5, 4)
    exclude = torch.tensor([[False] * 5, [True, True, False, False, False]])
    torch.testing.assert_close(info_nce(q, q, queue, 0.5, exclude=exclude), info_nce_chance(5, exclude))
    assert float(info_nce_chance(5, exclude)) == pytest.approx((math.log(6) + math.log(4)) / 2)
    assert float(info_nce_chance(256)) == pytest.approx(math.log(257))
    assert float(info_nce_chance(5, torch.zeros(0, 5, dtype=torch.bool))) == 0.0  # an empty slice


def _model(**kw):
    torch.manual_seed(0)
    return FELRec(TINY, ModelConfig(queue_size=4, use_mlp=False, temperature=0.5, **kw)).train()


def test_queued_events_sharing_the_rows_user_or_item_are_no_negatives():
    """Queue entries remember their event's (user, item): for an event, keys of events with its user
    (the items its user just chose) or its item (its own earlier vector) are left out, in both terms."""
    model = _model()
    model.user_queue.copy_(_unit(4, 16))
    model.item_queue.copy_(_unit(4, 16))
    model.user_queue_ids.copy_(torch.tensor([7, 7, 8, 9]))
    model.item_queue_ids.copy_(torch.tensor([1, 2, 3, 4]))
    queue_u, queue_x = model.user_queue.clone(), model.item_queue.clone()
    u, x = torch.randn(2, 16), torch.randn(2, 16)
    ids = (torch.tensor([7, 5]), torch.tensor([6, 3]))  # event 0: user 7's (entries 0, 1); event 1: item 3 (entry 2)
    loss = model.loss(u, x, ids=ids)
    q_u, q_x = F.normalize(u, dim=1), F.normalize(x, dim=1)
    keep = [torch.tensor([2, 3]), torch.tensor([0, 1, 3])]
    expected = sum(info_nce(q_u[i:i + 1], q_x[i:i + 1], queue_x[keep[i]], 0.5)
                   + info_nce(q_x[i:i + 1], q_u[i:i + 1], queue_u[keep[i]], 0.5) for i in range(2)) / 2
    torch.testing.assert_close(loss, expected)
    assert float(model.chance) == pytest.approx(math.log(3) + math.log(4))
    assert model.user_queue_ids.tolist() == [7, 5, 8, 9] and model.item_queue_ids.tolist() == [6, 3, 3, 4]


def test_cache_negatives_and_cached_positives_replace_the_queue():
    model = _model()
    before = model.user_queue.clone()
    u, x = torch.randn(2, 16), torch.randn(2, 16)
    neg = Negatives(users=torch.randn(5, 16), user_ids=torch.tensor([1, 2, 3, 4, 5]),
                    items=torch.randn(5, 16), item_ids=torch.tensor([9, 8, 7, 6, 5]))
    targets = (torch.randn(2, 16), torch.randn(2, 16))
    ids = (torch.tensor([2, 0]), torch.tensor([0, 5]))
    loss = model.loss(u, x, ids=ids, negatives=neg, targets=targets)
    q_u, q_x = F.normalize(u, dim=1), F.normalize(x, dim=1)
    k_u, k_x = F.normalize(targets[0], dim=1), F.normalize(targets[1], dim=1)
    n_u, n_x = F.normalize(neg.users, dim=1), F.normalize(neg.items, dim=1)
    own_x = torch.tensor([[False] * 5, [False] * 4 + [True]])  # item 5 is row 1's own item
    own_u = torch.tensor([[False, True, False, False, False], [False] * 5])  # user 2 is row 0's own user
    expected = info_nce(q_u, k_x, n_x, 0.5, exclude=own_x) + info_nce(q_x, k_u, n_u, 0.5, exclude=own_u)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.user_queue, before)  # drawn negatives leave the queue alone


@pytest.mark.parametrize("Norm", [RunningNorm, RunningWhitening])
def test_running_norm_is_the_same_function_in_training_and_serving(Norm):
    """Training normalises with the statistics from before the batch (what serving uses), then
    updates them; eval leaves them alone unless adapting (a replay that rebuilds a cache)."""
    torch.manual_seed(0)
    norm = Norm(4)
    for _ in range(200):  # learn the statistics of a shifted, scaled stream
        norm.train()(3 + 2 * torch.randn(64, 4))
    x = 3 + 2 * torch.randn(32, 4)
    served = norm.eval()(x)
    trained = norm.train()(x)
    torch.testing.assert_close(trained, served)
    assert served.mean().abs() < 0.3 and (served.std() - 1).abs() < 0.2  # standardised
    frozen = norm.running_mean.clone()
    norm.eval()(x + 10)
    torch.testing.assert_close(norm.running_mean, frozen)
    with adapting_norms(norm):
        norm.eval()(x + 10)
    assert not torch.allclose(norm.running_mean, frozen)


def test_whitening_decorrelates_the_dimensions():
    torch.manual_seed(0)
    norm = RunningWhitening(3).train()
    mix = torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 2.0]])
    for _ in range(300):
        norm(torch.randn(128, 3) @ mix)
    out = norm.eval()(torch.randn(4096, 3) @ mix)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(3), atol=0.1, rtol=0)


def test_recency_pooling_weighs_the_newest_elements_most():
    torch.manual_seed(0)
    w = recency_weights(5, 2.0, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.5 ** 1.5, 0.5, 0.5 ** 0.5, 1.0]))
    plain = FELRec(TINY, ModelConfig(queue_size=4)).eval()
    recent = FELRec(replace(TINY, pool_halflife=0.01), ModelConfig(queue_size=4)).eval()
    recent.load_state_dict(plain.state_dict())
    h, mask, kinds = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool), torch.tensor([0])
    older_changed = torch.cat([torch.randn(1, 5, 16), h[:, -1:]], dim=1)
    a = recent.encoder.pool(h, mask, kinds, None, Bucket(None, 6))
    b = recent.encoder.pool(older_changed, mask, kinds, None, Bucket(None, 6))
    # tiny half-life: the pooled output is the newest position's (attention still mixes the others in)
    torch.testing.assert_close(a, recent.encoder.norm(recent.encoder.blocks[0](
        h + recent.encoder.type_embedding(kinds).unsqueeze(1), mask[:, None, None, :]))[:, -1])
    assert not torch.allclose(plain.encoder.pool(h, mask, kinds, None, Bucket(None, 6)), a)
    assert not torch.allclose(a, b)  # attention still reads the older elements



def test_unshared_encoders_encode_each_kind_with_its_own_weights():
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(queue_size=4, use_mlp=False, share_encoder=False)).eval()
    shared = FELRec(TINY, ModelConfig(queue_size=4, use_mlp=False)).eval()
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(p.numel() for p in shared.parameters())
    h, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    users, items = model.encode_kind(h, mask, 0), model.encode_kind(h, mask, 1)
    kinds = torch.full((3,), 1)
    torch.testing.assert_close(items, model.item_encoder(h, mask, kinds))
    torch.testing.assert_close(users, model.encoder(h, mask, torch.zeros(3, dtype=torch.long)))


def test_the_user_term_alone_leaves_the_item_encoder_untrained():
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(queue_size=4, use_mlp=False, share_encoder=False, loss_terms="user")).train()
    h, mask = torch.randn(4, 5, 16), torch.ones(4, 5, dtype=torch.bool)
    u, x = model.encode_kind(h, mask, 0), model.encode_kind(h.flip(1), mask, 1)
    model.loss(u, x).backward()
    assert all(p.grad is None for p in model.item_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert float(model.chance) == pytest.approx(math.log(5))
