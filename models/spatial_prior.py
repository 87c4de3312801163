"""The SMCA spatial prior: reference centres, per-head offsets, dynamic scales and the head/query mixtures.

Math (see docs/ablation-modules.md): for query q and head m the co-attention logits get
``G = -D / smooth`` where ``D`` is a scaled squared distance between each feature cell (x = column, y = row)
and the head centre ``c = c0 + delta`` (feature cells). ``c0 = sigmoid(r_logit) * (w_b, h_b)`` comes from the
layer-0 reference MLP; ``delta`` and the scales are predicted per layer from ``u = LayerNorm(t + p)``.

Two routes compute the same logits (``prior_impl``, docs/ablation-modules.md "Fused prior"):
- ``explicit``: ``G`` itself, a (B, nhead, Q, H*W) tensor added to the logits (the reference, and the source
  of ``G`` for diagnostics);
- ``fused``: ``G = f_q . g_k`` in factors. Every ``D`` is a polynomial of degree <= 2 in x and in y, so it
  equals its interpolant on 3 nodes per axis: ``f_q`` are ``D`` at the nodes (computed by the same scale
  module as the explicit route), ``g_k`` the Lagrange basis at each cell. The attention appends them to q and
  k (models/attention.py), so no (Q, H*W) tensor is built.

Checkpoint parameter names (stable): ``transformer.decoder.reference.layers.{0,1,2}`` (the reference MLP) and
per decoder layer ``transformer.decoder.priors.{l}.norm``, ``.offset`` and ``.scale.proj`` (type2-4).
"""
import math
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from models.attention import FactoredPrior

# type4's coupling term makes the fused factors ill-conditioned: float32 sums of node values up to
# c (W-1)^2 (H-1)^2 / smooth that cancel near the centre. Measured logit error on attended keys
# (docs/ablation-modules.md) stays within bf16's own q.k error up to a 42 x 42 grid (stride 32 at DETR's
# 1333-pixel max side) and exceeds it on DC5 grids, so on larger grids type4 takes the explicit route.
COUPLED_FUSED_MAX_AREA = 41 * 41  # (W - 1) * (H - 1)


def lagrange_basis(grid: Tensor) -> Tuple[Tensor, Tensor]:
    """Quadratic interpolation on one axis of cell coordinates ``grid`` (n,): nodes (3,) at the first, middle
    and last coordinate, and basis (n, 3), 1 at its own node and 0 at the other two. For any quadratic p,
    ``p(x) = sum_i p(node_i) basis[x, i]`` exactly. Computed in the centred coordinate t = (x - mid) / half in
    [-1, 1]: every basis value is in [-1/8, 1], which keeps the float error of the fused prior small."""
    mid = (grid[0] + grid[-1]) / 2
    half = ((grid[-1] - grid[0]) / 2).clamp_min(1.0)  # a one-cell axis: any three distinct nodes interpolate
    t = (grid - mid) / half  # (n,)
    nodes = torch.stack([mid - half, mid, mid + half])  # (3,), no host-to-device copy
    basis = torch.stack([t * (t - 1) / 2, 1 - t * t, t * (t + 1) / 2], dim=-1)  # (n, 3)
    return nodes, basis


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


