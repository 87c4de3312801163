"""Multi-scale SMCA's decoder against plain re-implementations of docs/multiscale-smca.md: the per-level prior in
both modes (shared: one image-space Gaussian per head; per_level: Z's offsets, scales and level factors), the
co-attention with one softmax per level mixed by the scale weights (a dense loop), the joint softmax of
--scale_select none, and the fused route against the explicit one within float32 bounds."""
import math

import pytest
import torch

from models.attention import FactoredPrior, ModulatedCrossAttention
from models.multiscale import LevelBias, MultiScaleCrossAttention, MultiScalePrior, joint_prior, level_grids
from models.spatial_prior import SCALES, mixture_mask
from tests.test_fused_prior import compare, logit_error_bound

pytestmark = pytest.mark.usefixtures("single_thread")

B, Q, M, D = 2, 5, 4, 16
REFERENCE_STRIDE = 32
STRIDES = (16, 32, 64)
# padded level sizes (H_l, W_l), a ceil chain; image 0 is padded below, image 1 on the right (in pixels: 48 x 96
# and 64 x 40 in a 64 x 96 batch)
SIZES = [(4, 6), (2, 3), (1, 2)]
EXTENT_PX = torch.tensor([[96.0, 48.0], [40.0, 64.0]])  # (w, h) per image


def level_padding(sizes=SIZES, strides=STRIDES, extent=EXTENT_PX):
    """Per level (B, H_l * W_l), True on the cells past each image's unpadded extent (nearest interpolation)."""
    masks = []
    for (h, w), stride in zip(sizes, strides):
        rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
        masks.append(torch.stack([((rows * stride >= eh) | (cols * stride >= ew)).flatten()
                                  for ew, eh in extent.tolist()]))
    return masks


def reference_log_priors(prior, scale_type, tgt, query_pos, reference, extent, sizes, strides, per_level, smooth,
                         mask):
    """G_l (B, M, Q, N_l) per level, written from the spec's formulas, query-major."""
    groups = len(strides) if per_level else 1
    u = prior.norm(tgt + query_pos).transpose(0, 1)  # (B, Q, d)
    offsets = prior.offset(u).view(B, Q, groups, M, 2)
    k = SCALES[scale_type].num_scales
    s = prior.scale.proj(u).square().view(B, Q, groups, M, k) if k else None
    priors = []
    for level, ((h, w), stride) in enumerate(zip(sizes, strides)):
        g = level if per_level else 0
        unit = stride if per_level else REFERENCE_STRIDE
        kappa = unit / REFERENCE_STRIDE
        xs = (torch.arange(w) + 0.5) * stride / unit - 0.5  # cell centres in prior units
        ys = (torch.arange(h) + 0.5) * stride / unit - 0.5
        c = (reference * extent[:, None, :] / unit)[:, :, None, :] + offsets[:, :, g]  # (B, Q, M, 2)
        dx2 = (xs[None, None, None, None, :] - c[..., 0, None, None]).square()  # (B, Q, M, 1, W)
        dy2 = (ys[None, None, None, :, None] - c[..., 1, None, None]).square()  # (B, Q, M, H, 1)
        if k:
            a = s[:, :, g, :, :, None, None]  # (B, Q, M, k, 1, 1)
        distance = {"type1": lambda: dx2 + dy2,
                    "type2": lambda: a[:, :, :, 0] * (dx2 + dy2),
                    "type3": lambda: a[:, :, :, 0] * dx2 + a[:, :, :, 1] * dy2,
                    "type4": lambda: a[:, :, :, 0] * dx2 + a[:, :, :, 1] * dy2 + a[:, :, :, 2] * dx2 * dy2}[scale_type]()
        G = -kappa * distance / smooth * mask[None, :, :, None, None]  # (B, Q, M, H, W)
        priors.append(G.flatten(-2).transpose(1, 2))  # (B, M, Q, H*W)
    return priors


def make_prior(scale_type, per_level, impl, mixtures=(False, False), smooth=8.0, scale_select=True, levels=3):
    torch.manual_seed(0)
    mask = mixture_mask(Q, M, *mixtures)
    prior = MultiScalePrior(D, M, scale_type, smooth, mask, levels, per_level, scale_select, impl)
    with torch.no_grad():  # away from the start values, as after training: every term matters
        prior.norm.weight.uniform_(0.5, 1.5)
        prior.offset.weight.normal_(0, 0.1)
        if scale_type != "type1":
            prior.scale.proj.weight.normal_(0, 0.1)
            prior.scale.proj.bias.uniform_(0.5, 1.5)
    return prior, mask


