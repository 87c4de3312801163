"""Multi-scale encoders (docs/multiscale-smca.md, "Encoder layers"): one interface, two variants.

Both take the levels concatenated, finest first, each row-major: src and pos (N, B, d), the key padding mask
(B, N) and the levels' padded sizes [(H_l, W_l)], and return the memory (N, B, d).
- ``MultiScaleAttentionEncoder`` (the paper's P): a pattern over I and M. An I layer runs DETR's encoder layer on
  each level alone (one block for every level with ``intra_share``, else one per level), an M layer on the
  concatenation.
- ``DWConvEncoder`` (the official zip's Z): depthwise convolutions within each level, bottom-up (fine to coarse,
  stride 2) and top-down (coarse to fine), then DETR's post-norm FFN. No attention.
"""
import copy
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from models.transformer import TransformerEncoderLayer

# Z's 44.4 AP run (transformer_44_dot_4.py): 7x7 depthwise kernels, one bottom-up and one top-down conv per layer
DWCONV_KERNEL = 7
ENCODER_LAYERS = "IM"  # the letters of a pattern: I intra-scale, M multi-scale


def _lengths(sizes: Sequence[Tuple[int, int]]) -> List[int]:
    return [h * w for h, w in sizes]


class MultiScaleAttentionEncoder(nn.Module):
    """Layers ``encoder.layers.{k}``: DETR encoder layers; an I layer without ``intra_share`` holds one per level
    (``encoder.layers.{k}.{l}``)."""

    def __init__(self, layer: TransformerEncoderLayer, pattern: str, num_levels: int, intra_share: bool,
                 norm: nn.Module = None):
        super().__init__()
        if not pattern or set(pattern) - set(ENCODER_LAYERS):
            raise ValueError(f"pattern must be a non-empty string over {ENCODER_LAYERS}, got {pattern!r}")
        unshared = not intra_share
        self.layers = nn.ModuleList(
            nn.ModuleList(copy.deepcopy(layer) for _ in range(num_levels)) if kind == "I" and unshared
            else copy.deepcopy(layer) for kind in pattern)
        self.pattern = pattern
        self.norm = norm if norm is not None else nn.Identity()
        self.mixers = {"I": self._intra_unshared if unshared else self._intra_shared, "M": self._multi}

    @staticmethod
    def _multi(layer, src: Tensor, mask: Tensor, pos: Tensor, lengths: List[int]) -> Tensor:
        return layer(src, mask, pos)  # (N, B, d): (B * nhead, N, N) logits

    @staticmethod
    def _intra(blocks, src: Tensor, mask: Tensor, pos: Tensor, lengths: List[int]) -> Tensor:
        levels = zip(blocks, src.split(lengths), mask.split(lengths, 1), pos.split(lengths))
        return torch.cat([block(x, m, p) for block, x, m, p in levels])  # (N, B, d): (B * nhead, N_l, N_l) each

    def _intra_shared(self, layer, src, mask, pos, lengths):
        return self._intra([layer] * len(lengths), src, mask, pos, lengths)

    def _intra_unshared(self, layers, src, mask, pos, lengths):
        return self._intra(layers, src, mask, pos, lengths)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor, sizes: Sequence[Tuple[int, int]]) -> Tensor:
        lengths = _lengths(sizes)
        for kind, layer in zip(self.pattern, self.layers):
            src = self.mixers[kind](layer, src, key_padding_mask, pos, lengths)
        return self.norm(src)


def _upsample_to(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest x2 upsampling cropped to ``size`` (B, d, H, W): a fine cell reads the coarse cell covering it, so
    valid cells never read padding and an image's result does not depend on how far its batch is padded."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :size[0], :size[1]]


class DWConvEncoderLayer(nn.Module):
    """Z's encoder layer: per level ``a_l = DW_l(Conv1x1_1(X_l + P_l))``, then
    ``X_l += Drop(Conv1x1_2(a_l + Up(DW_td(a_{l+1})) + DW_bu,s2(a_{l-1})))`` (missing terms at the ends), then
    DETR's post-norm FFN per token. The 1x1 convs, the two cross-level convs, the norms and the FFN are shared by
    the levels; each level has its own depthwise kernel. Every input of a spatial conv is zeroed on padding."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, num_levels: int,
                 kernel_size: int = DWCONV_KERNEL):
        super().__init__()
        pad = kernel_size // 2

        def depthwise(stride=1):
            return nn.Conv2d(d_model, d_model, kernel_size, stride=stride, padding=pad, groups=d_model)

        self.conv1 = nn.Conv2d(d_model, d_model, 1)
        self.intra = nn.ModuleList(depthwise() for _ in range(num_levels))
        self.bottom_up = depthwise(stride=2)
        self.top_down = depthwise()
        self.conv2 = nn.Conv2d(d_model, d_model, 1)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def _ffn(self, x: Tensor) -> Tensor:
        """Post-norm token mixing on a map (B, d, H, W), channels last inside."""
        x = x.permute(0, 2, 3, 1)  # (B, H, W, d)
        x = self.norm1(x)
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(self.linear1(x).relu()))))
        return x.permute(0, 3, 1, 2)  # (B, d, H, W)

    def forward(self, maps: List[Tensor], keep: List[Tensor], pos: List[Tensor]) -> List[Tensor]:
        """maps, pos: per level (B, d, H_l, W_l), finest first; keep: (B, 1, H_l, W_l), 1 on valid cells, 0 on
        padding. Returns the new maps."""
        a = [conv(self.conv1(x + p) * k) for conv, x, p, k in zip(self.intra, maps, pos, keep)]
        a_valid = [x * k for x, k in zip(a, keep)]  # the cross-level convs read no padding either
        out = []
        for level, (x, a_l) in enumerate(zip(maps, a)):
            mix = a_l
            if level > 0:  # stride 2: (B, d, ceil(H_{l-1} / 2), ceil(W_{l-1} / 2)), level l's size
                mix = mix + self.bottom_up(a_valid[level - 1])
            if level + 1 < len(maps):
                mix = mix + _upsample_to(self.top_down(a_valid[level + 1]), a_l.shape[-2:])
            out.append(self._ffn(x + self.dropout1(self.conv2(mix))))
        return out


class DWConvEncoder(nn.Module):
    """``num_layers`` DWConvEncoderLayers (``encoder.layers.{k}``), on the sequence interface of this module."""

    def __init__(self, layer: DWConvEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor, sizes: Sequence[Tuple[int, int]]) -> Tensor:
        lengths = _lengths(sizes)
        batch, d_model = src.shape[1], src.shape[2]

        def to_maps(seq: Tensor) -> List[Tensor]:  # (N, B, d) -> per level (B, d, H_l, W_l)
            return [x.permute(1, 2, 0).reshape(batch, d_model, h, w) for x, (h, w) in zip(seq.split(lengths), sizes)]

        maps, pos_maps = to_maps(src), to_maps(pos)
        keep = [(~m).reshape(batch, 1, h, w).to(src.dtype)
                for m, (h, w) in zip(key_padding_mask.split(lengths, 1), sizes)]  # (B, 1, H_l, W_l)
        for layer in self.layers:
            maps = layer(maps, keep, pos_maps)
        return torch.cat([x.flatten(2).permute(2, 0, 1) for x in maps])  # (N, B, d)
