"""Multi-head co-attention that adds a float log-prior to the logits, computed by the fused SDPA kernel."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModulatedCrossAttention(nn.Module):
    """softmax(q k^T / sqrt(d_h) + bias + padding) v per head, then the output projection.

    Parameter names and initialisation are those of ``nn.MultiheadAttention`` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so DETR's ``multihead_attn`` weights load unchanged. Only the logits
    differ: an optional additive ``attn_bias`` (the spatial prior G) is added before the softmax.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """(L, B, d) -> projected (B, nhead, L, d_h)."""
        length, batch, _ = x.shape
        x = F.linear(x, weight, bias)
        return x.view(length, batch, self.num_heads, -1).permute(1, 2, 0, 3)

    def _logit_mask(self, key_padding_mask: Tensor, attn_bias: Optional[Tensor], dtype) -> Tensor:
        """Additive mask (B, 1 or nhead, 1 or Q, S): the prior plus -inf on padded keys."""
        padding = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=key_padding_mask.device)
        padding = padding.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        mask = padding if attn_bias is None else attn_bias + padding
        return mask.to(dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        """query (Q, B, d), key/value (S, B, d), key_padding_mask (B, S) True on padding,
        attn_bias (B, nhead, Q, S) float or None. Returns (Q, B, d)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(query, w_q, b_q)  # (B, nhead, Q, d_h)
        k = self._heads(key, w_k, b_k)  # (B, nhead, S, d_h)
        v = self._heads(value, w_v, b_v)
        mask = self._logit_mask(key_padding_mask, attn_bias, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).flatten(2)  # (Q, B, d)
        return self.out_proj(out)

    def attention_weights(self, query: Tensor, key: Tensor, key_padding_mask: Tensor,
                          attn_bias: Optional[Tensor] = None) -> Tensor:
        """The attention probabilities (B, nhead, Q, S) the forward pass uses (without dropout), for diagnostics."""
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.in_proj_bias.chunk(3)
        q = self._heads(query, w_q, b_q)
        k = self._heads(key, w_k, b_k)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, nhead, Q, S)
        return (logits + self._logit_mask(key_padding_mask, attn_bias, logits.dtype)).softmax(-1)
