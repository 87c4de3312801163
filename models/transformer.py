"""DETR's encoder-decoder transformer, with an SMCA decoder variant chosen at construction.

Sequences are (length, batch, d_model) as in DETR. Parameter names are DETR's, so official checkpoints load.
The SMCA decoder adds ``decoder.reference`` and ``decoder.priors`` (see models/spatial_prior.py) and keeps every
DETR parameter, so DETR weights can initialise an SMCA model (with ``strict=False``).
"""
import copy
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from models.attention import ModulatedCrossAttention
from models.spatial_prior import MLP, LearnedScale, build_priors, mixture_mask


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.forward = self.forward_pre if normalize_before else self.forward_post

    def _attend(self, x: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = _with_pos(x, pos)
        return self.self_attn(q, k, value=x, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.linear1(x).relu()))

    def forward_post(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        src = self.norm1(src + self.dropout1(self._attend(src, key_padding_mask, pos)))
        return self.norm2(src + self.dropout2(self._ffn(src)))

    def forward_pre(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        src = src + self.dropout1(self._attend(self.norm1(src), key_padding_mask, pos))
        return src + self.dropout2(self._ffn(self.norm2(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, co-attention to the encoder memory (with an optional log-prior), FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = ModulatedCrossAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.forward = self.forward_pre if normalize_before else self.forward_post

    def _self_attend(self, x: Tensor, query_pos: Tensor) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.self_attn(q, k, value=x, need_weights=False)[0]

    def _cross_attend(self, x, memory, memory_key_padding_mask, pos, query_pos, attn_bias) -> Tensor:
        return self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                   key_padding_mask=memory_key_padding_mask, attn_bias=attn_bias)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.linear1(x).relu()))

    def forward_post(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                     query_pos: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
        """tgt (Q, B, d), memory (HW, B, d), attn_bias (B, nhead, Q, HW) or None -> (Q, B, d)."""
        tgt = self.norm1(tgt + self.dropout1(self._self_attend(tgt, query_pos)))
        tgt = self.norm2(tgt + self.dropout2(
            self._cross_attend(tgt, memory, memory_key_padding_mask, pos, query_pos, attn_bias)))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))

    def forward_pre(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                    query_pos: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
        tgt = tgt + self.dropout1(self._self_attend(self.norm1(tgt), query_pos))
        tgt = tgt + self.dropout2(
            self._cross_attend(self.norm2(tgt), memory, memory_key_padding_mask, pos, query_pos, attn_bias))
        return tgt + self.dropout3(self._ffn(self.norm3(tgt)))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module]):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return self.norm(src)


class TransformerDecoder(nn.Module):
    """DETR's decoder: returns every layer's normed output and no box reference."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
                query_pos: Tensor, feature_size: Tuple[int, int], extent: Tensor) -> Tuple[Tensor, Tensor]:
        """tgt, query_pos (Q, B, d); memory, pos (HW, B, d). Returns hs (L, Q, B, d) and the box-logit
        reference to add to the box head (a zero scalar here: DETR adds nothing)."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate), tgt.new_zeros(())


class SMCADecoder(TransformerDecoder):
    """Decoder with spatially modulated co-attention: every layer's co-attention gets its layer's prior
    around centres reused from the layer-0 reference; the reference logit is also added to the box centres."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module, d_model: int, nhead: int,
                 num_queries: int, dynamic_scale: str, smooth: float, head_mixture: bool, query_mixture: bool,
                 prior_impl: str = "fused"):
        super().__init__(layer, num_layers, norm)
        self.reference = MLP(d_model, d_model, 2, 3)
        self.priors = build_priors(num_layers, d_model, nhead, num_queries, dynamic_scale, smooth,
                                   head_mixture, query_mixture, prior_impl)
        # queries that use the prior also get the reference added to their box centres
        query_mask = mixture_mask(num_queries, nhead, False, query_mixture)[:, 0]
        self.register_buffer("box_mask", query_mask[:, None], persistent=False)  # (Q, 1)

    def reference_logit(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """Layer-0 reference logits r_logit (B, Q, 2) from layer 0's u = LayerNorm(t + p)."""
        return self.reference(self.priors[0].query_features(tgt, query_pos))

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, feature_size, extent):
        """extent (B, 2): unpadded (w, h) in feature cells. Returns hs (L, Q, B, d) and the box-logit
        reference (B, Q, 4) = [r_logit_x, r_logit_y, 0, 0] on the queries with a prior."""
        height, width = feature_size
        grid_x = torch.arange(width, device=memory.device, dtype=torch.float32)
        grid_y = torch.arange(height, device=memory.device, dtype=torch.float32)
        r_logit = self.reference_logit(tgt, query_pos)  # (B, Q, 2)
        centre = r_logit.sigmoid() * extent[:, None, :]  # (B, Q, 2) feature cells
        intermediate = []
        for layer, prior in zip(self.layers, self.priors):
            bias = prior(tgt, query_pos, centre, grid_x, grid_y)  # G (B, nhead, Q, HW) or its FactoredPrior
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, attn_bias=bias)
            intermediate.append(self.norm(tgt))
        box_reference = nn.functional.pad(r_logit, (0, 2)) * self.box_mask  # (B, Q, 4)
        return torch.stack(intermediate), box_reference


def init_transformer(transformer: nn.Module) -> None:
    """DETR's init, after every layer exists (docs/ablation-modules.md, "Initialisation"): each parameter with more
    than one dimension gets its own xavier draw, so cloned layers start independent. The pass covers the SMCA
    reference MLP and offset/scale linears too (as the original code); the scale linears are then reset to weight 0,
    bias 1 (every scale starts at 1)."""
    for p in transformer.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for module in transformer.modules():
        if isinstance(module, LearnedScale):
            module.reset_parameters()


class Transformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False, num_queries: int = 100, dynamic_scale: str = "none",
                 smooth: float = 8.0, head_mixture: bool = False, query_mixture: bool = False,
                 prior_impl: str = "fused"):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        if dynamic_scale == "none":
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        else:
            self.decoder = SMCADecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), d_model, nhead,
                                       num_queries, dynamic_scale, smooth, head_mixture, query_mixture,
                                       prior_impl)
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        init_transformer(self)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                extent: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """src, pos_embed (B, d, H, W); mask (B, H, W); query_embed (Q, d); extent (B, 2).
        Returns hs (L, B, Q, d), the box-logit reference (broadcastable to (B, Q, 4)) and the encoder memory
        (B, d, H, W), which DETR's segmentation head attends to."""
        batch, _, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # (HW, B, d)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # (HW, B, d)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, d)
        mask = mask.flatten(1)  # (B, HW)
        memory = self.encoder(src, key_padding_mask=mask, pos=pos_embed)
        tgt = torch.zeros_like(query_pos)
        hs, box_reference = self.decoder(tgt, memory, mask, pos_embed, query_pos, (height, width), extent)
        memory = memory.permute(1, 2, 0).view(batch, -1, height, width)  # (B, d, H, W)
        return hs.transpose(1, 2), box_reference, memory  # hs (L, B, Q, d)
