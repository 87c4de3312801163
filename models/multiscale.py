"""Multi-scale SMCA's decoder: the per-level spatial prior, scale-selection attention (SSA) and the decoder that
feeds them (docs/multiscale-smca.md, "Decoder" and "Per-level prior").

The memory is the concatenation of L levels (finest first, row-major each). For query q and head m, level l's
co-attention logits get ``G_l = -kappa_l D_l / smooth`` with ``D_l`` the scaled squared distance (any
--dynamic_scale type) between the head centre and the level's cells:
- ``shared`` (the paper's P): one centre and scale per head, in reference-stride units; level l's cell (i, j)
  sits at ``((j + 1/2) s_l / s_0 - 1/2, (i + 1/2) s_l / s_0 - 1/2)``, so every level samples one image-space
  Gaussian; kappa_l = 1.
- ``per_level`` (the official zip's Z): offsets and scales per level, each level in its own cells (x = j, y = i,
  centre r * (w, h) / s_l), and kappa_l = s_l / s_0 (Z's 0.5, 0.5, 1, 2).
With --scale_select softmax, each level gets its own softmax and the per-query weights
``alpha = softmax(Linear(u))`` (B, Q, L), shared by the heads, mix the level outputs; with none, one softmax
runs over all levels' keys.

Checkpoint names: ``transformer.decoder.priors.{k}.norm | .offset | .scale.proj | .scale_select`` (offsets and
scales are laid out level-major, then head, as Z's).
"""
from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models.attention import FactoredPrior, ModulatedCrossAttention, Prior
from models.spatial_prior import (MLP, SCALES, CoupledPolynomial, SeparablePolynomial, SpatialPrior, lagrange_basis,
                                  mixture_mask)
from models.transformer import TransformerDecoder, TransformerDecoderLayer


class LevelGrid(NamedTuple):
    """One decoder level's cell coordinates in the prior's units."""
    x: Tensor  # (W,)
    y: Tensor  # (H,)
    unit: float  # pixels per prior unit: the reference stride (shared) or the level's stride (per_level)
    kappa: float  # the level's factor on D: unit / reference stride
    span: float  # (x[-1] - x[0]) * (y[-1] - y[0]), for the fused route's type4 limit


class LevelBias(NamedTuple):
    """What a multi-scale co-attention adds to its logits: one prior per level and the scale weights."""
    priors: List[Prior]  # per level: G_l (B, nhead, Q, N_l) or its FactoredPrior
    alpha: Optional[Tensor]  # (B, Q, L) scale-selection weights; None: one joint softmax over the levels

    @property
    def sizes(self) -> List[int]:
        return [p.key.shape[0] if isinstance(p, FactoredPrior) else p.shape[-1] for p in self.priors]


def level_grids(sizes: Sequence[Tuple[int, int]], strides: Sequence[int], reference_stride: int, per_level: bool,
                device) -> List[LevelGrid]:
    """The grids of decoder levels of padded sizes (H_l, W_l) and strides s_l (see the module docstring)."""
    grids = []
    for (height, width), stride in zip(sizes, strides):
        unit = stride if per_level else reference_stride
        step = stride / unit
        x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * step - 0.5  # x = j at step 1
        y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * step - 0.5
        grids.append(LevelGrid(x, y, float(unit), unit / reference_stride, (width - 1) * (height - 1) * step ** 2))
    return grids


def joint_prior(priors: Sequence[Prior]) -> Prior:
    """One prior over the concatenated keys. Factored levels stay factored: their query factors side by side and
    their key features block-diagonal, so level l's factors meet only level l's keys."""
    if all(isinstance(p, FactoredPrior) for p in priors):
        return FactoredPrior(torch.cat([p.query for p in priors], -1),  # (B, nhead, Q, sum F_l)
                             torch.block_diag(*[p.key for p in priors]))  # (N, sum F_l)
    return torch.cat([p.dense() if isinstance(p, FactoredPrior) else p for p in priors], -1)  # (B, nhead, Q, N)


def _scaled_distance(scale: nn.Module, s: Tensor, u: Tensor, dx2: Tensor, dy2: Tensor) -> Tensor:
    """``scale``'s D with precomputed scales s (B, nhead, Q, k): the scale module's forward without its linear."""
    return scale.distance(s[..., None, None, :], dx2, dy2)