def decoder_inputs(seed=1, n=sum(h * w for h, w in SIZES)):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(Q, B, D, generator=g)
    query_pos = torch.randn(Q, B, D, generator=g)
    memory = torch.randn(n, B, D, generator=g)
    reference = torch.rand(B, Q, 2, generator=g)
    return tgt, query_pos, memory, reference


@pytest.mark.quick
@pytest.mark.parametrize("per_level", [False, True], ids=["shared", "per_level"])
@pytest.mark.parametrize("scale_type", list(SCALES))
def test_explicit_level_priors_equal_the_spec_formulas(scale_type, per_level):
    prior, mask = make_prior(scale_type, per_level, "explicit", mixtures=(True, True))
    tgt, query_pos, _, reference = decoder_inputs()
    grids = level_grids(SIZES, STRIDES, REFERENCE_STRIDE, per_level, "cpu")
    bias = prior(tgt, query_pos, reference, EXTENT_PX, grids)
    expected = reference_log_priors(prior, scale_type, tgt, query_pos, reference, EXTENT_PX, SIZES, STRIDES,
                                    per_level, 8.0, mask)
    assert bias.sizes == [h * w for h, w in SIZES]
    for got, want in zip(bias.priors, expected):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (bias.priors[0] != bias.priors[1][..., :1]).any()  # levels differ: no level reuses another's grid
    torch.testing.assert_close(bias.alpha, prior.scale_select(prior.query_features(tgt, query_pos)).softmax(-1))
    torch.testing.assert_close(bias.alpha.sum(-1), torch.ones(B, Q))


def test_grids_line_up_in_image_space_and_z_level_factors():
    shared = level_grids([(3, 4), (2, 2)], (16, 32), REFERENCE_STRIDE, False, "cpu")
    torch.testing.assert_close(shared[1].x, torch.arange(2.0))  # at the reference stride: the single-scale grid
    for grid, stride in zip(shared, (16, 32)):  # a cell centre in pixels: (j + 1/2) stride, for every level
        torch.testing.assert_close((grid.x + 0.5) * REFERENCE_STRIDE, (torch.arange(len(grid.x)) + 0.5) * stride)
    z = level_grids([(2, 2)] * 4, (16, 16, 32, 64), REFERENCE_STRIDE, True, "cpu")
    assert [g.kappa for g in z] == [0.5, 0.5, 1.0, 2.0]  # Z's factors on D (spec section 5.6)
    assert all(torch.equal(g.x, torch.arange(2.0)) for g in z)  # Z's integer grid per level


@pytest.mark.parametrize("per_level", [False, True], ids=["shared", "per_level"])
@pytest.mark.parametrize("scale_type", list(SCALES))
def test_fused_level_priors_multiply_out_to_the_explicit_ones(scale_type, per_level):
    fused, explicit = (make_prior(scale_type, per_level, impl)[0].double() for impl in ("fused", "explicit"))
    tgt, query_pos, _, reference = decoder_inputs()
    grids = level_grids(SIZES, STRIDES, REFERENCE_STRIDE, per_level, "cpu")
    factored = fused(tgt.double(), query_pos.double(), reference.double(), EXTENT_PX.double(), grids)
    dense = explicit(tgt.double(), query_pos.double(), reference.double(), EXTENT_PX.double(), grids)
    for f, g in zip(factored.priors, dense.priors):
        assert isinstance(f, FactoredPrior)
        torch.testing.assert_close(f.dense(), g, rtol=0, atol=1e-10 * g.abs().max().item())


def reference_co_attention(module, query, key, value, padding, priors, alpha):
    """Per image, head and level: softmax_l(q k_l^T / sqrt(d_h) + G_l + P_l) v_l, weighted by alpha_l and summed
    (alpha None: one softmax over all levels); then out_proj."""
    d_h = D // M
    w_q, w_k, w_v = module.in_proj_weight.split(D)
    b_q, b_k, b_v = module.in_proj_bias.split(D)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v  # (L, B, d)
    sizes = [p.shape[-1] for p in priors]
    out = torch.zeros(Q, B, D)
    for b in range(B):
        for m in range(M):
            cols = slice(m * d_h, (m + 1) * d_h)
            logits = q[:, b, cols] @ k[:, b, cols].T / math.sqrt(d_h)  # (Q, N)
            logits = logits + torch.cat([p[b, m] for p in priors], -1)
            logits = logits.masked_fill(padding[b][None, :], float("-inf"))
            if alpha is None:
                out[:, b, cols] = logits.softmax(-1) @ v[:, b, cols]
                continue
            start = 0
            for level, size in enumerate(sizes):
                block = slice(start, start + size)
                weights = logits[:, block].softmax(-1) * alpha[b, :, level, None]
                out[:, b, cols] += weights @ v[block, b, cols]
                start += size
    return out @ module.out_proj.weight.T + module.out_proj.bias


