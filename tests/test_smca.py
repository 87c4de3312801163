"""SMCA against plain re-implementations of docs/ablation-modules.md: the modulated co-attention, the
scale variants, the centres, the head/query mixtures and the bandwidth."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from models.attention import FactoredPrior, ModulatedCrossAttention
from models.backbone import Backbone, image_extent
from models.spatial_prior import SCALES, SpatialPrior, mixture_mask
from util.misc import NestedTensor

pytestmark = pytest.mark.usefixtures("single_thread")

B, Q, M, D_MODEL, H, W = 2, 5, 4, 16, 3, 5  # H != W so swapped axes show up
SMOOTH = 8.0


def images(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


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


def test_smooth_flag_reaches_the_model(tiny_args):
    biases = {}
    state = None
    for smooth in (4, 16):
        torch.manual_seed(0)
        model = build_model(tiny_args(dynamic_scale="type2", smooth=smooth))[0].eval()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        calls = capture_co_attention(model, images((64, 96), (96, 64)))
        biases[smooth] = calls[0]["attn_bias"]  # layer 0: same inputs in both models
    assert torch.equal(biases[4], 4 * biases[16])


# --- centres -----------------------------------------------------------------------------------------------------

def pixel_mask(sizes, canvas):
    mask = torch.ones(len(sizes), *canvas, dtype=torch.bool)
    for m, (h, w) in zip(mask, sizes):
        m[:h, :w] = False
    return mask


def test_image_extent_is_unpadded_pixels_over_stride():
    mask = pixel_mask([(70, 50), (100, 120), (33, 120)], (100, 120))
    for stride in (32, 16):
        expected = torch.tensor([[50, 70], [120, 100], [120, 33]], dtype=torch.float32) / stride  # (w, h)
        assert torch.equal(image_extent(mask, stride), expected)


# torchvision's BasicBlock (resnet18/34) cannot dilate, so the dilated (DC5) cases use resnet50
@pytest.mark.parametrize("name, dilation, stride, channels", [("resnet18", False, 32, 512),
                                                             ("resnet50", True, 16, 2048)])
def test_backbone_stride_and_feature_size(name, dilation, stride, channels):
    backbone = Backbone(name, train_backbone=True, dilation=dilation)
    assert backbone.stride == stride
    sample = NestedTensor(torch.zeros(1, 3, 128, 96), pixel_mask([(64, 96)], (128, 96)))
    with torch.no_grad():
        (features,) = backbone(sample)  # layer4 only
    assert features.tensors.shape == (1, channels, 128 // stride, 96 // stride)
    rows_padded = torch.arange(128 // stride) >= 64 // stride
    assert torch.equal(features.mask[0], rows_padded[:, None].expand(-1, 96 // stride))


def reference_centre(model, tgt, query_pos, extent):
    """c0 = sigmoid(MLP3(LayerNorm(t + p))) * (w_b, h_b) with the layer-0 LayerNorm; also returns r_logit."""
    decoder = model.transformer.decoder
    norm = decoder.priors[0].norm
    u = F.layer_norm((tgt + query_pos).transpose(0, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    first, second, last = decoder.reference.layers
    r_logit = last(second(first(u).relu()).relu())  # (B, Q, 2)
    return r_logit.sigmoid() * extent[:, None, :], r_logit


def capture_priors(model, batch):
    calls = []
    handles = [prior.register_forward_pre_hook(lambda m, args: calls.append(args))
               for prior in model.transformer.decoder.priors]
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


@pytest.mark.parametrize("backbone, dilation", [("resnet18", False), ("resnet50", True)])
def test_centres_in_a_full_model(tiny_args, backbone, dilation):
    torch.manual_seed(0)
    args = tiny_args(dynamic_scale="type1", backbone=backbone, dilation=dilation, dec_layers=3)
    model = build_model(args)[0].eval()
    stride = 16 if dilation else 32
    assert model.backbone.stride == stride
    sizes = [(64, 96), (96, 32)]  # (h, w) in pixels; canvas 96 x 96
    calls, _ = capture_priors(model, images(*sizes))
    assert len(calls) == args.dec_layers
    tgt, query_pos, centre, grid_x, grid_y = calls[0]
    assert torch.equal(grid_x, torch.arange(96 // stride, dtype=torch.float32))
    assert torch.equal(grid_y, torch.arange(96 // stride, dtype=torch.float32))
    extent = torch.tensor([[w / stride, h / stride] for h, w in sizes])
    expected, _ = reference_centre(model, tgt, query_pos, extent)
    torch.testing.assert_close(centre, expected, rtol=1e-5, atol=1e-5)
    for later in calls[1:]:  # the layer-0 reference is reused, not refined
        assert torch.equal(later[2], centre)


# --- mixtures ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head, query", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.quick
def test_mixture_mask_pattern(head, query):
    queries, heads = 5, 3  # odd: floor(3/2) = 1 head with the prior, floor(5/2) = 2 plain queries
    expected = torch.tensor([[float((not head or m < heads // 2) and (not query or q >= queries // 2))
                              for m in range(heads)] for q in range(queries)])
    assert torch.equal(mixture_mask(queries, heads, head, query), expected)


def capture_co_attention(model, batch):
    """Inputs of every decoder layer's co-attention: dicts with query, key, value, key_padding_mask, attn_bias
    (G itself: the fused route's factors multiplied out)."""
    calls = []

    def hook(module, args, kwargs):
        call = {**dict(zip(("query", "key", "value"), args)), **kwargs, "module": module}
        if isinstance(call["attn_bias"], FactoredPrior):
            call["attn_bias"] = call["attn_bias"].dense()
        calls.append(call)

    handles = [layer.multihead_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.transformer.decoder.layers]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def prior_pattern(bias):
    """(B, M, Q) True where G is non-zero somewhere over the keys."""
    return bias.abs().amax(-1) > 0


def randomise_scales(model):
    with torch.no_grad():
        for prior in model.transformer.decoder.priors:
            prior.scale.proj.weight.normal_(0, 0.3)


def per_head_outputs(module, call, attn_bias):
    """The co-attention output before the output projection, (Q, B, M, d_h): out_proj set to the identity."""
    probe = ModulatedCrossAttention(module.embed_dim, module.num_heads)
    probe.load_state_dict(module.state_dict())
    with torch.no_grad():
        probe.out_proj.weight.copy_(torch.eye(module.embed_dim))
        probe.out_proj.bias.zero_()
        out = probe(call["query"], call["key"], call["value"], key_padding_mask=call["key_padding_mask"],
                    attn_bias=attn_bias)
    return out.view(*out.shape[:2], module.num_heads, -1)


def test_head_mixture_leaves_the_second_half_of_the_heads_plain(tiny_args):
    torch.manual_seed(0)
    args = tiny_args(dynamic_scale="type2", head_mixture=True, nheads=4)
    model = build_model(args)[0].eval()
    randomise_scales(model)
    calls = capture_co_attention(model, images((64, 96), (96, 64)))
    assert len(calls) == args.dec_layers
    half = args.nheads // 2
    for call in calls:
        bias = call["attn_bias"]
        assert bias.shape == (2, args.nheads, args.num_queries, 9)  # canvas 96 x 96 -> 3 x 3 cells
        assert (bias[:, half:] == 0).all()
        assert prior_pattern(bias)[:, :half].all()
        modulated = per_head_outputs(call["module"], call, bias)
        plain = per_head_outputs(call["module"], call, None)
        assert torch.equal(modulated[:, :, half:], plain[:, :, half:])
        assert not torch.allclose(modulated[:, :, :half], plain[:, :, :half], atol=1e-4)


@pytest.mark.parametrize("head_mixture", [False, True])
def test_query_mixture_plain_queries_have_no_prior_and_no_reference(tiny_args, head_mixture):
    torch.manual_seed(0)
    args = tiny_args(dynamic_scale="type3", query_mixture=True, head_mixture=head_mixture, num_queries=7,
                     dec_layers=3)
    model = build_model(args)[0].eval()
    randomise_scales(model)
    plain_queries, heads = args.num_queries // 2, args.nheads
    batch = images((64, 96), (96, 64))

    hs = []
    handle = model.transformer.register_forward_hook(lambda m, a, out: hs.append(out[0]))
    try:
        calls = capture_co_attention(model, batch)
        prior_calls, out = capture_priors(model, batch)
    finally:
        handle.remove()

    expected_pattern = torch.tensor([[(q >= plain_queries) and (not head_mixture or m < heads // 2)
                                      for q in range(args.num_queries)] for m in range(heads)])  # (M, Q)
    for call in calls:
        assert torch.equal(prior_pattern(call["attn_bias"]), expected_pattern.expand(2, -1, -1))

    tgt, query_pos = prior_calls[0][:2]
    _, r_logit = reference_centre(model, tgt, query_pos, torch.ones(2, 2))
    hidden = hs[-1]  # (L, B, Q, d)
    assert hidden.shape == (args.dec_layers, 2, args.num_queries, args.hidden_dim)
    with torch.no_grad():
        raw = model.bbox_embed(hidden)  # (L, B, Q, 4)
        offset = F.pad(r_logit, (0, 2))  # (B, Q, 4): [r_x, r_y, 0, 0]
        expected = torch.cat([raw[:, :, :plain_queries].sigmoid(),
                              (raw[:, :, plain_queries:] + offset[:, plain_queries:]).sigmoid()], dim=2)
    predicted = torch.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]])
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw[:, :, plain_queries:].sigmoid(), expected[:, :, plain_queries:], atol=1e-3)


def test_without_query_mixture_every_query_gets_the_reference(tiny_args):
    torch.manual_seed(0)
    model = build_model(tiny_args(dynamic_scale="type1"))[0].eval()
    hs = []
    handle = model.transformer.register_forward_hook(lambda m, a, out: hs.append(out[0]))
    try:
        prior_calls, out = capture_priors(model, images((64, 96)))
    finally:
        handle.remove()
    _, r_logit = reference_centre(model, *prior_calls[0][:2], torch.ones(1, 2))
    with torch.no_grad():
        expected = (model.bbox_embed(hs[0][-1]) + F.pad(r_logit, (0, 2))).sigmoid()
    torch.testing.assert_close(out["pred_boxes"], expected, rtol=1e-5, atol=1e-6)
