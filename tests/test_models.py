"""The assembled model: output shapes, batching and padding invariances, gradients for every ablation combination,
and the flag resolution that chooses the classification loss. DETR's checkpoint layout: tests/test_detr_layout.py."""
import itertools
import math

import pytest
import torch

import flag_checks
import main
from models import build_model
from util.errors import UserError
from util.misc import NestedTensor, nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")

DYNAMIC_SCALES = ("none", "type1", "type2", "type3", "type4")


# --- forward pass --------------------------------------------------------------------------------------------

def images(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


@pytest.mark.parametrize("dynamic_scale", ["none", "type2"])
@pytest.mark.parametrize("aux", [True, False])
def test_output_shapes_for_images_of_different_sizes(tiny_args, dynamic_scale, aux):
    args = tiny_args(dynamic_scale=dynamic_scale, no_aux_loss=not aux)
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    batch = images((64, 96), (96, 64), (40, 72))
    with torch.no_grad():
        out = model(batch)  # a list of images, no targets
        out_nested = model(nested_tensor_from_tensor_list(batch))
    q, c = args.num_queries, args.num_classes + 1
    assert out["pred_logits"].shape == (3, q, c)
    assert out["pred_boxes"].shape == (3, q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert torch.equal(out["pred_logits"], out_nested["pred_logits"])
    assert torch.equal(out["pred_boxes"], out_nested["pred_boxes"])
    if aux:
        assert len(out["aux_outputs"]) == args.dec_layers - 1
        for layer in out["aux_outputs"]:
            assert set(layer) == {"pred_logits", "pred_boxes"}
            assert layer["pred_logits"].shape == (3, q, c)
            assert layer["pred_boxes"].shape == (3, q, 4)
    else:
        assert set(out) == {"pred_logits", "pred_boxes"}


@pytest.mark.parametrize("flags", [{}, {"dynamic_scale": "type2", "query_mixture": True}], ids=["none", "type2-qmix"])
def test_batched_equals_single(tiny_args, flags):
    torch.manual_seed(0)
    model = build_model(tiny_args(**flags))[0].eval()
    batch = images((64, 96), (64, 96), (64, 96))
    with torch.no_grad():
        together = model(batch)
        for i, image in enumerate(batch):
            alone = model([image])
            torch.testing.assert_close(together["pred_logits"][i], alone["pred_logits"][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(together["pred_boxes"][i], alone["pred_boxes"][0], rtol=0, atol=1e-5)
            for t, a in zip(together["aux_outputs"], alone["aux_outputs"]):
                torch.testing.assert_close(t["pred_boxes"][i], a["pred_boxes"][0], rtol=0, atol=1e-5)


# --- padding -------------------------------------------------------------------------------------------------

def expected_feature_padding(sizes, canvas, stride):
    """(B, Hf*Wf) True on padded feature cells, for images padded at the bottom/right (sizes multiples of stride)."""
    height, width = canvas[0] // stride, canvas[1] // stride
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return torch.stack([((rows >= h // stride) | (cols >= w // stride)).flatten() for h, w in sizes])


@pytest.mark.parametrize("dynamic_scale", ["none", "type3"])
def test_padding_mask_reaches_encoder_and_co_attention(tiny_args, dynamic_scale):
    args = tiny_args(dynamic_scale=dynamic_scale, enc_layers=2)
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    sizes = [(64, 64), (128, 96), (96, 32)]
    padding = expected_feature_padding(sizes, (128, 96), model.backbone.stride)
    assert padding.any() and not padding.all(dim=1).any()

    encoder_calls, decoder_calls = [], []
    handles = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: encoder_calls.append((m, a, kw)), with_kwargs=True)
        for layer in model.transformer.encoder.layers]
    handles += [layer.multihead_attn.register_forward_hook(
        lambda m, a, kw, out: decoder_calls.append((m, a, kw)), with_kwargs=True)
        for layer in model.transformer.decoder.layers]
    with torch.no_grad():
        model(images(*sizes))
    for handle in handles:
        handle.remove()
    assert len(encoder_calls) == args.enc_layers and len(decoder_calls) == args.dec_layers

    with torch.no_grad():
        for module, (q, k), kwargs in encoder_calls:
            assert torch.equal(kwargs["key_padding_mask"], padding)
            _, weights = module(q, k, kwargs["value"], key_padding_mask=padding, need_weights=True,
                                average_attn_weights=False)  # (B, nhead, HW, HW)
            assert (weights.transpose(1, 3)[padding] == 0).all()  # (B, HW keys, HW, nhead) indexed by padded keys
            assert (weights.transpose(1, 3)[~padding] > 0).all()
        for module, (query, key, _), kwargs in decoder_calls:
            assert torch.equal(kwargs["key_padding_mask"], padding)
            assert (kwargs["attn_bias"] is None) == (dynamic_scale == "none")
            weights = module.attention_weights(query, key, padding, kwargs["attn_bias"])  # (B, nhead, Q, HW)
            assert (weights.permute(0, 3, 1, 2)[padding] == 0).all()
            assert (weights.permute(0, 3, 1, 2)[~padding] > 0).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_backbone_stem_is_padding_invariant_but_its_receptive_fields_are_not(tiny_args):
    """DETR's own limit: zero-padding the image is exact for the first convolution over the unpadded pixels, but
    cells just outside the image then hold activations of border pixels where a lone image has the convolution's
    zero padding, so deeper features near the border (here: every cell of a 2x3 map) change with the canvas."""
    torch.manual_seed(0)
    body = build_model(tiny_args())[0].backbone[0].body
    image = images((64, 96))[0]
    canvas = torch.zeros(1, 3, 160, 192)
    canvas[0, :, :64, :96] = image
    with torch.no_grad():
        alone, padded = body.conv1(image[None]), body.conv1(canvas)
        assert torch.equal(padded[..., :32, :48], alone)
        (alone,), (padded,) = body(image[None]), body(canvas)  # layer4 only
    assert alone.shape[-2:] == (2, 3)
    assert not torch.allclose(padded[..., :2, :3], alone, atol=1e-2)


@pytest.mark.parametrize("dynamic_scale", ["none", "type4"])
def test_more_padding_does_not_change_what_follows_the_backbone(tiny_args, dynamic_scale):
    """Given the same backbone features on the unpadded cells (and garbage on the padded ones), outputs do not depend
    on the canvas size: the sine encoding is normalised over the unpadded cells, padded keys get zero attention in
    the encoder and the co-attention, and the SMCA extent comes from the mask. (The trunk itself is not padding
    invariant, see the test above; that is DETR's behaviour.)"""
    torch.manual_seed(0)
    model = build_model(tiny_args(dynamic_scale=dynamic_scale))[0].eval()
    image = images((64, 96))[0]
    stride = model.backbone.stride
    with torch.no_grad():
        features = model.backbone[0](NestedTensor(image[None], torch.zeros(1, 64, 96, dtype=torch.bool)))[-1].tensors
    assert features.shape[-2:] == (64 // stride, 96 // stride)

    def same_features_on_the_unpadded_cells(module, inputs, output):
        tensors, mask = output[-1].decompose()
        tensors = torch.randn_like(tensors) * 10  # padded cells: garbage that must not matter
        tensors[0, :, :features.shape[-2], :features.shape[-1]] = features[0]
        return [NestedTensor(tensors, mask)]

    with torch.no_grad():
        alone = model([image])
        handle = model.backbone[0].register_forward_hook(same_features_on_the_unpadded_cells)
        try:
            tensors = torch.zeros(1, 3, 160, 192)
            tensors[0, :, :64, :96] = image
            mask = torch.ones(1, 160, 192, dtype=torch.bool)
            mask[0, :64, :96] = False
            on_canvas = model(NestedTensor(tensors, mask))
            beside_bigger = model([image, images((128, 160), seed=5)[0]])
        finally:
            handle.remove()
    for other in (on_canvas, beside_bigger):
        torch.testing.assert_close(other["pred_logits"][0], alone["pred_logits"][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(other["pred_boxes"][0], alone["pred_boxes"][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(other["aux_outputs"][0]["pred_boxes"][0], alone["aux_outputs"][0]["pred_boxes"][0],
                                   rtol=0, atol=1e-4)


# --- gradients -----------------------------------------------------------------------------------------------

def variant_flags():
    yield {"dynamic_scale": "none", "cls_loss": "ce"}
    yield {"dynamic_scale": "none", "cls_loss": "focal"}
    for scale, head, query, loss in itertools.product(DYNAMIC_SCALES[1:], (False, True), (False, True),
                                                      ("ce", "focal")):
        yield {"dynamic_scale": scale, "head_mixture": head, "query_mixture": query, "cls_loss": loss}


def variant_id(flags):
    mixtures = [name for name in ("head_mixture", "query_mixture") if flags.get(name)]
    return "-".join([flags["dynamic_scale"], *mixtures, flags["cls_loss"]])


TARGETS = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.4]])}]


# DETR's decoder input starts at zero and in_proj_bias / out_proj.bias start at zero, so at initialisation layer 0's
# self-attention sees zero values and its norm1 a zero input: these weights get an exactly-zero (not None) gradient
# until the biases move.
ZERO_INPUT_AT_INIT = {"transformer.decoder.layers.0.self_attn.in_proj_weight",
                      "transformer.decoder.layers.0.self_attn.out_proj.weight",
                      "transformer.decoder.layers.0.norm1.weight"}


@pytest.mark.parametrize("flags", list(variant_flags()), ids=variant_id)
def test_every_trainable_parameter_gets_a_finite_gradient(tiny_args, flags):
    args = tiny_args(**flags)
    assert not args.no_aux_loss
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.train()
    losses = criterion(model(images((64, 96), (96, 64))), TARGETS)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.0.body.layer4") for n in trainable)
    assert any(".priors." in n for n in trainable) == (flags["dynamic_scale"] != "none")
    assert any(".scale.proj." in n for n in trainable) == (flags["dynamic_scale"] in ("type2", "type3", "type4"))
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    not_finite = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradients: {not_finite}"
    all_zero = [n for n, p in trainable.items() if not p.grad.any() and n not in ZERO_INPUT_AT_INIT]
    assert not all_zero, f"identically zero gradients (a detached path?): {all_zero}"


# --- classification loss choice and flag checks ---------------------------------------------------------------

def test_focal_classifier_bias_starts_at_one_percent(tiny_args):
    args = tiny_args(dynamic_scale="type1")
    bias = build_model(args)[0].class_embed.bias
    assert bias.shape == (args.num_classes + 1,)
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99.0)), rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.sigmoid(), torch.full_like(bias, 0.01), rtol=0, atol=1e-8)


def test_ce_classifier_bias_keeps_pytorch_default(tiny_args):
    args = tiny_args()
    model = build_model(args)[0]
    bias = model.class_embed.bias
    bound = 1 / math.sqrt(args.hidden_dim)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert (bias.abs() <= bound).all()
    assert len(set(bias.tolist())) == bias.numel()  # not a constant initialisation


@pytest.mark.parametrize("flags, cls_loss, coefs", [
    ({}, "ce", (1.0, 1.0)),
    ({"dynamic_scale": "type1"}, "focal", (2.0, 2.0)),
    ({"dynamic_scale": "type4", "head_mixture": True}, "focal", (2.0, 2.0)),
    ({"dynamic_scale": "type2", "cls_loss": "ce"}, "ce", (1.0, 1.0)),
    ({"cls_loss": "focal"}, "focal", (2.0, 2.0)),
    ({"dynamic_scale": "type2", "cls_loss_coef": 3.0}, "focal", (3.0, 2.0)),
    ({"set_cost_class": 0.5}, "ce", (1.0, 0.5)),
    ({"dynamic_scale": "type3", "cls_loss": "ce", "cls_loss_coef": 4.0, "set_cost_class": 5.0}, "ce", (4.0, 5.0)),
])
@pytest.mark.quick
def test_cls_loss_resolution(tiny_args, flags, cls_loss, coefs):
    args = tiny_args(**flags)
    assert args.cls_loss == cls_loss
    assert (args.cls_loss_coef, args.set_cost_class) == coefs


@pytest.mark.parametrize("flags, flag_named", [
    ({"head_mixture": True}, "--head_mixture"),
    ({"query_mixture": True}, "--query_mixture"),
    ({"dynamic_scale": "type1", "head_mixture": True, "nheads": 1}, "--head_mixture"),
    ({"dynamic_scale": "type1", "query_mixture": True, "num_queries": 1}, "--query_mixture"),
    ({"hidden_dim": 30, "nheads": 4}, "--hidden_dim"),
    ({"dilation": True}, "--dilation"),  # torchvision's BasicBlock (resnet18/34) cannot dilate
    ({"dilation": True, "backbone": "resnet34"}, "--dilation"),
])
@pytest.mark.quick
def test_invalid_flag_combinations_are_rejected(tiny_args, flags, flag_named):
    # (a value out of its flag's own range, e.g. --smooth 0, fails earlier, in argparse: tests/test_faults.py)
    with pytest.raises(UserError, match=flag_named):
        tiny_args(**flags)
    args = main.get_args_parser().parse_args(  # check_args itself, before any other resolution
        ["--backbone", "resnet18", "--num_classes", "5", "--device", "cpu"]
        + [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items()])
    with pytest.raises(UserError, match=flag_named):
        flag_checks.check_args(args)



def test_backbone_norm_batch_trains_every_layer_with_batchnorm(tiny_args):
    """--backbone_norm batch (training from scratch): ordinary BatchNorm, every backbone layer trained;
    the default keeps DETR's frozen BatchNorm and trains layer2-4 only."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    frozen, _, _ = build_model(tiny_args())
    batch, _, _ = build_model(tiny_args(backbone_norm="batch"))
    body = batch.backbone[0].body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d) and not isinstance(body.bn1, FrozenBatchNorm2d)
    assert isinstance(frozen.backbone[0].body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in body.parameters())
    trained = {n.split(".")[3] for n, p in frozen.named_parameters() if n.startswith("backbone.0.body") and p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}
    assert "backbone.0.body.bn1.num_batches_tracked" in batch.state_dict()
    assert "backbone.0.body.bn1.num_batches_tracked" not in frozen.state_dict()
