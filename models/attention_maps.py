"""What the last decoder layer looks at: its co-attention per head and, for SMCA, the spatial prior G of each head
and the head centres, captured with forward hooks during one ordinary forward pass (the modules are unchanged).

The attention probabilities come from ``ModulatedCrossAttention.attention_weights`` on the inputs of the layer's
co-attention call (whichever route, fused or explicit, the prior took), G from ``SpatialPrior.log_prior`` on the
inputs of that layer's prior: the explicit G of the spec (docs/ablation-modules.md: *Centres*, *Modulated
co-attention*), which the fused route equals up to float rounding.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


@dataclass
class CoAttentionMaps:
    """One forward pass's last-layer maps; H, W are the feature map's (cells of ``stride`` input pixels)."""
    attention: Tensor  # (B, nhead, Q, H, W) attention probabilities over the feature cells
    prior: Optional[Tensor]  # (B, nhead, Q, H, W) log-prior G added to the logits; None for plain DETR
    centres: Optional[Tensor]  # (B, nhead, Q, 2) head centres (x, y) in feature cells; None for plain DETR
    prior_mask: Optional[Tensor]  # (Q, nhead) 1 where the prior applies (head/query mixtures), else 0
    stride: int  # model-input pixels per feature cell


@torch.no_grad()
def co_attention_maps(model: nn.Module, samples: NestedTensor) -> Tuple[Dict[str, Tensor], CoAttentionMaps]:
    """Run ``model`` (a DETR, or a DETRsegm around one) in eval mode on ``samples``; returns its outputs and the
    last decoder layer's maps."""
    detector = getattr(model, "detr", model)  # DETRsegm keeps its detector under .detr
    decoder = detector.transformer.decoder
    priors = getattr(decoder, "priors", None)
    captured: Dict[str, Tensor] = {}

    def features(module, args, output):
        captured["feature_mask"] = output[0][-1].mask  # (B, H, W)

    def co_attention(module, args, kwargs, output):
        query, key = args[0], args[1]
        captured["attention"] = module.attention_weights(query, key, kwargs["key_padding_mask"],
                                                         kwargs.get("attn_bias"))  # (B, nhead, Q, HW)

    def prior(module, args, output):
        tgt, query_pos, centre = args[0], args[1], args[2]
        offsets = module.head_offsets(module.query_features(tgt, query_pos))  # (B, nhead, Q, 2)
        captured["centres"] = centre.float()[:, None] + offsets
        captured["prior"] = module.log_prior(*args)  # (B, nhead, Q, HW)

    handles = [detector.backbone.register_forward_hook(features),
               decoder.layers[-1].multihead_attn.register_forward_hook(co_attention, with_kwargs=True)]
    if priors is not None:
        handles.append(priors[-1].register_forward_hook(prior))
    was_training = model.training
    model.eval()
    try:
        outputs = model(samples)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    height, width = captured["feature_mask"].shape[-2:]

    def grid(maps: Tensor) -> Tensor:
        return maps.unflatten(-1, (height, width))  # (B, nhead, Q, HW) -> (B, nhead, Q, H, W)

    prior_mask = None
    if priors is not None:
        # SpatialPrior.factor is -mask / smooth laid out (1, nhead, Q, 1): non-zero exactly where the prior applies
        prior_mask = (priors[-1].factor[0, :, :, 0] != 0).t().float()  # (Q, nhead)
    return outputs, CoAttentionMaps(
        attention=grid(captured["attention"].float()),
        prior=grid(captured["prior"]) if "prior" in captured else None,
        centres=captured.get("centres"),
        prior_mask=prior_mask,
        stride=detector.backbone.stride,
    )
