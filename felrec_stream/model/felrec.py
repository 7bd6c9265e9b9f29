"""FELRec: one shared Transformer encoder over cached representations, no embedding layer.

A user u is encoded from the cached vectors of its last L items, an item x from the cached
vectors of its last L users (paper section 3.1). The encoder is bidirectional (no causal mask),
masks padding, adds a learned type embedding (user/item) to every sequence element, mean-pools
the valid positions and ends in a linear layer. FELRec-Q trains it with InfoNCE against a
MoCo-style queue; FELRec-P with a BYOL-style predictor (section 3.2).

Pure modules: the cache lives outside (felrec_stream.state.store); forward() never writes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from felrec_stream.config import EncoderConfig, ModelConfig
from felrec_stream.model.losses import byol_loss, info_nce

USER, ITEM = 0, 1  # kind of the *encoded entity* (a user's sequence holds items, an item's users)


class Block(nn.Module):
    """One Transformer encoder block: self-attention through the fused scaled-dot-product kernel
    (no materialised (B, H, N, N) attention on backends that fuse it) and a two-layer MLP, with
    dropout where nn.TransformerEncoderLayer has it. Pre-norm (default) or post-norm (reference)."""

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
        """h: (B, N, D); attn_mask: (B, 1, 1, N) True where a key may be attended."""
        if self.norm_first:
            h = h + self._attend(self.norm1(h), attn_mask)
            return h + self._feed_forward(self.norm2(h))
        h = self.norm1(h + self._attend(h, attn_mask))
        return self.norm2(h + self._feed_forward(h))

    def _attend(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D/H)
        p = self.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, N, D/H)
        return F.dropout(self.proj(a.transpose(1, 2).reshape(B, N, D)), p, self.training)  # (B, N, D)

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(self.act(self.ff1(h)), self.p, self.training)  # (B, N, d_ff)
        return F.dropout(self.ff2(hidden), self.p, self.training)  # (B, N, D)


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
        # Optional output standardisation, one BatchNorm per kind of encoded entity (USER, ITEM).
        self.output_norm = (nn.ModuleList([nn.BatchNorm1d(D, affine=False, momentum=0.01) for _ in range(2)])
                            if config.output_norm == "batch" else None)
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
                empty: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, N, D) cached vectors; mask: (B, N) True where valid; kinds: (B,) USER or ITEM of the
        encoded entity; empty: (B,) rows whose history has no element (their last position reads the
        learned prior when there is one)."""
        if self.prior is not None and empty is not None and bool(empty.any()):
            last = torch.zeros_like(mask)
            last[:, -1] = True
            where = (empty.unsqueeze(1) & last).unsqueeze(-1)  # (B, N, 1)
            h = torch.where(where, self.prior[kinds].unsqueeze(1).to(h.dtype), h)
        if self.config.positions == "reversed_sinusoidal":
            h = h + reversed_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        if self.type_embedding is not None:
            h = h + self.type_embedding(kinds).unsqueeze(1)  # (B, N, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, N): padding is never attended
        for block in self.blocks:
            h = block(h, attn_mask)
        z = self.norm(h)  # (B, N, D)
        m = mask.unsqueeze(-1).to(z.dtype)  # (B, N, 1)
        pooled = (z * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D) masked mean
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
            n = int(rows.sum())
            if n == 0:
                continue
            use_batch = self.training and n >= 2
            result[rows] = F.batch_norm(out[rows], norm.running_mean, norm.running_var, training=use_batch,
                                        momentum=norm.momentum, eps=norm.eps)
        return result


def mlp(d_in: int, d_hidden: int, d_out: int, norm: str) -> nn.Sequential:
    """Linear-Norm-ReLU-Linear; norm is BatchNorm (paper) or LayerNorm (ablation -LN)."""
    Norm = nn.BatchNorm1d if norm == "batch" else nn.LayerNorm
    return nn.Sequential(nn.Linear(d_in, d_hidden), Norm(d_hidden), nn.ReLU(inplace=True), nn.Linear(d_hidden, d_out))


class FELRec(nn.Module):
    """Encoder + training heads of FELRec-Q (variant "q") or FELRec-P (variant "p")."""

    def __init__(self, encoder_config: EncoderConfig, model_config: ModelConfig) -> None:
        super().__init__()
        self.encoder_config, self.config = encoder_config, model_config
        self.encoder = Encoder(encoder_config)
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

    def encode_kind(self, h: torch.Tensor, mask: torch.Tensor, kind: int,
                    empty: torch.Tensor | None = None) -> torch.Tensor:
        """(R, D) representations of R entities of one kind (USER/ITEM) from their histories h (R, N, D)."""
        if h.shape[0] == 0:
            return h.new_zeros(0, h.shape[-1])
        kinds = torch.full((h.shape[0],), kind, device=h.device)
        return self.encoder(h, mask, kinds, empty)

    def loss(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Symmetric training loss of the positive pair (u, x) of every event in the batch."""
        if self.config.variant == "q":
            return self._loss_q(u, x)
        return self._loss_p(u, x)

    def _loss_q(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_u = F.normalize(self.user_projection(u) if self.config.use_mlp else u, dim=1)  # (B, C)
        q_x = F.normalize(self.item_projection(x) if self.config.use_mlp else x, dim=1)  # (B, C)
        T = self.config.temperature
        loss = (info_nce(q_u, q_x.detach(), self.item_queue.clone(), T)
                + info_nce(q_x, q_u.detach(), self.user_queue.clone(), T))
        self._enqueue(q_u.detach(), q_x.detach())
        return loss

    def _loss_p(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.config.use_mlp:
            return byol_loss(u, x.detach()) + byol_loss(x, u.detach())
        z_u, z_x = self.user_projection(u), self.item_projection(x)  # (B, C)
        p_u, p_x = self.user_prediction(z_u), self.item_prediction(z_x)  # (B, C)
        return byol_loss(p_u, z_x.detach()) + byol_loss(p_x, z_u.detach())

    @torch.no_grad()
    def _enqueue(self, k_u: torch.Tensor, k_x: torch.Tensor) -> None:
        """Ring-buffer write of the newest keys (any batch size; wraps around)."""
        K, B = self.user_queue.shape[0], k_u.shape[0]
        idx = (self.queue_ptr + torch.arange(min(B, K), device=k_u.device)) % K
        self.user_queue[idx] = k_u[-K:]
        self.item_queue[idx] = k_x[-K:]
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
