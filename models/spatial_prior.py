"""The SMCA spatial prior: reference centres, per-head offsets, dynamic scales and the head/query mixtures.

Math (see docs/ablation-modules.md): for query q and head m the co-attention logits get
``G = -D / smooth`` where ``D`` is a scaled squared distance between each feature cell (x = column, y = row)
and the head centre ``c = c0 + delta`` (feature cells). ``c0 = sigmoid(r_logit) * (w_b, h_b)`` comes from the
layer-0 reference MLP; ``delta`` and the scales are predicted per layer from ``u = LayerNorm(t + p)``.

Checkpoint parameter names (stable): ``transformer.decoder.reference.layers.{0,1,2}`` (the reference MLP) and
per decoder layer ``transformer.decoder.priors.{l}.norm``, ``.offset`` and ``.scale.proj`` (type2-4).
"""
from typing import Dict

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head shape)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


class FixedScale(nn.Module):
    """type1: ``D = dx^2 + dy^2`` (no scale parameters)."""

    num_scales = 0

    def __init__(self, d_model: int, nhead: int):
        super().__init__()

    def scales(self, u: Tensor) -> Tensor:
        """No scale parameters: an empty (B, 0, Q, 0) tensor."""
        return u.new_zeros(u.shape[0], 0, u.shape[1], 0)

    def forward(self, u: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return dx2 + dy2  # (B, nhead, Q, H, W)


class LearnedScale(nn.Module):
    """Scales ``Linear(d -> k * nhead)(u) ** 2``, ``k`` per head, laid out per head: view(B, Q, nhead, k).
    Weight 0 and bias 1 at start (the spec's rule), so every scale is 1: type2 and type3 then equal type1
    exactly. type4's coupling scale c is 1 too, so it starts at type1 + dx^2 dy^2; a zero start would freeze
    c for good (the gradient of a square at 0 is 0). The Transformer's xavier pass calls
    ``reset_parameters`` again after it has drawn every other weight."""

    num_scales: int

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.proj = nn.Linear(d_model, self.num_scales * nhead)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.ones_(self.proj.bias)

    def scales(self, u: Tensor) -> Tensor:
        """(B, Q, d) -> (B, nhead, Q, k) squared linear outputs."""
        batch, queries, _ = u.shape
        s = self.proj(u).square().view(batch, queries, self.nhead, self.num_scales)
        return s.permute(0, 2, 1, 3)  # (B, nhead, Q, k)

    def forward(self, u: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        s = self.scales(u)[..., None, None, :]  # (B, nhead, Q, 1, 1, k): broadcast over H, W
        return self.distance(s, dx2, dy2)


class HeadScale(LearnedScale):
    """type2: one scale per head, ``D = a (dx^2 + dy^2)``."""

    num_scales = 1

    def distance(self, s: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return s[..., 0] * (dx2 + dy2)


class XYScale(LearnedScale):
    """type3: independent x and y scales per head, ``D = a dx^2 + b dy^2``."""

    num_scales = 2

    def distance(self, s: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return s[..., 0] * dx2 + s[..., 1] * dy2


class CoupledScale(LearnedScale):
    """type4: ``D = a dx^2 + b dy^2 + c dx^2 dy^2``.

    The coupling term (product of squared offsets) reproduces the research code on purpose; it is not a
    covariance of a rotated Gaussian.
    """

    num_scales = 3

    def distance(self, s: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return s[..., 0] * dx2 + s[..., 1] * dy2 + s[..., 2] * dx2 * dy2


SCALES = {"type1": FixedScale, "type2": HeadScale, "type3": XYScale, "type4": CoupledScale}


def mixture_mask(num_queries: int, nhead: int, head_mixture: bool, query_mixture: bool) -> Tensor:
    """(num_queries, nhead) 0/1 mask of where the prior applies.

    ``head_mixture``: only the first floor(nhead / 2) heads; ``query_mixture``: only the queries after the
    first floor(num_queries / 2) (those are plain DETR queries). Both: where both masks are 1.
    """
    head_mask = torch.ones(nhead)
    query_mask = torch.ones(num_queries)
    if head_mixture:
        head_mask[nhead // 2:] = 0
    if query_mixture:
        query_mask[: num_queries // 2] = 0
    return query_mask[:, None] * head_mask[None, :]


class SpatialPrior(nn.Module):
    """One decoder layer's log-prior ``G`` (B, nhead, Q, H*W), already masked by the mixtures."""

    def __init__(self, d_model: int, nhead: int, scale: nn.Module, smooth: float, prior_mask: Tensor):
        super().__init__()
        self.nhead = nhead
        self.norm = nn.LayerNorm(d_model)
        self.offset = nn.Linear(d_model, 2 * nhead)
        self.scale = scale
        # G = -D / smooth where the prior applies, 0 elsewhere: one (1, nhead, Q, 1) factor
        self.register_buffer("factor", (-prior_mask / smooth).t()[None, :, :, None], persistent=False)

    def query_features(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """u = LayerNorm(t + p): (Q, B, d) -> (B, Q, d), in float32 (the prior stays fp32 under autocast)."""
        return self.norm((tgt + query_pos).float()).transpose(0, 1)

    def head_offsets(self, u: Tensor) -> Tensor:
        """(B, Q, d) -> per-head centre offsets (B, nhead, Q, 2) in feature cells."""
        batch, queries, _ = u.shape
        return self.offset(u).view(batch, queries, self.nhead, 2).permute(0, 2, 1, 3)

    def forward(self, tgt: Tensor, query_pos: Tensor, centre: Tensor, grid_x: Tensor, grid_y: Tensor) -> Tensor:
        """tgt, query_pos (Q, B, d); centre (B, Q, 2) layer-0 reference in feature cells;
        grid_x (W,), grid_y (H,) cell coordinates. Returns G (B, nhead, Q, H*W) in float32."""
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            u = self.query_features(tgt, query_pos)
            centres = centre.float()[:, None] + self.head_offsets(u)  # (B, nhead, Q, 2)
            # separable squared offsets: the full (H, W) grid only appears in D
            dx2 = (grid_x - centres[..., 0:1]).square()[..., None, :]  # (B, nhead, Q, 1, W)
            dy2 = (grid_y - centres[..., 1:2]).square()[..., :, None]  # (B, nhead, Q, H, 1)
            dist = self.scale(u, dx2, dy2)  # (B, nhead, Q, H, W)
            return dist.flatten(-2) * self.factor  # (B, nhead, Q, H*W)

    @torch.no_grad()
    def diagnostics(self, tgt: Tensor, query_pos: Tensor) -> Dict[str, Tensor]:
        """Predicted scales (all heads/queries, flattened) and the mean |offset| of the head centres."""
        u = self.query_features(tgt, query_pos)
        return {"scale": self.scale.scales(u).flatten(),
                "offset_norm": self.head_offsets(u).norm(dim=-1).mean()}


def build_priors(num_layers: int, d_model: int, nhead: int, num_queries: int, dynamic_scale: str,
                 smooth: float, head_mixture: bool, query_mixture: bool) -> nn.ModuleList:
    mask = mixture_mask(num_queries, nhead, head_mixture, query_mixture)
    scale = SCALES[dynamic_scale]
    return nn.ModuleList(SpatialPrior(d_model, nhead, scale(d_model, nhead), smooth, mask)
                         for _ in range(num_layers))
