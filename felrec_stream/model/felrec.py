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

USER, ITEM = 0, 1  # type-embedding rows: the kind of the *sequence elements*


class Encoder(nn.Module):
    """Sequence of cached vectors (B, N, D) + padding mask (B, N) -> representation (B, D)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.type_embedding = nn.Embedding(2, D) if config.type_embedding else None
        layer = nn.TransformerEncoderLayer(
            D, config.n_heads, config.d_ff, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)  # pre-norm blocks need a final norm
        self.fc = nn.Linear(D, D)
        # Optional output standardisation, one BatchNorm per kind of sequence element (USER, ITEM).
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

    def forward(self, h: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """h: (B, N, D) cached vectors; mask: (B, N) True where valid; kinds: (B,) USER or ITEM."""
        if self.type_embedding is not None:
            h = h + self.type_embedding(kinds).unsqueeze(1)  # (B, N, D)
        z = self.norm(self.transformer(h, src_key_padding_mask=~mask))  # (B, N, D)
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
        for kind, norm in enumerate(self.output_norm):
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

    def encode(self, item_seq: torch.Tensor, item_mask: torch.Tensor,
               user_seq: torch.Tensor, user_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, D) from the user's item history; x (B, D) from the item's user history.

        Both go through the shared encoder in one call: sequences are padded to a common length.
        """
        B = item_seq.shape[0]
        N = max(item_seq.shape[1], user_seq.shape[1])
        h = torch.cat([_pad_left(item_seq, N), _pad_left(user_seq, N)])  # (2B, N, D)
        mask = torch.cat([_pad_left(item_mask, N), _pad_left(user_mask, N)])  # (2B, N)
        kinds = torch.cat([torch.full((B,), ITEM), torch.full((B,), USER)]).to(h.device)  # (2B,)
        out = self.encoder(h, mask, kinds)  # (2B, D)
        return out[:B], out[B:]

    def loss(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Symmetric training loss of the positive pair (u, x) of every event in the batch."""
        if self.config.variant == "q":
            return self._loss_q(u, x)
        return self._loss_p(u, x)

    def _loss_q(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_u = F.normalize(self.user_projection(u) if self.config.use_mlp else u, dim=1)  # (B, C)
        q_x = F.normalize(self.item_projection(x) if self.config.use_mlp else x, dim=1)  # (B, C)
        T = self.config.temperature
        loss = info_nce(q_u, q_x.detach(), self.item_queue.clone(), T) + info_nce(q_x, q_u.detach(), self.user_queue.clone(), T)
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


def _pad_left(t: torch.Tensor, N: int) -> torch.Tensor:
    """Left-pad dim 1 to length N (zeros / False): sequences are right-aligned, newest last."""
    missing = N - t.shape[1]
    if missing == 0:
        return t
    pad = torch.zeros((t.shape[0], missing) + t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