def attention_case(seed=0):
    torch.manual_seed(seed)
    module = MultiScaleCrossAttention(D, M, dropout=0.0)
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    sizes = [h * w for h, w in SIZES]
    g = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(Q, B, D, generator=g)
    key = torch.randn(sum(sizes), B, D, generator=g)
    value = torch.randn(sum(sizes), B, D, generator=g)
    priors = [-4 * torch.rand(B, M, Q, n, generator=g) for n in sizes]
    alpha = torch.randn(B, Q, len(sizes), generator=g).softmax(-1)
    return module, query, key, value, torch.cat(level_padding(), 1), priors, alpha


@pytest.mark.quick
@pytest.mark.parametrize("select", [True, False], ids=["softmax", "none"])
def test_co_attention_equals_a_dense_loop(select):
    module, query, key, value, padding, priors, alpha = attention_case()
    alpha = alpha if select else None
    out = module(query, key, value, padding, LevelBias(priors, alpha))
    torch.testing.assert_close(out, reference_co_attention(module, query, key, value, padding, priors, alpha),
                               rtol=1e-5, atol=1e-5)
    weights = module.attention_weights(query, key, padding, LevelBias(priors, alpha))  # (B, M, Q, N)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, M, Q))  # convex in both modes
    assert (weights.masked_select(padding[:, None, None, :].expand_as(weights)) == 0).all()


def test_one_hot_scale_weights_give_that_level_alone():
    module, query, key, value, padding, priors, _ = attention_case()
    sizes = [p.shape[-1] for p in priors]
    single = ModulatedCrossAttention(D, M)
    single.load_state_dict(module.state_dict())  # the same parameter names: DETR's
    for level in range(len(sizes)):
        alpha = torch.nn.functional.one_hot(torch.full((B, Q), level), len(sizes)).float()
        out = module(query, key, value, padding, LevelBias(priors, alpha))
        block = slice(sum(sizes[:level]), sum(sizes[:level + 1]))
        expected = single(query, key[block], value[block], padding[:, block], priors[level])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_joint_prior_of_factored_levels_is_block_diagonal():
    g = torch.Generator().manual_seed(3)
    factored = [FactoredPrior(torch.randn(B, M, Q, f, generator=g), torch.randn(n, f, generator=g))
                for f, n in ((6, 24), (9, 6), (6, 2))]
    joint = joint_prior(factored)
    assert isinstance(joint, FactoredPrior) and joint.key.shape == (32, 21)
    torch.testing.assert_close(joint.dense(), torch.cat([p.dense() for p in factored], -1))
    mixed = joint_prior([factored[0], factored[1].dense(), factored[2]])  # a dense level (type4 past its grid)
    torch.testing.assert_close(mixed, joint.dense())


@pytest.mark.parametrize("select", [True, False], ids=["softmax", "none"])
@pytest.mark.parametrize("per_level", [False, True], ids=["shared", "per_level"])
@pytest.mark.parametrize("scale_type", ["type2", "type4"])
def test_fused_equals_explicit_co_attention_and_gradients(scale_type, per_level, select):
    """Per level, the bound of tests/test_fused_prior.py (Higham's dot-product bound on the logits, 4 eps relative
    for the outputs and gradients); the scale weights are convex, so the largest level's bound holds."""
    results, bounds = {}, []
    tgt, query_pos, memory, reference = decoder_inputs()
    padding = torch.cat(level_padding(), 1)
    grids = level_grids(SIZES, STRIDES, REFERENCE_STRIDE, per_level, "cpu")
    for impl in ("explicit", "fused"):
        prior, _ = make_prior(scale_type, per_level, impl, mixtures=(True, False), scale_select=select)
        torch.manual_seed(5)
        attention = MultiScaleCrossAttention(D, M)
        inputs = [t.clone().requires_grad_() for t in (tgt, query_pos, memory)]
        bias = prior(inputs[0], inputs[1], reference, EXTENT_PX, grids)
        out = attention(inputs[0] + inputs[1], inputs[2], inputs[2], padding, bias)
        params = [*prior.parameters(), *attention.parameters()]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), inputs + params)
        results[impl] = [out.detach(), *grads]
        if impl == "fused":
            sizes = bias.sizes
            keys = (inputs[2]).split(sizes)
            bounds = [logit_error_bound(attention, inputs[0] + inputs[1], k, p) for k, p in zip(keys, bias.priors)]
    eps = max(bounds)
    assert eps < 1e-3
    for index, (got, want) in enumerate(zip(results["fused"], results["explicit"])):
        compare(got, want, eps, f"tensor {index}")
