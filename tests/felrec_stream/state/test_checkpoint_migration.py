"""Checkpoints of format version 1 (nn.TransformerEncoder layers) load and encode identically."""

import torch
from torch import nn

from felrec_stream.config import EncoderConfig, ModelConfig
from felrec_stream.model.felrec import ITEM, USER, FELRec
from felrec_stream.state.checkpoint import migrate_model_state

ENC = EncoderConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, output_norm="batch")


class V1Encoder(nn.Module):
    """The version-1 encoder: torch's pre-norm TransformerEncoder, type rows keyed by element kind."""

    def __init__(self) -> None:
        super().__init__()
        self.type_embedding = nn.Embedding(2, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.output_norm = nn.ModuleList([nn.BatchNorm1d(16, affine=False) for _ in range(2)])

    def forward(self, h, mask, element_kind):
        h = h + self.type_embedding.weight[element_kind]
        z = self.norm(self.transformer(h, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).float()
        out = self.fc((z * m).sum(1) / m.sum(1))
        return self.output_norm[element_kind](out)


def test_version_1_weights_give_the_same_encodings():
    torch.manual_seed(0)
    old = V1Encoder().eval()
    for norm in old.output_norm:  # non-trivial running statistics, different per kind
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        old.type_embedding.weight.mul_(10)  # make a swapped row visible
    state = {f"encoder.{k}": v for k, v in old.state_dict().items()}
    model = FELRec(ENC, ModelConfig(use_mlp=False, queue_size=8))
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    model.load_state_dict({**migrate_model_state(state, 1), **own})
    model.eval()
    h, mask = torch.randn(5, 4, 16), torch.tensor([[False, True, True, True]] * 5)
    with torch.no_grad():
        # a user is encoded from items: version 1 passed the elements' kind (item = 1)
        for kind, element_kind in ((USER, 1), (ITEM, 0)):
            torch.testing.assert_close(model.encoder(h, mask, torch.full((5,), kind)), old(h, mask, element_kind),
                                       rtol=1e-4, atol=1e-5)