class MultiScalePrior(SpatialPrior):
    """One decoder layer's per-level priors and scale weights, returned as a LevelBias.

    ``groups`` = 1 (shared) or the number of levels (per_level): the offset and scale linears predict that many
    sets of per-head parameters (the parent's ``nhead`` counts every set). ``impl`` as SpatialPrior's: 'fused'
    gives each level's factors (its own interpolation nodes), 'explicit' each level's G.
    """

    def __init__(self, d_model: int, nhead: int, dynamic_scale: str, smooth: float, prior_mask: Tensor,
                 num_levels: int, per_level: bool, scale_select: bool, impl: str = "fused"):
        groups = num_levels if per_level else 1
        scale = SCALES[dynamic_scale](d_model, nhead * groups)
        super().__init__(d_model, nhead * groups, scale, smooth, prior_mask.repeat(1, groups), impl)
        self.groups = groups
        self.fused = impl == "fused"
        self.polynomial = CoupledPolynomial if isinstance(scale, CoupledPolynomial) else SeparablePolynomial
        if scale_select:
            self.scale_select = nn.Linear(d_model, num_levels)
            self.weights = self._scale_weights
        else:
            self.weights = lambda u: None
        self.forward = self.level_priors

    def _scale_weights(self, u: Tensor) -> Tensor:
        return self.scale_select(u).softmax(-1)  # (B, Q, L)

    def _distances(self, u: Tensor) -> list:
        """Per group, a callable (u, dx2, dy2) -> D with that group's scales (type1 has none)."""
        if not self.scale.num_scales:
            return [self.scale] * self.groups
        s = self.scale.scales(u).unflatten(1, (self.groups, -1))  # (B, groups, nhead, Q, k)
        return [partial(_scaled_distance, self.scale, s[:, g]) for g in range(self.groups)]

    def level_priors(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, extent: Tensor,
                     grids: Sequence[LevelGrid]) -> LevelBias:
        """tgt, query_pos (Q, B, d); reference (B, Q, 2) layer-0 r = sigmoid(r_logit) in (0, 1); extent (B, 2)
        unpadded (w, h) in pixels; grids per decoder level. Priors in float32 (or wider), as SpatialPrior's."""
        with torch.autocast(device_type=tgt.device.type, enabled=False):
            u = self.query_features(tgt, query_pos)  # (B, Q, d)
            offsets = self.head_offsets(u).unflatten(1, (self.groups, -1))  # (B, groups, nhead, Q, 2)
            factor = self.factor.unflatten(1, (self.groups, -1))  # (1, groups, nhead, Q, 1)
            distances = self._distances(u)
            priors = []
            for level, grid in enumerate(grids):
                g = level % self.groups
                centre = (reference * extent[:, None, :]).to(u.dtype) / grid.unit  # (B, Q, 2) prior units
                centres = centre[:, None] + offsets[:, g]  # (B, nhead, Q, 2)
                priors.append(self._level_prior(u, centres, distances[g], factor[:, g] * grid.kappa, grid))
            return LevelBias(priors, self.weights(u))

    def _level_prior(self, u: Tensor, centres: Tensor, distance, factor: Tensor, grid: LevelGrid) -> Prior:
        if self.fused and grid.span <= self.max_fused_area:
            nodes_x, basis_x = lagrange_basis(grid.x.to(u.dtype))  # (3,), (W, 3)
            nodes_y, basis_y = lagrange_basis(grid.y.to(u.dtype))
            dx2 = (nodes_x - centres[..., 0:1]).square()  # (B, nhead, Q, 3)
            dy2 = (nodes_y - centres[..., 1:2]).square()
            query = self.polynomial.coefficients(distance, u, dx2, dy2) * factor  # (B, nhead, Q, F)
            return FactoredPrior(query, self.scale.key_features(basis_x, basis_y))  # key (H*W, F)
        dx2 = (grid.x.to(u.dtype) - centres[..., 0:1]).square()[..., None, :]  # (B, nhead, Q, 1, W)
        dy2 = (grid.y.to(u.dtype) - centres[..., 1:2]).square()[..., :, None]  # (B, nhead, Q, H, 1)
        return distance(u, dx2, dy2).flatten(-2) * factor  # (B, nhead, Q, H*W)


