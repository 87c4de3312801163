"""SMCA inside a built model: the backbone's extent and stride, the centres, the head/query mixtures and the
--smooth flag, against plain re-implementations of docs/ablation-modules.md. The modules alone: tests/test_smca.py."""
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.attention import FactoredPrior, ModulatedCrossAttention
from models.backbone import Backbone, image_extent
from models.spatial_prior import mixture_mask
from util.misc import NestedTensor

pytestmark = pytest.mark.usefixtures("single_thread")


def images(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


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



# --- the bandwidth in a model ------------------------------------------------------------------------------------

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