class SeparablePolynomial:
    """``D = A(x) + B(y)`` with quadratics A, B (type1-3): 3 + 3 fused features.

    ``coefficients`` gets the squared offsets at the nodes, dx2 and dy2 (B, nhead, Q, 3), and returns
    [A(node_x), B(node_y)] (B, nhead, Q, 6), evaluated by the module's own ``forward`` (dy2 = 0 leaves A alone).
    Since each Lagrange basis sums to 1 over its nodes, [basis_x, basis_y] . [A, B] = A(x) + B(y) = D.
    """

    def coefficients(self, u: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        zero = torch.zeros_like(dx2)
        along_x = self(u, dx2[..., None, :], zero[..., None, :])  # (B, nhead, Q, 1, 3): A at the x nodes
        along_y = self(u, zero[..., :, None], dy2[..., :, None])  # (B, nhead, Q, 3, 1): B at the y nodes
        return torch.cat([along_x.flatten(-2), along_y.flatten(-2)], dim=-1)  # (B, nhead, Q, 6)

    @staticmethod
    def key_features(basis_x: Tensor, basis_y: Tensor) -> Tensor:
        """(W, 3), (H, 3) -> (H*W, 6), cells in the memory's row-major order."""
        height, width = basis_y.shape[0], basis_x.shape[0]
        features = torch.cat([basis_x[None, :, :].expand(height, width, 3),
                              basis_y[:, None, :].expand(height, width, 3)], dim=-1)  # (H, W, 6)
        return features.flatten(0, 1)


class CoupledPolynomial:
    """``D`` of degree 2 in x and in y together (type4's coupling term): the 3 x 3 tensor-product basis.

    ``coefficients`` returns D at the 3 x 3 nodes (B, nhead, Q, 9), y-node major.
    """

    def coefficients(self, u: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return self(u, dx2[..., None, :], dy2[..., :, None]).flatten(-2)  # (B, nhead, Q, 3 y * 3 x)

    @staticmethod
    def key_features(basis_x: Tensor, basis_y: Tensor) -> Tensor:
        """(W, 3), (H, 3) -> (H*W, 9): basis_y[y, j] * basis_x[x, i] at feature 3 j + i."""
        features = basis_y[:, None, :, None] * basis_x[None, :, None, :]  # (H, W, 3, 3)
        return features.flatten(2).flatten(0, 1)


class FixedScale(SeparablePolynomial, nn.Module):
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


class HeadScale(SeparablePolynomial, LearnedScale):
    """type2: one scale per head, ``D = a (dx^2 + dy^2)``."""

    num_scales = 1

    def distance(self, s: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return s[..., 0] * (dx2 + dy2)


class XYScale(SeparablePolynomial, LearnedScale):
    """type3: independent x and y scales per head, ``D = a dx^2 + b dy^2``."""

    num_scales = 2

    def distance(self, s: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
        return s[..., 0] * dx2 + s[..., 1] * dy2


class CoupledScale(CoupledPolynomial, LearnedScale):
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
    """One decoder layer's log-prior ``G`` (B, nhead, Q, H*W), already masked by the mixtures.

    ``impl``: 'explicit' returns G itself; 'fused' returns its factors (a FactoredPrior) for the attention to
    append to q and k, except for type4 on grids past COUPLED_FUSED_MAX_AREA, where it returns G.
    ``log_prior`` and ``factors`` compute either form whatever ``impl`` is (diagnostics, tests).
    """

    def __init__(self, d_model: int, nhead: int, scale: nn.Module, smooth: float, prior_mask: Tensor,
                 impl: str = "fused"):
        super().__init__()
        routes = {"fused": self._fused, "explicit": self.log_prior}
        if impl not in routes:
            raise ValueError(f"impl must be one of {tuple(routes)}, got {impl!r}")
        self.nhead = nhead
        self.norm = nn.LayerNorm(d_model)
        self.offset = nn.Linear(d_model, 2 * nhead)
        self.scale = scale
        # G = -D / smooth where the prior applies, 0 elsewhere: one (1, nhead, Q, 1) factor
        self.register_buffer("factor", (-prior_mask / smooth).t()[None, :, :, None], persistent=False)
        self.max_fused_area = COUPLED_FUSED_MAX_AREA if isinstance(scale, CoupledPolynomial) else math.inf
        self.forward = routes[impl]

    def query_features(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """u = LayerNorm(t + p): (Q, B, d) -> (B, Q, d), in float32 or wider (the prior stays float32 under
        autocast; float64 inputs stay float64)."""
        x = tgt + query_pos
        return self.norm(x.to(torch.promote_types(x.dtype, torch.float32))).transpose(0, 1)

    def head_offsets(self, u: Tensor) -> Tensor:
        """(B, Q, d) -> per-head centre offsets (B, nhead, Q, 2) in feature cells."""
        batch, queries, _ = u.shape
        return self.offset(u).view(batch, queries, self.nhead, 2).permute(0, 2, 1, 3)

    def _centres(self, u: Tensor, centre: Tensor) -> Tensor:
        """Head centres c = c0 + delta (B, nhead, Q, 2) from u (B, Q, d) and the reference c0 (B, Q, 2)."""
        return centre.to(u.dtype)[:, None] + self.head_offsets(u)

    def log_prior(self, tgt: Tensor, query_pos: Tensor, centre: Tensor, grid_x: Tensor, grid_y: Tensor) -> Tensor:
        """The explicit route. tgt, query_pos (Q, B, d); centre (B, Q, 2) layer-0 reference in feature cells;
        grid_x (W,), grid_y (H,) cell coordinates. Returns G (B, nhead, Q, H*W) in float32."""
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            u = self.query_features(tgt, query_pos)
            centres = self._centres(u, centre)  # (B, nhead, Q, 2)
            # separable squared offsets: the full (H, W) grid only appears in D
            dx2 = (grid_x - centres[..., 0:1]).square()[..., None, :]  # (B, nhead, Q, 1, W)
            dy2 = (grid_y - centres[..., 1:2]).square()[..., :, None]  # (B, nhead, Q, H, 1)
            dist = self.scale(u, dx2, dy2)  # (B, nhead, Q, H, W)
            return dist.flatten(-2) * self.factor  # (B, nhead, Q, H*W)

    def factors(self, tgt: Tensor, query_pos: Tensor, centre: Tensor, grid_x: Tensor,
                grid_y: Tensor) -> FactoredPrior:
        """The fused route's factors of G (inputs as ``log_prior``): query (B, nhead, Q, F) = -D / smooth at
        the interpolation nodes (0 where a mixture switches the prior off), key (H*W, F) = the Lagrange basis
        at each cell, so that query @ key.T equals G up to float rounding."""
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            u = self.query_features(tgt, query_pos)
            centres = self._centres(u, centre)  # (B, nhead, Q, 2)
            nodes_x, basis_x = lagrange_basis(grid_x.to(u.dtype))  # (3,), (W, 3)
            nodes_y, basis_y = lagrange_basis(grid_y.to(u.dtype))
            dx2 = (nodes_x - centres[..., 0:1]).square()  # (B, nhead, Q, 3)
            dy2 = (nodes_y - centres[..., 1:2]).square()
            query = self.scale.coefficients(u, dx2, dy2) * self.factor  # (B, nhead, Q, F)
            return FactoredPrior(query, self.scale.key_features(basis_x, basis_y))  # key (H*W, F)

    def _fused(self, tgt: Tensor, query_pos: Tensor, centre: Tensor, grid_x: Tensor, grid_y: Tensor):
        if (grid_x.shape[0] - 1) * (grid_y.shape[0] - 1) > self.max_fused_area:
            return self.log_prior(tgt, query_pos, centre, grid_x, grid_y)
        return self.factors(tgt, query_pos, centre, grid_x, grid_y)

    @torch.no_grad()
    def diagnostics(self, tgt: Tensor, query_pos: Tensor) -> Dict[str, Tensor]:
        """Predicted scales (all heads/queries, flattened) and the mean |offset| of the head centres."""
        u = self.query_features(tgt, query_pos)
        return {"scale": self.scale.scales(u).flatten(),
                "offset_norm": self.head_offsets(u).norm(dim=-1).mean()}


def build_priors(num_layers: int, d_model: int, nhead: int, num_queries: int, dynamic_scale: str,
                 smooth: float, head_mixture: bool, query_mixture: bool, prior_impl: str = "fused") -> nn.ModuleList:
    mask = mixture_mask(num_queries, nhead, head_mixture, query_mixture)
    scale = SCALES[dynamic_scale]
    return nn.ModuleList(SpatialPrior(d_model, nhead, scale(d_model, nhead), smooth, mask, prior_impl)
                         for _ in range(num_layers))
