"""The paper's baselines as pure nn.Modules and tensor functions (no IO; device from the inputs).

Index conventions (the adapters in `online.py` map external ids to them):
- BPR-MF, JODIE*: users 1..U, items 1..I; row 0 = "unknown" (zero, never trained).
- GRU4Rec: items 1..I; input 0 = "no previous item" (a new session).
- GRU4Rec-BPTT, SASRec: PAD = 0, START = 1, items 2..I+1. Sequences are *left-aligned* (valid
  positions first, padding after) so that a causal model's output at position t only sees
  positions <= t and padding never precedes a valid position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from felrec_stream.config import EncoderConfig
from felrec_stream.model.felrec import Encoder

PAD, START, FIRST_ITEM = 0, 1, 2  # sequence-model vocabulary


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BPR: mean of -log sigma(s_pos - s_neg). pos (...,), neg (..., N), mask (...,) True = counted."""
    losses = -F.logsigmoid(pos.unsqueeze(-1) - neg).mean(dim=-1)  # (...,)
    if mask is None:
        return losses.mean()
    m = mask.to(losses.dtype)
    return (losses * m).sum() / m.sum().clamp(min=1.0)


class BPRMF(nn.Module):
    """Matrix factorisation x_ui = <p_u, q_i>."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.P = nn.Embedding(n_users + 1, dim, padding_idx=0)  # (U+1, D)
        self.Q = nn.Embedding(n_items + 1, dim, padding_idx=0)  # (I+1, D)
        nn.init.normal_(self.P.weight, std=0.1)
        nn.init.normal_(self.Q.weight, std=0.1)
        with torch.no_grad():
            self.P.weight[0].zero_()
            self.Q.weight[0].zero_()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B,), items (B, N) -> (B, N)."""
        return torch.einsum("bd,bnd->bn", self.P(users), self.Q(items))

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, I+1) scores of every item index (column 0 = unknown)."""
        return self.P(users) @ self.Q.weight.T


class OneHotGRUCell(nn.Module):
    """A GRU cell whose input is a one-hot item: W_ih x is a column lookup (no embedding layer)."""

    def __init__(self, n_items: int, hidden: int) -> None:
        super().__init__()
        self.w_ih = nn.Embedding(n_items + 1, 3 * hidden, padding_idx=0)  # columns of W_ih (3H x (I+1))
        self.b_ih = nn.Parameter(torch.zeros(3 * hidden))
        self.w_hh = nn.Linear(hidden, 3 * hidden)
        nn.init.uniform_(self.w_ih.weight, -hidden ** -0.5, hidden ** -0.5)
        with torch.no_grad():
            self.w_ih.weight[0].zero_()

    def forward(self, items: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """items (B,) one-hot indices, h (B, H) -> h' (B, H) (torch.nn.GRUCell equations)."""
        i_r, i_z, i_n = (self.w_ih(items) + self.b_ih).chunk(3, dim=-1)  # (B, H) each
        h_r, h_z, h_n = self.w_hh(h).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class GRU4Rec(nn.Module):
    """Session GRU: previous item (one-hot) -> n stacked GRU layers -> scores over items."""

    def __init__(self, n_items: int, hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.n_layers, self.hidden = n_layers, hidden
        self.first = OneHotGRUCell(n_items, hidden)
        self.rest = nn.ModuleList(nn.GRUCell(hidden, hidden) for _ in range(n_layers - 1))
        self.dropout = nn.Dropout(dropout)
        self.W_out = nn.Embedding(n_items + 1, hidden)  # prediction layer rows, (I+1, H)
        self.b_out = nn.Embedding(n_items + 1, 1)
        nn.init.normal_(self.W_out.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.b_out.weight)

    def step(self, prev_items: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prev_items (B,), h (B, n_layers, H) -> new state (B, n_layers, H), output (B, H)."""
        states = [self.first(prev_items, h[:, 0])]
        for k, cell in enumerate(self.rest, start=1):
            states.append(cell(self.dropout(states[-1]), h[:, k]))
        return torch.stack(states, dim=1), self.dropout(states[-1])

    def forward(self, out: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """out (B, H), items (B, N) -> (B, N) scores."""
        return torch.einsum("bh,bnh->bn", out, self.W_out(items)) + self.b_out(items).squeeze(-1)

    def score_all(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, I+1) (column 0 = no item)."""
        return out @ self.W_out.weight.T + self.b_out.weight.T


class TiedItemScores:
    """Prediction layer tied to the item embedding `E` (I+2, D), shared by GRU4Rec-BPTT and SASRec."""

    E: nn.Embedding

    def score(self, out: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """out (..., D), items (..., N) -> (..., N)."""
        return (out.unsqueeze(-2) * self.E(items)).sum(-1)

    def score_all(self, out: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, I+2) (columns PAD and START are not items)."""
        return out @ self.E.weight.T


class GRU4RecBPTT(TiedItemScores, nn.Module):
    """Item embedding -> GRU over the whole left-aligned sequence -> tied prediction layer."""

    def __init__(self, n_items: int, dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.E = nn.Embedding(n_items + FIRST_ITEM, dim, padding_idx=PAD)  # (I+2, D)
        nn.init.normal_(self.E.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.E.weight[PAD].zero_()
        self.gru = nn.GRU(dim, dim, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) -> hidden outputs (B, T, D); output t summarises seq[:, :t+1]."""
        out, _ = self.gru(self.dropout(self.E(seq)))
        return self.dropout(out)


class SASRec(TiedItemScores, nn.Module):
    """Item + positional embedding -> FELRec's encoder blocks (causal) -> LayerNorm -> Linear ->
    prediction layer tied to the item embedding."""

    def __init__(self, n_items: int, config: EncoderConfig, max_len: int) -> None:
        super().__init__()
        D = config.d_model
        self.E = nn.Embedding(n_items + FIRST_ITEM, D, padding_idx=PAD)  # (I+2, D)
        self.pos = nn.Embedding(max_len, D)  # (L, D)
        nn.init.normal_(self.E.weight, std=D ** -0.5)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.E.weight[PAD].zero_()
        blocks = Encoder(config)  # the very blocks of FELRec's encoder (same constructor, same config)
        self.blocks, self.norm = blocks.blocks, blocks.norm
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(D, D)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) left-aligned -> (B, T, D); output t attends to positions <= t only."""
        T = seq.shape[1]
        positions = torch.arange(T, device=seq.device)
        h = self.dropout(self.E(seq) * math.sqrt(self.E.embedding_dim) + self.pos(positions))  # (B, T, D)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()[None, None]  # (1, 1, T, T)
        for block in self.blocks:
            h = block(h, causal)
        z = self.norm(h)  # (B, T, D)
        return self.fc(z)


class Jodie(nn.Module):
    """JODIE*: update RNNs, time projection and the item-embedding predictor (no features).

    Dynamic embeddings u(t), i(t) live outside (state of the adapter); static embeddings are learned
    tables fed directly (row 0 = unknown entity = zero vector).
    """

    def __init__(self, n_users: int, n_items: int, dim: int, static_dim: int) -> None:
        super().__init__()
        self.user_static = nn.Embedding(n_users + 1, static_dim, padding_idx=0)  # (U+1, S)
        self.item_static = nn.Embedding(n_items + 1, static_dim, padding_idx=0)  # (I+1, S)
        for table in (self.user_static, self.item_static):
            nn.init.normal_(table.weight, std=static_dim ** -0.5)
            with torch.no_grad():
                table.weight[0].zero_()
        self.initial_user = nn.Parameter(F.normalize(torch.randn(dim), dim=0))  # u(0), (D,)
        self.initial_item = nn.Parameter(F.normalize(torch.randn(dim), dim=0))  # i(0), (D,)
        self.user_rnn = nn.RNNCell(dim + 1, dim)  # input [i(t-), Delta_u]
        self.item_rnn = nn.RNNCell(dim + 1, dim)  # input [u(t-), Delta_i]
        self.time_proj = nn.Linear(1, dim)  # w = W_p Delta, projection u^ = (1 + w) * u
        nn.init.normal_(self.time_proj.weight, std=0.01)
        nn.init.zeros_(self.time_proj.bias)
        self.predictor = nn.Linear(2 * dim + 2 * static_dim, dim + static_dim)

    def project(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """u (B, D), delta (B, 1) normalised time since the user's last interaction -> u^ (B, D)."""
        return u * (1 + self.time_proj(delta))

    def predict(self, u_hat: torch.Tensor, users: torch.Tensor, prev_dyn: torch.Tensor,
                prev_items: torch.Tensor) -> torch.Tensor:
        """Predicted item embedding i~ (B, D+S) from u^ (B, D), user static, previous item (B, D) + static."""
        x = torch.cat([u_hat, self.user_static(users), prev_dyn, self.item_static(prev_items)], dim=-1)
        return self.predictor(x)

    def item_targets(self, items: torch.Tensor, item_dyn: torch.Tensor) -> torch.Tensor:
        """Targets [i(t-), i_bar] of items (...,) with dynamic embeddings (..., D) -> (..., D+S)."""
        return torch.cat([item_dyn, self.item_static(items)], dim=-1)

    def update(self, u: torch.Tensor, i: torch.Tensor, delta_u: torch.Tensor,
               delta_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mutually recursive RNN update of the interacting pair -> (u(t), i(t)), both (B, D)."""
        u_new = F.normalize(self.user_rnn(torch.cat([i, delta_u], dim=-1), u), dim=-1)
        i_new = F.normalize(self.item_rnn(torch.cat([u, delta_i], dim=-1), i), dim=-1)
        return u_new, i_new


def neg_sq_distance(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """JODIE's score: -||i~ - target||^2. pred (B, K), targets (B, N, K) or (N, K) -> (B, N)."""
    if targets.dim() == 2:
        return -torch.cdist(pred, targets).pow(2)
    return -(pred.unsqueeze(1) - targets).pow(2).sum(-1)
