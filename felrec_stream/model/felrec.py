"""FELRec: one shared Transformer encoder over cached representations, no embedding layer.

A user u is encoded from the cached vectors of its last L items, an item x from the cached
vectors of its last L users (paper section 3.1). The encoder is bidirectional (no causal mask),
masks padding, adds a learned type embedding (user/item) to every sequence element, mean-pools
the valid positions and ends in a linear layer. FELRec-Q trains it with InfoNCE against a
MoCo-style queue; FELRec-P with a BYOL-style predictor (section 3.2).

Pure modules: the cache lives outside (felrec_stream.state.store); forward() never writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from felrec_stream.config import EncoderConfig, ModelConfig
from felrec_stream.model.losses import byol_loss, info_nce, info_nce_chance
from felrec_stream.model.norms import KindNorm, RunningNorm, RunningWhitening

USER, ITEM = 0, 1  # kind of the *encoded entity* (a user's sequence holds items, an item's users)


class Block(nn.Module):
    """One Transformer encoder block: self-attention and a two-layer MLP, with dropout where
    nn.TransformerEncoderLayer has it. Pre-norm (default) or post-norm (reference).

    Attention runs on the fused scaled-dot-product kernel (no materialised (B, H, N, N) attention
    on backends that fuse it), except when training on the CPU with dropout: there torch's kernel
    falls back to the unfused math path anyway and draws its masks with the slow per-element
    Bernoulli sampler, so the block computes the same math itself with `dropout` (cheaper masks)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        D = config.d_model
        self.H, self.p, self.norm_first = config.n_heads, config.dropout, config.norm_first
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ff1, self.ff2 = nn.Linear(D, config.d_ff), nn.Linear(config.d_ff, D)
        self.act = F.gelu if config.activation == "gelu" else F.relu
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        nn.init.xavier_uniform_(self.qkv.weight)  # as nn.MultiheadAttention initialises its projections
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """h: (B, N, D); attn_mask: (B, 1, 1, N) True where a key may be attended (or any boolean
        mask broadcastable to (B, H, N, N))."""
        if self.norm_first:
            h = h + self._attend(self.norm1(h), attn_mask)
            return h + self._feed_forward(self.norm2(h))
        h = self.norm1(h + self._attend(h, attn_mask))
        return self.norm2(h + self._feed_forward(h))

    def _attend(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
        if self.training and self.p > 0 and h.device.type == "cpu":
            a = _attention(q, k, v, attn_mask, self.p)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0)
        return dropout(self.proj(a.transpose(1, 2).reshape(B, N, D)), self.p, self.training)  # (B, N, D)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        hidden = dropout(self.act(self.ff1(h)), self.p, self.training)  # (B, N, d_ff)
        return dropout(self.ff2(hidden), self.p, self.training)  # (B, N, D)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, p: float) -> torch.Tensor:
    """Softmax attention with dropout on the weights, as F.scaled_dot_product_attention's math path.
    q, k, v: (B, H, N, d); returns (B, H, N, d)."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, H, N, N)
    weights = scores.masked_fill_(~attn_mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(dropout(weights, p, True), v)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with masks from `keep_mask` on the CPU (torch draws each CPU mask element with a
    Bernoulli sampler that took ~20% of a training step)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x.mul(keep_mask(x.shape, p)).mul_(1.0 / (1.0 - p))


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """(shape) bool CPU mask, each element True with probability 1 - p (p quantised to 2^-32, finer
    than torch.rand's 2^-24). Bits from numpy's PCG64, seeded from torch's default generator, so
    torch.manual_seed (and torch.get_rng_state / set_rng_state) govern the masks as they govern
    F.dropout's."""
    seed = int(torch.randint(0, 2**62, (1,)))
    bits = np.random.default_rng(seed).integers(-2**31, 2**31, math.prod(shape), dtype=np.int32)
    return torch.from_numpy(bits).view(shape) >= round(p * 2**32) - 2**31


class Encoder(nn.Module):
    """Sequence of cached vectors (B, N, D) + padding mask (B, N) -> representation (B, D)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.type_embedding = nn.Embedding(2, D) if config.type_embedding else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(D) if config.norm_first else nn.Identity()  # pre-norm blocks need a final norm
        # One learned input per kind (USER, ITEM) for an empty history (config.empty_history == "learned").
        self.prior = nn.Parameter(0.02 * torch.randn(2, D)) if config.empty_history == "learned" else None
        self.fc = nn.Linear(D, D)
        # Optional output standardisation, one norm per kind of encoded entity (USER, ITEM): batch
        # statistics in training ("batch") or the same running statistics in training and serving ("running").
        Norm = {"batch": KindNorm, "running": RunningNorm, "whiten": RunningWhitening}.get(config.output_norm)
        self.output_norm = None if Norm is None else nn.ModuleList([Norm(D) for _ in range(2)])
        # Most positions a bucket may hold (rows x its length; 0 = no limit: bounds the transient
        # (B, H, N, N) attention weights) and the cost of one more bucket in positions (a huge value
        # gives one bucket: the padded path). Not saved: speed/memory settings, not part of the model.
        self.bucket_tokens = BUCKET_TOKENS
        self.bucket_overhead = BUCKET_OVERHEAD
        self._init_near_identity()

    def _init_near_identity(self) -> None:
        """Start as (almost) a normalised mean of the inputs.

        The encoder is applied over and over to its own outputs (cache -> encoder -> cache). A
        random final layer and a large type embedding make that map a contraction: every entity's
        vector drifts to one fixed point and training starts from collapse. An identity final layer
        and a small type embedding keep the differences between entities at init.
        """
        nn.init.eye_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        if self.type_embedding is not None:
            nn.init.normal_(self.type_embedding.weight, std=0.02)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor,
                empty: torch.Tensor | None = None, budget: ActivationBudget | None = None) -> torch.Tensor:
        """h: (B, N, D) cached vectors; mask: (B, N) True where valid; kinds: (B,) USER or ITEM of the
        encoded entity; empty: (B,) rows whose history has no element (their last position reads the
        learned prior when there is one); budget: bounds the activations kept for backward.

        Rows are encoded bucket by bucket (`length_buckets`), each bucket trimmed to its longest
        history: the same vectors as one padded pass, up to float rounding, at the cost of the valid
        positions only. The output norm still sees the whole batch."""
        buckets = length_buckets(mask.sum(dim=1), self.bucket_tokens, self.bucket_overhead)
        pool = self.pool if budget is None else budget.pool(self)
        return self.head(join_buckets([pool(h, mask, kinds, empty, b) for b in buckets], buckets, h), kinds)

    def activation_bytes(self, length: int) -> int:
        """Bytes that training keeps for backward per position of a bucket of `length` (the saved
        tensors of `Block` on the CPU path: 8 D + 2 d_ff + 2 H n floats and H n + 2 D + d_ff mask
        bytes per layer, plus the input, final norm and pooling); an upper bound on other devices."""
        c = self.config
        D, F_, Hn = c.d_model, c.d_ff, c.n_heads * length
        return c.n_layers * (4 * (8 * D + 2 * F_ + 2 * Hn) + Hn + 2 * D + F_) + 4 * 4 * D

    def pool(self, h: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor, empty: torch.Tensor | None,
             bucket: Bucket) -> torch.Tensor:
        """(r, D) masked mean of the final block outputs of the bucket's rows (the per-row part of
        the encoder: rows never interact before `head`)."""
        h, mask, kinds, empty = bucket.take(h, mask, kinds, empty)  # (r, n, D), (r, n), (r,), (r,)
        if self.prior is not None and empty is not None and bool(empty.any()):
            last = torch.zeros_like(mask)
            last[:, -1] = True
            where = (empty.unsqueeze(1) & last).unsqueeze(-1)  # (r, n, 1)
            h = torch.where(where, self.prior[kinds].unsqueeze(1).to(h.dtype), h)
        if self.config.positions == "reversed_sinusoidal":
            h = h + reversed_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        if self.type_embedding is not None:
            h = h + self.type_embedding(kinds).unsqueeze(1)  # (r, n, D)
        attn_mask = mask[:, None, None, :]  # (r, 1, 1, n): padding is never attended
        for block in self.blocks:
            h = block(h, attn_mask)
        z = self.norm(h)  # (r, n, D)
        m = mask.unsqueeze(-1).to(z.dtype)  # (r, n, 1)
        if self.config.pool_halflife > 0:  # recency: the newest element (last position) weighs 1
            m = m * recency_weights(z.shape[1], self.config.pool_halflife, z.device, z.dtype).unsqueeze(-1)
        return (z * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-12)  # (r, D) masked (weighted) mean

    def head(self, pooled: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled rows -> representations: the final linear layer and the output norm, whose
        batch statistics couple the rows of a kind."""
        out = self.fc(pooled)  # (B, D)
        return out if self.output_norm is None else self._standardise(out, kinds)

    def _standardise(self, out: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Per-kind BatchNorm of the outputs (config.output_norm == "batch").

        Each encoding averages cached vectors, so replaying the cache is a power iteration whose
        dominant eigenvector is one direction shared by everyone (collapse). Removing the per-kind
        mean removes that direction and lets the next ones (the cluster structure) dominate.
        Batch statistics in training, running ones in eval and for a kind with one row in a batch.
        """
        result = torch.empty_like(out)
        for kind, norm in enumerate(self.output_norm):  # row = kind of the encoded entity
            rows = kinds == kind
            result[rows] = norm(out[rows])  # every kind, even without rows: a data-parallel norm syncs each
        return result


def recency_weights(N: int, halflife: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N,) pooling weights of right-aligned positions: 0.5 ** (age / halflife), age 0 = the newest."""
    age = torch.arange(N - 1, -1, -1, device=device, dtype=torch.float32)
    return torch.pow(0.5, age / halflife).to(dtype)


# Encoding in length buckets: positions per bucket at most (transient memory), and the fixed cost
# of one more bucket in positions (per-operation overhead; measured by benchmarks/bench_train_eval.py).
BUCKET_TOKENS = 4096
BUCKET_OVERHEAD = 1024


@dataclass(frozen=True)
class Bucket:
    """Rows of a batch encoded together, each trimmed to the bucket's length (sequences are
    right-aligned: the last `length` positions hold every valid element of these rows)."""

    rows: torch.Tensor | None  # (r,) row indices, ascending; None = every row
    length: int

    def take(self, h: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor, empty: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n = self.length
        if self.rows is None:
            return h[:, -n:], mask[:, -n:], kinds, empty
        r = self.rows
        return h[r, -n:], mask[r, -n:], kinds[r], None if empty is None else empty[r]

    def rows_in(self, h: torch.Tensor) -> int:
        return h.shape[0] if self.rows is None else len(self.rows)


def length_buckets(lengths: torch.Tensor, max_tokens: int = 0, overhead: int = BUCKET_OVERHEAD) -> list[Bucket]:
    """Group R rows by valid length (R,) so that encoding each group padded to its longest costs
    least: minimises the sum over buckets of rows x length + overhead, by dynamic programming over
    the distinct lengths. A bucket over `max_tokens` positions is split (0 = no limit). Longest
    bucket first; rows ascending inside a bucket."""
    n = lengths.clamp(min=1).cpu().numpy()
    if len(n) == 0:
        return []
    values, counts = np.unique(n, return_counts=True)
    values, counts = values[::-1], counts[::-1]  # longest first
    rows_before = np.concatenate([[0], np.cumsum(counts)])
    cost, start = np.zeros(len(values) + 1), np.zeros(len(values) + 1, dtype=np.int64)
    for j in range(1, len(values) + 1):  # cost[j]: the j longest distinct lengths, in buckets
        options = cost[:j] + overhead + values[:j] * (rows_before[j] - rows_before[:j])
        start[j] = int(np.argmin(options))
        cost[j] = options[start[j]]
    groups, j = [], len(values)
    while j > 0:
        groups.append((values[start[j]], values[j - 1]))  # (longest, shortest) length of a bucket
        j = start[j]
    buckets = []
    for longest, shortest in reversed(groups):
        rows = np.flatnonzero((n <= longest) & (n >= shortest))
        per = len(rows) if max_tokens <= 0 else max(max_tokens // int(longest), 1)
        for first in range(0, len(rows), per):
            part = rows[first:first + per]
            whole = len(part) == len(n)
            buckets.append(Bucket(None if whole else torch.from_numpy(part).to(lengths.device), int(longest)))
    return buckets


class ActivationBudget:
    """Exact backward of one training step within a memory budget (bucket-level recomputation).

    While the bytes the kept autograd graphs hold (`Encoder.activation_bytes`) stay within
    `max_bytes`, buckets are encoded with their graph as usual. Every later bucket is encoded without
    a graph, its output made a leaf, and the random-number state before it remembered; `backward()`
    (after the loss's backward) re-encodes each such bucket from that state, so with the very same
    dropout masks and the same outputs, and backpropagates the leaf's gradient through it. Gradients
    and outputs are those of the plain step; the cost is one more forward of the deferred buckets.
    The random-number stream continues afterwards as if nothing had been replayed. `between` (e.g.
    handing freed memory back to the OS) runs after each re-encoded bucket's backward."""

    def __init__(self, max_bytes: int, between: Callable[[], object] | None = None) -> None:
        self.left = max_bytes if max_bytes > 0 else math.inf
        self.between = between
        self._deferred: list[tuple[Callable[[], torch.Tensor], Any, torch.Tensor]] = []

    def pool(self, encoder: Encoder) -> Callable[..., torch.Tensor]:
        """`encoder.pool`, deferring the buckets beyond the budget."""
        def pool(h: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor, empty: torch.Tensor | None,
                 bucket: Bucket) -> torch.Tensor:
            cost = bucket.rows_in(h) * bucket.length * encoder.activation_bytes(bucket.length)
            run = lambda: encoder.pool(h, mask, kinds, empty, bucket)  # noqa: E731
            if cost <= self.left or not torch.is_grad_enabled():
                self.left -= cost
                return run()
            state = _rng_state(h.device)
            with torch.no_grad():
                leaf = run().requires_grad_()
            self._deferred.append((_under_autocast(run, h.device.type), state, leaf))
            return leaf
        return pool

    def backward(self) -> None:
        """Backpropagate through the deferred buckets (call after the loss's backward)."""
        if not self._deferred:
            return
        device = self._deferred[0][2].device
        end = _rng_state(device)
        for run, state, leaf in self._deferred:
            if leaf.grad is not None:
                _set_rng_state(device, state)
                run().backward(leaf.grad)
                if self.between is not None:
                    self.between()
        _set_rng_state(device, end)
        self._deferred.clear()


def _under_autocast(run: Callable[[], torch.Tensor], device_type: str) -> Callable[[], torch.Tensor]:
    """`run` replayed under the autocast state it was first run under (a bf16 step's deferred
    bucket re-encodes in bf16, after the autocast block has ended); as is without autocast."""
    if not torch.is_autocast_enabled(device_type):
        return run
    dtype = torch.get_autocast_dtype(device_type)

    def replay() -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return run()
    return replay


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default generators that dropout on `device` draws from (CPU always: `keep_mask`)."""
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.get_rng_state(), torch.mps.get_rng_state()
    return torch.get_rng_state(), None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state[1])


def join_buckets(parts: list[torch.Tensor], buckets: list[Bucket], like: torch.Tensor) -> torch.Tensor:
    """(R, ...) rows in their original order from the per-bucket results (differentiable)."""
    if not parts:
        return like.new_zeros((0,) + like.shape[2:])
    if len(parts) == 1 and buckets[0].rows is None:
        return parts[0]
    order = torch.cat([b.rows for b in buckets])  # (R,) original row of each result row
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(parts)[inverse]


def mlp(d_in: int, d_hidden: int, d_out: int, norm: str) -> nn.Sequential:
    """Linear-Norm-ReLU-Linear; norm is BatchNorm (paper) or LayerNorm (ablation -LN)."""
    Norm = nn.BatchNorm1d if norm == "batch" else nn.LayerNorm
    return nn.Sequential(nn.Linear(d_in, d_hidden), Norm(d_hidden), nn.ReLU(inplace=True), nn.Linear(d_hidden, d_out))


@dataclass(frozen=True)
class Negatives:
    """Cached vectors drawn as FELRec-Q's negatives: users (K, D) for the items' queries, items (K, D)
    for the users', with their ids (K,) (store slots: a row's own entity is never its negative)."""

    users: torch.Tensor
    user_ids: torch.Tensor
    items: torch.Tensor
    item_ids: torch.Tensor


class FELRec(nn.Module):
    """Encoder + training heads of FELRec-Q (variant "q") or FELRec-P (variant "p")."""

    def __init__(self, encoder_config: EncoderConfig, model_config: ModelConfig) -> None:
        super().__init__()
        self.encoder_config, self.config = encoder_config, model_config
        self.encoder = Encoder(encoder_config)  # users' (and, shared, items')
        if not model_config.share_encoder:  # one encoder per kind of encoded entity
            self.item_encoder = Encoder(encoder_config)
        D, cfg = encoder_config.d_model, model_config
        if cfg.variant == "q":
            make_proj = lambda: mlp(D, D, D, cfg.norm)  # noqa: E731
            C = D
        else:
            make_proj = lambda: mlp(D, cfg.proj_hidden, cfg.proj_out, cfg.norm)  # noqa: E731
            C = cfg.proj_out
            if cfg.use_mlp:
                self.user_prediction = mlp(C, cfg.proj_hidden, C, cfg.norm)
                self.item_prediction = self.user_prediction if cfg.share_mlp else mlp(C, cfg.proj_hidden, C, cfg.norm)
        if cfg.use_mlp:
            self.user_projection = make_proj()
            self.item_projection = self.user_projection if cfg.share_mlp else make_proj()
        else:
            C = D
        if cfg.variant == "q":
            K = cfg.queue_size
            self.register_buffer("user_queue", F.normalize(torch.randn(K, C), dim=1))  # (K, C)
            self.register_buffer("item_queue", F.normalize(torch.randn(K, C), dim=1))  # (K, C)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            # Entity (store slot) of each queued key, -1 = none: a row's own entity is no negative of it.
            self.register_buffer("user_queue_ids", torch.full((K,), -1, dtype=torch.long))
            self.register_buffer("item_queue_ids", torch.full((K,), -1, dtype=torch.long))
            self.chance = torch.zeros(())  # the latest loss's chance level (uniform logits), for logs

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints from before the queue kept ids load with unknown ids (-1)."""
        if self.config.variant == "q":
            for name in ("user_queue_ids", "item_queue_ids"):
                state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), -1))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def encode_kind(self, h: torch.Tensor, mask: torch.Tensor, kind: int, empty: torch.Tensor | None = None,
                    budget: ActivationBudget | None = None) -> torch.Tensor:
        """(R, D) representations of R entities of one kind (USER/ITEM) from their histories h (R, N, D).
        R = 0 still runs the encoder in training: a data-parallel rank with no rows of the batch
        takes part in the other ranks' BatchNorm statistics."""
        if h.shape[0] == 0 and not self.training:
            return h.new_zeros(0, h.shape[-1])
        kinds = torch.full((h.shape[0],), kind, device=h.device)
        encoder = self.item_encoder if kind == ITEM and not self.config.share_encoder else self.encoder
        return encoder(h, mask, kinds, empty, budget)

    def loss(self, u: torch.Tensor, x: torch.Tensor, total: int | None = None,
             gather_keys: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ids: tuple[torch.Tensor, torch.Tensor] | None = None,
             negatives: Negatives | None = None,
             targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Symmetric training loss of the positive pair (u, x) of every event in the batch.

        targets: (B, D) each, FELRec-Q's positive keys for the rows' users and items (e.g. the
        vectors the cache serves for them, model.positives="cached"); None = the fresh u, x.

        negatives: FELRec-Q's negatives drawn from the cache (model.negatives="cache"); None = the queue.

        ids: (B,) user and item ids (store slots) of the rows: FELRec-Q then never uses as a negative
        a queued key of an event that shares the row's user or item (its own earlier vectors, or the
        items its user just chose: positives under another name), nor the row's own entity among
        cache negatives; without ids every key counts.
        Data-parallel (felrec_stream.parallel): u, x are one rank's slice of a batch of `total`
        events; the result is the slice's share of the full-batch mean (per-event sum / total, so the
        ranks' shares add up to it), and `gather_keys` maps the slice's (b, C) rows to the whole
        batch's (total, C) in event order, so FELRec-Q's queue receives every rank's keys."""
        if self.config.variant == "q":
            return self._loss_q(u, x, total, gather_keys, ids, negatives, targets)
        return self._loss_p(u, x, total)

    def _loss_q(self, u: torch.Tensor, x: torch.Tensor, total: int | None,
                gather_keys: Callable[[torch.Tensor], torch.Tensor] | None,
                ids: tuple[torch.Tensor, torch.Tensor] | None,
                negatives: Negatives | None = None,
                targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q_u, q_x = self._query(u, USER), self._query(x, ITEM)  # (B, C) each
        k_u, k_x = q_u.detach(), q_x.detach()  # the positives: the other side's fresh encodings
        if targets is not None:  # or what the cache serves for them (no gradient)
            with torch.no_grad():
                k_u, k_x = self._query(targets[0], USER), self._query(targets[1], ITEM)
        T = self.config.temperature
        own_x = own_u = None  # (B, K) True where a negative is no negative of the row
        if negatives is None:  # the queue: the keys of the latest events
            n_x, n_u = self.item_queue, self.user_queue
            if ids is not None:  # a queued event that shares the row's user or item: its own earlier
                # vector, or an item its user just chose (a time-ordered batch is mostly one user's)
                own_x = own_u = ((ids[0].unsqueeze(1) == self.user_queue_ids.unsqueeze(0))
                                 | (ids[1].unsqueeze(1) == self.item_queue_ids.unsqueeze(0)))
        else:  # entities drawn from the cache (no gradient), in the queries' space
            with torch.no_grad():
                n_x, n_u = self._query(negatives.items, ITEM), self._query(negatives.users, USER)
            if ids is not None:
                own_x = ids[1].unsqueeze(1) == negatives.item_ids.unsqueeze(0)
                own_u = ids[0].unsqueeze(1) == negatives.user_ids.unsqueeze(0)
        loss = info_nce(q_u, k_x, n_x.clone(), T, total, own_x)
        if self.config.loss_terms == "both":
            loss = loss + info_nce(q_x, k_u, n_u.clone(), T, total, own_u)
        self.chance = info_nce_chance(n_x.shape[0], own_x) + (
            info_nce_chance(n_u.shape[0], own_u) if self.config.loss_terms == "both" else 0.0)
        if negatives is None:
            self._enqueue_all(k_u, k_x, gather_keys, ids)
        return loss

    def _query(self, v: torch.Tensor, kind: int) -> torch.Tensor:
        """(R, C) unit vectors the loss compares: the projection head's output, or v itself."""
        if self.config.use_mlp:
            v = (self.user_projection if kind == USER else self.item_projection)(v)
        return F.normalize(v, dim=1)

    def _enqueue_all(self, k_u: torch.Tensor, k_x: torch.Tensor,
                     gather_keys: Callable[[torch.Tensor], torch.Tensor] | None,
                     ids: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if gather_keys is not None:
            k_u, k_x = gather_keys(torch.cat([k_u, k_x], dim=1)).split(k_u.shape[1], dim=1)  # (total, C) each
            if ids is not None:
                ids = tuple(gather_keys(torch.stack(ids, dim=1)).unbind(dim=1))  # (total,) each
        self._enqueue(k_u, k_x, ids)

    def _loss_p(self, u: torch.Tensor, x: torch.Tensor, total: int | None) -> torch.Tensor:
        if not self.config.use_mlp:
            return byol_loss(u, x.detach(), total) + byol_loss(x, u.detach(), total)
        z_u, z_x = self.user_projection(u), self.item_projection(x)  # (B, C)
        p_u, p_x = self.user_prediction(z_u), self.item_prediction(z_x)  # (B, C)
        return byol_loss(p_u, z_x.detach(), total) + byol_loss(p_x, z_u.detach(), total)

    @torch.no_grad()
    def _enqueue(self, k_u: torch.Tensor, k_x: torch.Tensor, ids: tuple[torch.Tensor, ...] | None) -> None:
        """Ring-buffer write of the newest keys and their ids (-1: unknown; any batch size; wraps around)."""
        K, B = self.user_queue.shape[0], k_u.shape[0]
        idx = (self.queue_ptr + torch.arange(min(B, K), device=k_u.device)) % K
        self.user_queue[idx] = k_u[-K:]
        self.item_queue[idx] = k_x[-K:]
        self.user_queue_ids[idx] = -1 if ids is None else ids[0][-K:].to(self.user_queue_ids.dtype)
        self.item_queue_ids[idx] = -1 if ids is None else ids[1][-K:].to(self.item_queue_ids.dtype)
        self.queue_ptr.copy_((self.queue_ptr + min(B, K)) % K)


def reversed_positions(N: int, D: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, D) sinusoidal encodings of positions N-1 .. 0: right-aligned sequences end with the newest
    element, which gets position 0 whatever the padding."""
    p = torch.arange(N - 1, -1, -1, device=device, dtype=torch.float32).unsqueeze(1)  # (N, 1)
    i = torch.arange(0, D, 2, device=device, dtype=torch.float32)  # (D/2,)
    angle = p / torch.pow(10000.0, i / D)  # (N, D/2)
    pe = torch.zeros(N, D, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle[:, : D // 2])
    return pe.to(dtype)


def _pad_left(t: torch.Tensor, N: int) -> torch.Tensor:
    """Left-pad dim 1 to length N (zeros / False): sequences are right-aligned, newest last."""
    missing = N - t.shape[1]
    if missing == 0:
        return t
    pad = torch.zeros((t.shape[0], missing) + t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
