"""SMCA against plain re-implementations of docs/ablation-modules.md: the modulated co-attention, the
scale variants and the bandwidth, module by module. The same inside a built model (centres, mixtures, --smooth):
tests/test_smca_model.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.attention import ModulatedCrossAttention
from models.spatial_prior import SCALES, SpatialPrior, mixture_mask

pytestmark = pytest.mark.usefixtures("single_thread")

B, Q, M, D_MODEL, H, W = 2, 5, 4, 16, 3, 5  # H != W so swapped axes show up
SMOOTH = 8.0


# --- modulated co-attention ------------------------------------------------------------------------------------

def reference_attention(module, query, key, value, key_padding_mask, bias):
    """Per image and head: softmax(q k^T / sqrt(d_h) + G + P) v with P = -inf on padded keys, then out_proj."""
    d = query.shape[-1]
    d_h = d // module.num_heads
    w_q, w_k, w_v = module.in_proj_weight.split(d)
    b_q, b_k, b_v = module.in_proj_bias.split(d)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v  # (L, B, d)
    images_out, images_weights = [], []
    for b in range(query.shape[1]):
        heads_out, heads_weights = [], []
        for m in range(module.num_heads):
            cols = slice(m * d_h, (m + 1) * d_h)
            logits = q[:, b, cols] @ k[:, b, cols].T / math.sqrt(d_h)  # (Q, S)
            if bias is not None:
                logits = logits + bias[b, m]
            logits = logits.masked_fill(key_padding_mask[b][None, :], float("-inf"))
            weights = logits.softmax(-1)
            heads_out.append(weights @ v[:, b, cols])
            heads_weights.append(weights)
        images_out.append(torch.cat(heads_out, dim=-1))  # (Q, d)
        images_weights.append(torch.stack(heads_weights))  # (M, Q, S)
    out = torch.stack(images_out, dim=1)  # (Q, B, d)
    return out @ module.out_proj.weight.T + module.out_proj.bias, torch.stack(images_weights)


def attention_inputs(seed=0, length=7):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(Q, B, D_MODEL, generator=generator, requires_grad=True)
    key = torch.randn(length, B, D_MODEL, generator=generator, requires_grad=True)
    value = torch.randn(length, B, D_MODEL, generator=generator, requires_grad=True)
    bias = (-4 * torch.rand(B, M, Q, length, generator=generator)).requires_grad_()
    padding = torch.zeros(B, length, dtype=torch.bool)
    padding[1, length - 3:] = True  # image 1 has 3 padded keys, image 0 none
    return query, key, value, padding, bias


def test_modulated_attention_equals_plain_reference_forward_and_gradients():
    torch.manual_seed(0)
    module = ModulatedCrossAttention(D_MODEL, M, dropout=0.0)
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    query, key, value, padding, bias = attention_inputs()
    out = module(query, key, value, key_padding_mask=padding, attn_bias=bias)
    expected, expected_weights = reference_attention(module, query, key, value, padding, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.attention_weights(query, key, padding, bias), expected_weights,
                               rtol=1e-5, atol=1e-5)

    upstream = torch.randn_like(out)
    wrt = [query, key, value, bias, *module.parameters()]
    grads = torch.autograd.grad((out * upstream).sum(), wrt)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), wrt)
    names = ["query", "key", "value", "bias"] + [n for n, _ in module.named_parameters()]
    assert len(names) == len(wrt) == 8
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"d/d{name}: {m}")
    assert (grads[3][1, ..., -3:] == 0).all()  # no gradient reaches the prior on padded keys
    assert grads[3][0].abs().min() > 0


def test_without_bias_equals_stock_multihead_attention():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(D_MODEL, M, dropout=0.0)
    with torch.no_grad():
        stock.in_proj_bias.normal_()
        stock.out_proj.bias.normal_()
    module = ModulatedCrossAttention(D_MODEL, M, dropout=0.0)
    module.load_state_dict(stock.state_dict(), strict=True)
    query, key, value, padding, _ = attention_inputs(seed=1)
    expected, weights = stock(query, key, value, key_padding_mask=padding, need_weights=True,
                              average_attn_weights=False)
    torch.testing.assert_close(module(query, key, value, key_padding_mask=padding), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.attention_weights(query, key, padding), weights, rtol=1e-5, atol=1e-6)


# --- the spatial prior G -----------------------------------------------------------------------------------------

def prior_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tgt = torch.randn(Q, B, D_MODEL, generator=generator)
    query_pos = torch.randn(Q, B, D_MODEL, generator=generator)
    centre = torch.rand(B, Q, 2, generator=generator) * torch.tensor([W, H])  # (x, y) in cells
    return tgt, query_pos, centre, torch.arange(W, dtype=torch.float32), torch.arange(H, dtype=torch.float32)


def make_prior(scale_type, smooth=SMOOTH, head_mixture=False, query_mixture=False, seed=0, impl="explicit"):
    """A prior whose forward returns G itself (impl 'explicit'); tests/test_fused_prior.py checks the factors."""
    torch.manual_seed(seed)
    prior = SpatialPrior(D_MODEL, M, SCALES[scale_type](D_MODEL, M), smooth,
                         mixture_mask(Q, M, head_mixture, query_mixture), impl)
    with torch.no_grad():  # a non-trivial LayerNorm, as after training
        prior.norm.weight.uniform_(0.5, 1.5)
        prior.norm.bias.normal_(0, 0.1)
    return prior


def reference_prior(prior, scale_type, tgt, query_pos, centre, smooth):
    """G (B, M, Q, H*W) from the spec, in float64: u = LN(t + p), c = c0 + delta, cell (i, j) at x = j, y = i,
    scales Linear(u)^2 laid out per head consecutively (view (B, Q, M, k)), G = -D / smooth."""
    p = {k: v.double() for k, v in prior.state_dict().items()}
    u = F.layer_norm((tgt + query_pos).double().transpose(0, 1), (D_MODEL,), p["norm.weight"], p["norm.bias"],
                     eps=prior.norm.eps)  # (B, Q, d)
    delta = (u @ p["offset.weight"].T + p["offset.bias"]).view(B, Q, M, 2)
    c = centre.double()[:, :, None, :] + delta  # (B, Q, M, 2)
    x = torch.arange(W, dtype=torch.float64).view(1, 1, 1, 1, W)
    y = torch.arange(H, dtype=torch.float64).view(1, 1, 1, H, 1)
    dx = x - c[..., 0, None, None]  # (B, Q, M, 1, W)
    dy = y - c[..., 1, None, None]  # (B, Q, M, H, 1)
    if scale_type == "type1":
        dist = dx**2 + dy**2
    else:
        k = {"type2": 1, "type3": 2, "type4": 3}[scale_type]
        s = (u @ p["scale.proj.weight"].T + p["scale.proj.bias"]).square().view(B, Q, M, k)[..., None, None, :]
        if scale_type == "type2":
            dist = s[..., 0] * (dx**2 + dy**2)
        elif scale_type == "type3":
            dist = s[..., 0] * dx**2 + s[..., 1] * dy**2
        else:
            dist = s[..., 0] * dx**2 + s[..., 1] * dy**2 + s[..., 2] * dx**2 * dy**2
    return (-dist / smooth).permute(0, 2, 1, 3, 4).reshape(B, M, Q, H * W)


@pytest.mark.parametrize("scale_type", ["type2", "type3"])
def test_scale_types_equal_type1_at_initialisation(scale_type):
    inputs = prior_inputs()
    type1 = make_prior("type1")
    prior = make_prior(scale_type, seed=1)
    result = prior.load_state_dict(type1.state_dict(), strict=False)  # same LayerNorm and offsets
    assert sorted(result.missing_keys) == ["scale.proj.bias", "scale.proj.weight"] and not result.unexpected_keys
    assert torch.equal(prior(*inputs), type1(*inputs))


def test_type4_at_initialisation_is_type1_plus_the_coupling_term():
    """The spec's init rule (weight 0, bias 1 for every scale) makes a = b = c = 1, so type4 starts at
    type1 + dx^2 dy^2, not at type1 (the spec's "type2-4 equal type1" does not hold for type4). Starting
    c at 0 instead would freeze it: d(c)/d(linear) = 2 * linear = 0, and type4 would silently be type3."""
    tgt, query_pos, centre, grid_x, grid_y = inputs = prior_inputs()
    type1 = make_prior("type1")
    type4 = make_prior("type4", seed=1)
    type4.load_state_dict(type1.state_dict(), strict=False)
    u = type4.query_features(tgt, query_pos)
    centres = (centre.double()[:, None] + type4.head_offsets(u).double())  # (B, M, Q, 2)
    dx2 = (grid_x.double() - centres[..., 0:1]).square()[..., None, :]
    dy2 = (grid_y.double() - centres[..., 1:2]).square()[..., :, None]
    coupling = -(dx2 * dy2).flatten(-2) / SMOOTH
    torch.testing.assert_close(type4(*inputs).double(), type1(*inputs).double() + coupling, rtol=1e-6, atol=1e-4)
    type4(*inputs).sum().backward()
    coupling_rows = type4.scale.proj.bias.grad.view(-1, 3)[:, 2]
    assert (coupling_rows != 0).all()  # the coupling scale learns from the first step


@pytest.mark.parametrize("scale_type", ["type1", "type2", "type3", "type4"])
def test_prior_equals_spec_formula(scale_type):
    prior = make_prior(scale_type)
    if scale_type != "type1":
        with torch.no_grad():
            prior.scale.proj.weight.normal_(0, 0.3)
            prior.scale.proj.bias.normal_(0, 1)
    tgt, query_pos, centre, grid_x, grid_y = inputs = prior_inputs(seed=2)
    got = prior(*inputs)
    assert got.dtype == torch.float32 and got.shape == (B, M, Q, H * W)
    expected = reference_prior(prior, scale_type, tgt, query_pos, centre, SMOOTH)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert (got <= 0).all()
    if scale_type != "type1":  # the scales matter: with unit scales G would differ
        unit = reference_prior(make_prior("type1"), "type1", tgt, query_pos, centre, SMOOTH)
        assert not torch.allclose(expected, unit, atol=1e-2)


@pytest.mark.quick
def test_smooth_divides_the_prior():
    inputs = prior_inputs(seed=3)
    sharp, wide = make_prior("type3", smooth=4.0), make_prior("type3", smooth=16.0)
    wide.load_state_dict(sharp.state_dict())
    g_sharp, g_wide = sharp(*inputs), wide(*inputs)
    assert torch.equal(g_sharp, 4 * g_wide)  # powers of two: exact
    assert g_sharp.abs().max() > 0
