"""DETR's official checkpoint layout, written out by hand from the architecture: a model built with DETR's default
flags (R50, R101, DC5) has exactly these keys and shapes and loads such a checkpoint strictly."""
import pytest
import torch

import main
from models import build_model
import run_setup

pytestmark = pytest.mark.usefixtures("single_thread")

RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


# --- DETR's official checkpoint layout, written out from the architecture -------------------------------------

def detr_checkpoint_shapes(depths, num_classes=91, num_queries=100, d_model=256, dim_feedforward=2048,
                           enc_layers=6, dec_layers=6):
    """{key: shape} of an official DETR (post-norm, ResNet bottleneck) checkpoint's 'model' state dict."""
    shapes = {}

    def frozen_bn(prefix, channels):  # FrozenBatchNorm2d: four buffers, no num_batches_tracked
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)

    def linear(prefix, out_features, in_features):
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        shapes[f"{prefix}.bias"] = (out_features,)

    def layer_norm(prefix):
        shapes[f"{prefix}.weight"] = (d_model,)
        shapes[f"{prefix}.bias"] = (d_model,)

    def attention(prefix):
        shapes[f"{prefix}.in_proj_weight"] = (3 * d_model, d_model)
        shapes[f"{prefix}.in_proj_bias"] = (3 * d_model,)
        linear(f"{prefix}.out_proj", d_model, d_model)

    body = "backbone.0.body"
    shapes[f"{body}.conv1.weight"] = (64, 3, 7, 7)
    frozen_bn(f"{body}.bn1", 64)
    in_channels = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for block in range(blocks):
            p = f"{body}.layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (planes, in_channels, 1, 1)
            frozen_bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            frozen_bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            frozen_bn(f"{p}.bn3", 4 * planes)
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, in_channels, 1, 1)
                frozen_bn(f"{p}.downsample.1", 4 * planes)
            in_channels = 4 * planes

    for i in range(enc_layers):
        p = f"transformer.encoder.layers.{i}"
        attention(f"{p}.self_attn")
        linear(f"{p}.linear1", dim_feedforward, d_model)
        linear(f"{p}.linear2", d_model, dim_feedforward)
        layer_norm(f"{p}.norm1")
        layer_norm(f"{p}.norm2")
    for i in range(dec_layers):
        p = f"transformer.decoder.layers.{i}"
        attention(f"{p}.self_attn")
        attention(f"{p}.multihead_attn")
        linear(f"{p}.linear1", dim_feedforward, d_model)
        linear(f"{p}.linear2", d_model, dim_feedforward)
        for n in (1, 2, 3):
            layer_norm(f"{p}.norm{n}")
    layer_norm("transformer.decoder.norm")

    linear("class_embed", num_classes + 1, d_model)
    linear("bbox_embed.layers.0", d_model, d_model)
    linear("bbox_embed.layers.1", d_model, d_model)
    linear("bbox_embed.layers.2", 4, d_model)
    shapes["query_embed.weight"] = (num_queries, d_model)
    shapes["input_proj.weight"] = (d_model, in_channels, 1, 1)
    shapes["input_proj.bias"] = (d_model,)
    return shapes


def build_default(*flags):
    """A model with DETR's default flags (no dataset lookup, no download)."""
    args = main.get_args_parser().parse_args(
        ["--num_classes", "91", "--backbone_weights", "none", "--device", "cpu", *flags])
    run_setup.resolve_args(args)
    return build_model(args)[0]


def assert_checkpoint_layout(model, expected):
    state = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} " \
                                           f"({len(unexpected)})"
    wrong = {k: (tuple(state[k].shape), expected[k]) for k in expected if tuple(state[k].shape) != expected[k]}
    assert not wrong, f"shape (got, expected): {wrong}"


@pytest.fixture(scope="module")
def default_r50():
    torch.manual_seed(0)
    return build_default()


@pytest.mark.quick
def test_table_sanity():
    """The hand-written table itself: DETR-R50 has 41.3M parameters plus BN buffers (4 per BN channel)."""
    shapes = detr_checkpoint_shapes(RESNET_DEPTHS["resnet50"])
    assert not any(k.endswith("num_batches_tracked") or k.startswith("backbone.0.body.fc") for k in shapes)
    assert not any(k.startswith("transformer.encoder.norm") for k in shapes)
    assert shapes["class_embed.weight"] == (92, 256)
    assert shapes["input_proj.weight"] == (256, 2048, 1, 1)
    assert shapes["transformer.encoder.layers.0.self_attn.in_proj_weight"] == (768, 256)
    assert shapes["transformer.decoder.layers.5.linear1.weight"] == (2048, 256)
    assert shapes["backbone.0.body.layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert len([k for k in shapes if ".layer3." in k and k.endswith("conv1.weight")]) == 6
    assert len([k for k in detr_checkpoint_shapes(RESNET_DEPTHS["resnet101"])
                if ".layer3." in k and k.endswith("conv1.weight")]) == 23


def test_r50_default_flags_have_detr_checkpoint_layout(default_r50):
    assert_checkpoint_layout(default_r50, detr_checkpoint_shapes(RESNET_DEPTHS["resnet50"]))


def test_r101_has_detr_checkpoint_layout():
    assert_checkpoint_layout(build_default("--backbone", "resnet101"),
                             detr_checkpoint_shapes(RESNET_DEPTHS["resnet101"]))


def test_dilation_keeps_the_checkpoint_layout():
    model = build_default("--dilation")
    assert model.backbone.stride == 16
    assert_checkpoint_layout(model, detr_checkpoint_shapes(RESNET_DEPTHS["resnet50"]))


def test_strict_load_of_a_checkpoint_made_from_the_table(default_r50):
    torch.manual_seed(1)
    checkpoint = {k: torch.randn(shape) for k, shape in detr_checkpoint_shapes(RESNET_DEPTHS["resnet50"]).items()}
    result = default_r50.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = default_r50.state_dict()
    for key in ("class_embed.weight", "backbone.0.body.layer2.1.bn2.running_var",
                "transformer.decoder.layers.3.multihead_attn.in_proj_weight", "query_embed.weight"):
        assert torch.equal(state[key], checkpoint[key]), key
