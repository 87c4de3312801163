"""DETR's segmentation head (``--masks``): one mask per query on top of a detector.

``DETRsegm`` keeps the detector under ``detr.`` and adds ``bbox_attention`` (a multi-head attention map between
the last decoder output and the encoder memory) and ``mask_head`` (a small FPN-style convolutional head fed by
the backbone's layer3, layer2 and layer1 maps). Module names and shapes are DETR's, so its panoptic checkpoints
(R50, R50-DC5, R101) load with ``strict=True``. Any detector of this fork fits under it, the SMCA variants
included: the head reads only the decoder outputs, the encoder memory and the backbone features.
"""
import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.detr import DETR

# DETR's GroupNorm group count; a width it does not divide (small test models) uses the largest common divisor
GROUP_NORM_GROUPS = 8
# the mask head narrows the model width down to hidden_dim / MASK_HEAD_NARROWING before its output layer
MASK_HEAD_NARROWING = 16


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels)


class MHAttentionMap(nn.Module):
    """The attention probabilities of the decoder outputs over the encoder memory, per head, without the values."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.scale = (hidden_dim / num_heads) ** -0.5
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """query (B, Q, d) decoder outputs; memory (B, d, H, W); mask (B, H, W) True on padding.

        Returns (B, Q, nhead, H, W) probabilities, 0 on padded cells. As DETR, one softmax runs over heads and
        cells together, so each query's map sums to 1 over all heads, not per head.
        """
        batch, queries, _ = query.shape
        q = self.q_linear(query).view(batch, queries, self.num_heads, -1)  # (B, Q, nhead, d_h)
        # the key projection applied at every cell: a 1x1 convolution with the linear's weights
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # (B, hidden, H, W)
        k = k.view(batch, self.num_heads, -1, *k.shape[-2:])  # (B, nhead, d_h, H, W)
        logits = torch.einsum("bqnc,bnchw->bqnhw", q * self.scale, k)  # (B, Q, nhead, H, W)
        logits = logits.masked_fill(mask[:, None, None], float("-inf"))
        return logits.flatten(2).softmax(-1).view_as(logits)


class ScaledMHAttentionMap(MHAttentionMap):
    """``--mask_attention scaled``: DETR's map times nhead x the image's unpadded cells, so a uniform map is 1 at
    every cell instead of 1 / (nhead x cells). Same weights as MHAttentionMap; only the scale of the map changes.

    Why (docs/panoptic.md): the map is the mask head's only per-query input, concatenated with projected features
    of standard deviation of a few units. At DETR's scale (1/512 per cell at 8x8 cells and 8 heads) it reached the
    synthetic demo's head 100 to 200 times weaker than those features, and an Adam step moves every weight by about the learning rate
    whatever its input's scale, so the head needs many thousands of steps before its masks depend on the query.
    """

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        weights = super().forward(query, memory, mask)  # (B, Q, nhead, H, W), sums to 1 per query
        cells = (~mask).flatten(1).sum(1).to(weights)  # (B,) unpadded cells per image
        return weights * (cells * self.num_heads)[:, None, None, None, None]


# --mask_attention (options.MASK_ATTENTIONS): the attention map the mask head reads
ATTENTION_MAPS = {"detr": MHAttentionMap, "scaled": ScaledMHAttentionMap}


class MaskHeadSmallConv(nn.Module):
    """Convolutions with GroupNorm from the stride-s maps up to stride 4, adding the backbone's finer maps on the
    way (FPN-style); one mask logit map per (image, query).

    ``dim`` = d + nhead (the projected features next to each head's attention map), ``fpn_dims`` the channels of
    layer3, layer2, layer1, ``context_dim`` = d. Widths: lay1 dim -> dim, then d/2, d/4, d/8, d/16 (lay2-lay5);
    adapterN projects the Nth backbone map to the width it is added to.
    """

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        widths = [dim] + [context_dim // 2 ** k for k in range(1, 5)]  # outputs of lay1 .. lay5
        for index, (in_width, width) in enumerate(zip([dim] + widths[:-1], widths), start=1):
            self.add_module(f"lay{index}", nn.Conv2d(in_width, width, 3, padding=1))
            self.add_module(f"gn{index}", _group_norm(width))
        self.out_lay = nn.Conv2d(widths[-1], 1, 3, padding=1)
        for index, (fpn_dim, width) in enumerate(zip(fpn_dims, widths[1:4]), start=1):
            self.add_module(f"adapter{index}", nn.Conv2d(fpn_dim, width, 1))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def _stage(self, index: int, x: Tensor) -> Tensor:
        return F.relu(getattr(self, f"gn{index}")(getattr(self, f"lay{index}")(x)))

    def forward(self, src: Tensor, bbox_mask: Tensor, fpns: Sequence[Tensor]) -> Tensor:
        """src (B, d, Hf, Wf); bbox_mask (B, Q, nhead, Hf, Wf); fpns: layer3, layer2, layer1 maps (B, C_l, H_l, W_l),
        coarse to fine. Returns mask logits (B * Q, 1, H_1, W_1), image-major (row b * Q + q)."""
        queries = bbox_mask.shape[1]
        x = torch.cat([src.repeat_interleave(queries, 0), bbox_mask.flatten(0, 1)], 1)  # (B*Q, d + nhead, Hf, Wf)
        x = self._stage(2, self._stage(1, x))  # (B*Q, d/2, Hf, Wf)
        for level, fpn in enumerate(fpns, start=1):
            fpn = getattr(self, f"adapter{level}")(fpn).repeat_interleave(queries, 0)  # (B*Q, width, H_l, W_l)
            x = self._stage(level + 2, fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest"))
        return self.out_lay(x)  # (B*Q, 1, H_1, W_1)


class DETRsegm(nn.Module):
    """A detector (``detr``, built with the backbone's layer1-4) plus DETR's mask head: 'pred_masks' (B, Q, H/4, W/4)
    mask logits at stride 4 of the padded batch, next to the detector's outputs. Needs no targets.

    ``freeze_detr`` (``--frozen_weights``): only the mask head trains. Every detector parameter stops requiring
    gradients and BatchNorm layers of the detector (a ``--backbone_norm batch`` trunk) stay in eval mode, so
    their statistics do not move either; the transformer's dropout stays active in training, as in DETR.
    ``attention``: which map of ATTENTION_MAPS the mask head reads ('detr', or 'scaled' for --mask_attention).
    """

    def __init__(self, detr: DETR, freeze_detr: bool = False, attention: str = "detr"):
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            for parameter in detr.parameters():
                parameter.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        layer_channels = detr.backbone.layer_channels
        if len(layer_channels) != 4:
            raise ValueError("DETRsegm needs a backbone that returns layer1-4 (Backbone(return_interm_layers=True))")
        if hidden_dim < MASK_HEAD_NARROWING:
            raise ValueError(f"the mask head narrows the width by {MASK_HEAD_NARROWING}; hidden_dim {hidden_dim} is "
                             f"smaller")
        if attention not in ATTENTION_MAPS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_MAPS)}, got {attention!r}")
        self.bbox_attention = ATTENTION_MAPS[attention](hidden_dim, hidden_dim, nheads)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, layer_channels[2::-1], hidden_dim)

    def train(self, mode: bool = True) -> "DETRsegm":
        super().train(mode)
        if self.freeze_detr:
            for module in self.detr.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, samples) -> Dict:
        """samples: a NestedTensor (B, 3, H, W) + mask, a (B, 3, H, W) tensor or a list of (3, H, W) images (as
        DETR.forward). Returns DETR's outputs
        ('pred_logits', 'pred_boxes', 'aux_outputs') and 'pred_masks' (B, Q, H_1, W_1), H_1 = layer1's height."""
        out, inner = self.detr.forward_with_features(samples)
        batch, queries = out["pred_logits"].shape[:2]
        bbox_mask = self.bbox_attention(inner["hs"][-1], inner["memory"], inner["mask"])  # (B, Q, nhead, Hf, Wf)
        fpns = [level.tensors for level in inner["features"][2::-1]]  # layer3, layer2, layer1
        masks = self.mask_head(inner["src"], bbox_mask, fpns)  # (B*Q, 1, H_1, W_1)
        out["pred_masks"] = masks.view(batch, queries, *masks.shape[-2:])
        return out

    def smca_diagnostics(self, samples) -> Dict[str, Tensor]:
        """The detector's SMCA diagnostics (models/detr.py)."""
        return self.detr.smca_diagnostics(samples)


__all__ = ["ATTENTION_MAPS", "DETRsegm", "MHAttentionMap", "MaskHeadSmallConv", "ScaledMHAttentionMap"]