class MultiScaleCrossAttention(ModulatedCrossAttention):
    """The co-attention of docs/multiscale-smca.md: with scale weights, ``sum_l alpha_l softmax_l(Z_l) V_l``
    (one softmax, one SDPA call per level; this cannot be one joint softmax with an additive mask, since the bias
    it would need depends on the logits); without, one softmax over every level's keys. Parameters are
    ModulatedCrossAttention's, shared by all levels."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor,
                attn_bias: LevelBias) -> Tensor:
        """query (Q, B, d), key/value (N, B, d) concatenated levels, key_padding_mask (B, N). Returns (Q, B, d)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(query, w_q, b_q)  # (B, nhead, Q, d_h)
        k = self._heads(key, w_k, b_k)  # (B, nhead, N, d_h)
        v = self._heads(value, w_v, b_v)
        dropout_p = self.dropout if self.training else 0.0
        if attn_bias.alpha is None:
            out = self._attend(q, k, v, key_padding_mask, joint_prior(attn_bias.priors), dropout_p)
        else:
            sizes = attn_bias.sizes
            alpha = attn_bias.alpha.to(q.dtype).transpose(1, 2)[:, :, None, :, None]  # (B, L, 1, Q, 1)
            levels = zip(k.split(sizes, 2), v.split(sizes, 2), key_padding_mask.split(sizes, 1), attn_bias.priors)
            out = sum(alpha[:, l] * self._attend(q, k_l, v_l, pad_l, prior_l, dropout_p)  # (B, nhead, Q, d_h)
                      for l, (k_l, v_l, pad_l, prior_l) in enumerate(levels))
        out = out.permute(2, 0, 1, 3).flatten(2)  # (Q, B, d)
        return self.out_proj(out)

    def attention_weights(self, query: Tensor, key: Tensor, key_padding_mask: Tensor,
                          attn_bias: LevelBias) -> Tensor:
        """The effective weights on the values (B, nhead, Q, N): alpha_l softmax_l per level, or the joint softmax."""
        if attn_bias.alpha is None:
            return super().attention_weights(query, key, key_padding_mask, joint_prior(attn_bias.priors))
        sizes = attn_bias.sizes
        alpha = attn_bias.alpha.transpose(1, 2)[:, :, None, :, None]  # (B, L, 1, Q, 1)
        levels = zip(key.split(sizes, 0), key_padding_mask.split(sizes, 1), attn_bias.priors)
        return torch.cat([alpha[:, l] * super(MultiScaleCrossAttention, self).attention_weights(query, k, pad, prior)
                          for l, (k, pad, prior) in enumerate(levels)], dim=-1)


class MultiScaleDecoderLayer(TransformerDecoderLayer):
    """DETR's decoder layer whose co-attention takes a LevelBias (models/transformer.py for the order)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool):
        super().__init__(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.multihead_attn = MultiScaleCrossAttention(d_model, nhead, dropout=dropout)


class MultiScaleDecoder(TransformerDecoder):
    """The SMCA decoder over several levels: the layer-0 reference (as single-scale SMCA), then per layer its
    LevelBias. ``strides`` are the decoder levels' strides, ``reference_stride`` s_0 (the single-scale stride)."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module, d_model: int, nhead: int,
                 num_queries: int, dynamic_scale: str, smooth: float, head_mixture: bool, query_mixture: bool,
                 strides: Tuple[int, ...], reference_stride: int, per_level: bool, scale_select: bool,
                 prior_impl: str = "fused"):
        super().__init__(layer, num_layers, norm)
        self.reference = MLP(d_model, d_model, 2, 3)
        mask = mixture_mask(num_queries, nhead, head_mixture, query_mixture)
        self.priors = nn.ModuleList(
            MultiScalePrior(d_model, nhead, dynamic_scale, smooth, mask, len(strides), per_level, scale_select,
                            prior_impl) for _ in range(num_layers))
        self.strides = tuple(strides)
        self.reference_stride = reference_stride
        self.per_level = per_level
        query_mask = mixture_mask(num_queries, nhead, False, query_mixture)[:, :1]
        self.register_buffer("box_mask", query_mask, persistent=False)  # (Q, 1): the queries with a prior

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, sizes, extent):
        """tgt, query_pos (Q, B, d); memory, pos (N, B, d) the decoder levels concatenated; sizes their (H_l, W_l);
        extent (B, 2) unpadded (w, h) in pixels. Returns hs (L, Q, B, d) and the box-logit reference (B, Q, 4)."""
        grids = level_grids(sizes, self.strides, self.reference_stride, self.per_level, memory.device)
        r_logit = self.reference(self.priors[0].query_features(tgt, query_pos))  # (B, Q, 2)
        reference = r_logit.sigmoid()
        intermediate = []
        for layer, prior in zip(self.layers, self.priors):
            bias = prior(tgt, query_pos, reference, extent, grids)
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, attn_bias=bias)
            intermediate.append(self.norm(tgt))
        box_reference = nn.functional.pad(r_logit, (0, 2)) * self.box_mask  # (B, Q, 4)
        return torch.stack(intermediate), box_reference
