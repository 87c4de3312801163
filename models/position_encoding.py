"""Position encodings for the feature map: DETR's normalised sine encoding, or learned row/column embeddings."""
import math

import torch
from torch import nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine of the normalised cumulative (y, x) position of each unpadded cell, as in DETR."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, features: NestedTensor) -> torch.Tensor:
        """(B, H, W) mask -> (B, 2 * num_pos_feats, H, W) encoding (y half first, then x)."""
        not_mask = ~features.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[..., None] / dim_t
        # interleave sin on even and cos on odd features
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


class PositionEmbeddingLearned(nn.Module):
    """Learned embeddings of the row and column index (up to ``max_cells`` each)."""

    def __init__(self, num_pos_feats: int, max_cells: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_cells, num_pos_feats)
        self.col_embed = nn.Embedding(max_cells, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, features: NestedTensor) -> torch.Tensor:
        """(B, C, H, W) features -> (B, 2 * num_pos_feats, H, W) encoding (x half first, then y)."""
        x = features.tensors
        height, width = x.shape[-2:]
        col = self.col_embed(torch.arange(width, device=x.device))  # (W, F)
        row = self.row_embed(torch.arange(height, device=x.device))  # (H, F)
        pos = torch.cat([col[None].expand(height, -1, -1), row[:, None].expand(-1, width, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)  # (B, 2F, H, W)


POSITION_ENCODINGS = {"sine": lambda feats: PositionEmbeddingSine(feats, normalize=True),
                      "learned": PositionEmbeddingLearned}


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """'sine' or 'learned', half of ``hidden_dim`` for each of x and y."""
    if kind not in POSITION_ENCODINGS:
        raise ValueError(f"position_embedding must be one of {sorted(POSITION_ENCODINGS)}, got {kind!r}")
    return POSITION_ENCODINGS[kind](hidden_dim // 2)
