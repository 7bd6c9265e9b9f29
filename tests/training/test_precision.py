"""training.precision (issue 21): bf16 autocast around the encoder in training steps, fp32 everywhere
else; the default fp32 path unchanged; refused on a CPU without bf16 matmul units.

Where the CPU has no bf16 units torch emulates bf16: the bf16 tests still run (tiny models), only slower."""

import copy

import pytest
import torch

from felrec_stream import device as device_mod
from felrec_stream.config import CacheConfig, Configs, EncoderConfig, ModelConfig, TrainingConfig
from felrec_stream.data import synthetic
from felrec_stream.errors import ConfigError, FelrecError
from felrec_stream.model.felrec import FELRec
from felrec_stream.state import engine
from felrec_stream.state.store import RepresentationStore
from felrec_stream.stream.events import EventBatch
from training import train as train_mod
from training.train import train, train_epoch, train_window

ENC = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, output_norm="running")
CACHE = CacheConfig(history_len=8)
BATCH = 64
# |bf16 loss - fp32 loss| of one step from the same weights and cache: bf16 keeps 8 significant
# bits (relative rounding 2^-9 ~ 0.002 per product); the InfoNCE loss here is ~4.2.
LOSS_TOLERANCE = 0.02


def _events(n_events=400, seed=3):
    cfg = synthetic.SyntheticConfig(n_users=30, n_items=25, n_events=n_events, n_clusters=3, seed=seed)
    return synthetic.generate(cfg).events


def _setup(cache_update="post_event"):
    torch.manual_seed(0)
    net = FELRec(ENC, ModelConfig(use_mlp=False, temperature=0.5, queue_size=64, cache_update=cache_update,
                                  mask_own_negatives=True, share_encoder=False))
    store = RepresentationStore.for_cache(ENC.d_model, CACHE)
    return net, store, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def _trained(precision=None, cache_update="post_event", max_activation_mb=0, **kwargs):
    model, store, optimizer = _setup(cache_update)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        extra = {} if precision is None else {"precision": precision}
        stats = train_epoch(model, store, optimizer, _events(256), BATCH, CACHE, seed=5,
                            max_activation_mb=max_activation_mb, **extra, **kwargs)
    return model, store, stats


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("cache_update", ["post_event", "pre_event"])
def test_fp32_is_the_plain_encoder_call_bit_for_bit(monkeypatch, cache_update):
    """precision fp32 (the default) never enters autocast and trains exactly as the direct
    encoder calls of the code before training.precision: the same weights, cache and loss, bit for bit."""
    default = _trained(None, cache_update)
    explicit = _trained("fp32", cache_update)

    def plain(model, users, items, precision="fp32", budget=None):  # the calls before encode_pair
        assert precision == "fp32"
        return engine.encode_sequences(model, users, budget), engine.encode_sequences(model, items, budget)

    def no_autocast(*args, **kwargs):
        raise AssertionError("fp32 must not enter torch.autocast")

    monkeypatch.setattr(train_mod, "encode_pair", plain)
    before = _trained(None, cache_update)
    monkeypatch.setattr(torch, "autocast", no_autocast)
    assert _trained("fp32", cache_update)[2] == default[2]
    for other in (explicit, before):
        assert _same(default[0], other[0])
        assert default[2] == other[2]
        for kind in default[1].tables:
            assert torch.equal(default[1].tables[kind].vectors.all(), other[1].tables[kind].vectors.all())


def test_bf16_trains_deterministically_and_keeps_weights_and_cache_fp32():
    """A fixed seed and thread count: two bf16 runs are equal; master weights, the optimizer's
    state and the cache stay fp32; bf16 differs from fp32 (it did run in bf16)."""
    first, second = _trained("bf16"), _trained("bf16")
    assert _same(first[0], second[0]) and first[2] == second[2]
    assert all(p.dtype == torch.float32 for p in first[0].state_dict().values() if p.is_floating_point())
    for kind in first[1].tables:
        vectors = first[1].tables[kind].vectors.all()
        assert vectors.dtype == torch.float32
        assert torch.equal(vectors, second[1].tables[kind].vectors.all())
    assert not _same(first[0], _trained("fp32")[0])


def test_bf16_deferred_buckets_replay_in_bf16():
    """A bucket the activation budget defers is re-encoded during backward, after the autocast
    block has ended: it must replay in bf16, so a tiny budget trains like no budget."""
    unbounded, bounded = _trained("bf16"), _trained("bf16", max_activation_mb=1)
    assert bounded[2].loss == pytest.approx(unbounded[2].loss, rel=1e-5)
    for (name, a), b in zip(unbounded[0].named_parameters(), bounded[0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_step_loss_is_close_to_fp32():
    """One step from the same weights and the same warm cache: the bf16 loss is within
    LOSS_TOLERANCE of the fp32 loss, and what enters the loss and the cache is fp32."""
    events = _events()
    warm, window = EventBatch.from_table(events.slice(0, 256)), EventBatch.from_table(events.slice(256, 320))
    model, store, optimizer = _setup()
    train_window(model, store, optimizer, warm, BATCH, CACHE)
    start_model, start_store = copy.deepcopy(model.state_dict()), copy.deepcopy(store.state_dict())
    losses = {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(start_model)
        store = RepresentationStore.for_cache(ENC.d_model, CACHE)
        store.load_state_dict(start_store)
        seen = []
        real_loss = model.loss

        def loss(u, x, *args, seen=seen, real_loss=real_loss, **kwargs):
            seen.append((u.dtype, x.dtype))
            return real_loss(u, x, *args, **kwargs)

        model.loss = loss
        torch.manual_seed(1)
        steps = train_window(model, store, torch.optim.SGD(model.parameters(), lr=0.05), window, BATCH, CACHE,
                             precision=precision)
        del model.loss
        losses[precision] = steps[0].loss
        assert seen and set(seen) == {(torch.float32, torch.float32)}
        assert all(table.vectors.all().dtype == torch.float32 for table in store.tables.values())
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < LOSS_TOLERANCE, losses


def test_bf16_is_refused_without_bf16_units(monkeypatch, tmp_path):
    """training.precision=bf16 on a CPU without AVX512-BF16/AMX: one line, before any work."""
    monkeypatch.setattr(device_mod, "bf16_units", lambda: None)
    configs = Configs(encoder=ENC, model=ModelConfig(use_mlp=False, queue_size=64),
                      training=TrainingConfig(epochs=1, batch_size=BATCH, precision="bf16", device="cpu"),
                      cache=CACHE)
    with pytest.raises(ConfigError) as error:
        train(_events(), configs, tmp_path)
    assert isinstance(error.value, FelrecError)
    assert "bf16" in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())
    device_mod.check_precision("fp32", torch.device("cpu"))  # fp32 is never refused


def test_bf16_units_read_the_cpu_flags(monkeypatch):
    for flags, units in (({"avx2"}, None), ({"avx512_bf16"}, "AVX512-BF16"), ({"amx_bf16"}, "AMX"),
                         ({"amx_bf16", "avx512_bf16"}, "AMX + AVX512-BF16")):
        monkeypatch.setattr(device_mod, "cpu_flags", lambda flags=flags: set(flags))
        assert device_mod.bf16_units() == units
