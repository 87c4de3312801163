"""Multi-head co-attention with an additive log-prior on the logits, computed by the fused SDPA kernel.

The prior comes either as a float tensor G (the explicit route) or as factors with ``G = query @ key.T``
(the fused route, models/spatial_prior.py): appended to each head's q and k, they add exactly G to the
logits, so no (Q, S) tensor is built and padding stays a (B, 1, 1, S) key mask.
"""
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The fused route's q/k head dim is padded with zeros to a multiple of this: CUDA's memory-efficient kernel
# needs it for float32 (its only dtype here, see _fused); zeros add nothing to the logits.
FUSED_HEAD_DIM_MULTIPLE = 4


class FactoredPrior(NamedTuple):
    """The log-prior as factors: G[b, m, q, s] = query[b, m, q] . key[s]."""

    query: Tensor  # (B, nhead, Q, F)
    key: Tensor  # (S, F)

    def dense(self) -> Tensor:
        """G (B, nhead, Q, S), for diagnostics and tests (the attention never builds it)."""
        return self.query @ self.key.T


Prior = Union[Tensor, FactoredPrior]


class ModulatedCrossAttention(nn.Module):
    """softmax(q k^T / sqrt(d_h) + bias + padding) v per head, then the output projection.

    Parameter names and initialisation are those of ``nn.MultiheadAttention`` (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so DETR's ``multihead_attn`` weights load unchanged. Only the logits
    differ: an optional additive ``attn_bias`` (the spatial prior G, or its FactoredPrior) is added before the
    softmax.
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

    @staticmethod
    def _augmented(q: Tensor, k: Tensor, prior: FactoredPrior) -> Tuple[Tensor, Tensor]:
        """[q / sqrt(d_h), prior.query, 0] and [k, prior.key, 0]: (B, nhead, L, D) with D = d_h + F rounded up
        to FUSED_HEAD_DIM_MULTIPLE, whose dot products are q.k / sqrt(d_h) + G (use SDPA's scale=1)."""
        batch, heads, _, head_dim = k.shape
        features = prior.key.shape[-1]
        pad = -(head_dim + features) % FUSED_HEAD_DIM_MULTIPLE
        q = torch.cat([q / math.sqrt(head_dim), prior.query.to(q.dtype)], dim=-1)  # (B, nhead, Q, d_h + F)
        k = torch.cat([k, prior.key.to(k.dtype).expand(batch, heads, -1, -1)], dim=-1)  # (B, nhead, S, d_h + F)
        return F.pad(q, (0, pad)), F.pad(k, (0, pad))

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, prior: FactoredPrior,
               dropout_p: float) -> Tensor:
        """SDPA on the augmented q/k, in float32 or wider whatever the autocast dtype: bf16 extra dims would
        cost logit errors far beyond bf16's own on q.k (docs/ablation-modules.md). Returns (B, nhead, Q, d_h)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q_aug, k_aug = self._augmented(q.to(dtype), k.to(dtype), prior)
            v = v.to(dtype)
            head_dim = v.shape[-1]
            if _flash_needs_equal_head_dims(v, dropout_p):
                v = F.pad(v, (0, q_aug.shape[-1] - head_dim))  # (B, nhead, S, D)
            mask = self._logit_mask(key_padding_mask, None, dtype)  # (B, 1, 1, S)
            out = F.scaled_dot_product_attention(q_aug, k_aug, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)
        return out[..., :head_dim].to(q.dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor,
                attn_bias: Optional[Prior] = None) -> Tensor:
        """query (Q, B, d), key/value (S, B, d), key_padding_mask (B, S) True on padding, attn_bias G
        (B, nhead, Q, S) float, its FactoredPrior, or None. Returns (Q, B, d)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(query, w_q, b_q)  # (B, nhead, Q, d_h)
        k = self._heads(key, w_k, b_k)  # (B, nhead, S, d_h)
        v = self._heads(value, w_v, b_v)
        out = self._attend(q, k, v, key_padding_mask, attn_bias, self.dropout if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).flatten(2)  # (Q, B, d)
        return self.out_proj(out)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, attn_bias: Optional[Prior],
                dropout_p: float) -> Tensor:
        """Projected heads q (B, nhead, Q, d_h), k/v (B, nhead, S, d_h) -> (B, nhead, Q, d_h) by the prior's route."""
        if isinstance(attn_bias, FactoredPrior):
            return self._fused(q, k, v, key_padding_mask, attn_bias, dropout_p)
        mask = self._logit_mask(key_padding_mask, attn_bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def logits(self, query: Tensor, key: Tensor, key_padding_mask: Tensor,
               attn_bias: Optional[Prior] = None) -> Tensor:
        """The attention logits (B, nhead, Q, S) the forward pass uses, -inf on padded keys, for diagnostics
        and precision measurements: materialised, in the precision of the route (float32 or wider for the
        fused route, the input dtype otherwise)."""
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.in_proj_bias.chunk(3)
        q = self._heads(query, w_q, b_q)
        k = self._heads(key, w_k, b_k)
        if isinstance(attn_bias, FactoredPrior):
            dtype = torch.promote_types(q.dtype, torch.float32)
            with torch.autocast(device_type=q.device.type, enabled=False):
                q_aug, k_aug = self._augmented(q.to(dtype), k.to(dtype), attn_bias)
                return q_aug @ k_aug.transpose(-1, -2) + self._logit_mask(key_padding_mask, None, dtype)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, nhead, Q, S)
        return logits + self._logit_mask(key_padding_mask, attn_bias, logits.dtype)

    def attention_weights(self, query: Tensor, key: Tensor, key_padding_mask: Tensor,
                          attn_bias: Optional[Prior] = None) -> Tensor:
        """The attention probabilities (B, nhead, Q, S) the forward pass uses (without dropout), for diagnostics."""
        return self.logits(query, key, key_padding_mask, attn_bias).softmax(-1)


def _flash_needs_equal_head_dims(v: Tensor, dropout_p: float) -> bool:
    """Whether padding v to the augmented q/k head dim lets a fused SDPA kernel run. PyTorch's CPU flash kernel
    needs equal q, k, v head dims and no dropout (else SDPA takes the math kernel, which accepts any v). On
    CUDA the memory-efficient kernel accepts a different v head dim, and flash refuses any attn_mask anyway."""
    return v.device.type == "cpu" and dropout_p == 0.0
