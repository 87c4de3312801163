"""ResNet backbone with frozen BatchNorm, joined with the position encoding (DETR's ``backbone.0`` / ``backbone.1``)."""
from typing import List, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from util.errors import UserError
from util.misc import NestedTensor

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# the main path of a torchvision ResNet, in order; the classifier head (avgpool, fc) is dropped
_BODY_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class ResNetBody(nn.Module):
    """The convolutional trunk of a torchvision ResNet, keeping its module names (``conv1``, ``layer1`` ...).

    ``return_layers``: the stages whose outputs ``forward`` returns, in order (DETR: layer4 only; with its
    segmentation head, ``return_interm_layers``: layer1-4)."""

    def __init__(self, resnet: nn.Module, return_layers: Tuple[str, ...] = ("layer4",)):
        super().__init__()
        for name in _BODY_LAYERS:
            self.add_module(name, getattr(resnet, name))
        self.return_layers = tuple(return_layers)

    def forward(self, x) -> List[torch.Tensor]:
        outputs = []
        for name, module in self.named_children():
            x = module(x)
            if name in self.return_layers:
                outputs.append(x)
        return outputs


def _resnet_stride(resnet: nn.Module) -> int:
    """Total stride of the trunk, read from its modules (32, or 16 when layer4 is dilated)."""
    stride = resnet.conv1.stride[0] * resnet.maxpool.stride
    for name in ("layer1", "layer2", "layer3", "layer4"):
        downsample = getattr(resnet, name)[0].downsample
        stride *= downsample[0].stride[0] if downsample is not None else 1
    return stride


def _load_backbone_weights(resnet: nn.Module, name: str, weights: str) -> None:
    """``weights``: 'imagenet' (torchvision's IMAGENET1K_V1, DETR's choice), 'none', or a path to a state dict."""
    if weights == "none":
        return
    if weights == "imagenet":
        url = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"].url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError)
            raise UserError(
                f"could not download the ImageNet weights for {name} ({url}: {exc}); pass "
                f"--backbone_weights none to train from scratch or --backbone_weights PATH for a local file"
            ) from None
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"--backbone_weights {weights}: file not found") from None
        except Exception as exc:
            raise UserError(f"--backbone_weights {weights}: cannot read it as a state dict ({exc})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"--backbone_weights {weights} do not fit {name}: "
                        f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


# 'frozen': DETR's FrozenBatchNorm2d, for pretrained weights (trains layer2-4 only);
# 'batch': ordinary BatchNorm2d and every layer trained, for training from scratch, where frozen statistics
# of a random network are the identity and leave the backbone without any normalisation
BACKBONE_NORMS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}
_DETR_TRAINED_LAYERS = ("layer2", "layer3", "layer4")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage: its last block's last convolution (conv3 of a bottleneck, else conv2)."""
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


class Backbone(nn.Module):
    """ResNet trunk. Output: the last feature map and its downsampled padding mask, preceded by those of layer1-3
    with ``return_interm_layers`` (DETR's segmentation head reads them)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool, weights: str = "none",
                 norm: str = "frozen", return_interm_layers: bool = False):
        super().__init__()
        if name not in RESNETS:
            raise UserError(f"--backbone {name} is not supported; choose one of {', '.join(RESNETS)}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=BACKBONE_NORMS[norm])
        _load_backbone_weights(resnet, name, weights)
        trained = _DETR_TRAINED_LAYERS if norm == "frozen" else _BODY_LAYERS
        for pname, parameter in resnet.named_parameters():
            if not train_backbone or not pname.startswith(trained):
                parameter.requires_grad_(False)
        self.num_channels = resnet.fc.in_features
        self.in_channels = resnet.conv1.in_channels  # what the model reads: 3 (RGB)
        self.stride = _resnet_stride(resnet)
        return_layers = _STAGES if return_interm_layers else _STAGES[-1:]
        self.layer_channels = tuple(_stage_channels(getattr(resnet, stage)) for stage in return_layers)
        self.body = ResNetBody(resnet, return_layers)

    def forward(self, samples: NestedTensor) -> List[NestedTensor]:
        """(B, 3, H, W) images with (B, H, W) mask -> per returned stage, finest first, (B, C_l, H_l, W_l) features
        with their (B, H_l, W_l) mask; the last is layer4's (B, C, H/s, W/s)."""
        levels = []
        for features in self.body(samples.tensors):
            mask = F.interpolate(samples.mask[None].float(), size=features.shape[-2:])[0].bool()
            levels.append(NestedTensor(features, mask))
        return levels


class Joiner(nn.Sequential):
    """``backbone.0`` is the trunk, ``backbone.1`` the position encoding (DETR's checkpoint layout)."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.in_channels = backbone.in_channels
        self.layer_channels = backbone.layer_channels
        self.stride = backbone.stride

    def forward(self, samples: NestedTensor) -> Tuple[List[NestedTensor], List[torch.Tensor]]:
        """The trunk's levels (finest first) and the position encoding of the last one, the only level the
        transformer reads (DETR encodes every level; a learned encoding's 50 rows could not cover layer1)."""
        features = self[0](samples)
        pos = self[1](features[-1]).to(features[-1].tensors.dtype)
        return features, [pos]


def image_extent(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Unpadded (width, height) of each image in feature cells, from the pixel padding mask.

    mask: (B, H, W), True on padding; images are padded at the bottom/right, so row 0 and column 0 of every
    image are real pixels. Returns (B, 2) float: pixels / stride (not rounded, as the spec says).
    """
    width = (~mask[:, 0, :]).sum(-1)
    height = (~mask[:, :, 0]).sum(-1)
    return torch.stack([width, height], dim=-1).float() / stride


__all__ = ["Backbone", "Joiner", "ResNetBody", "image_extent", "RESNETS"]
