"""DETR's three input forms (a (B, 3, H, W) tensor, a list of (3, H, W) images of any sizes, a NestedTensor) for the
detector, the segmentation model and the hub model: equal outputs where they mean the same images, and one clear
ValueError for anything else."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_model
from tests.conftest import make_args
from util.misc import NestedTensor, as_nested_tensor

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(**flags):
    torch.manual_seed(0)
    return build_model(make_args(dropout=0.0, **flags))[0].eval()


def plain_mask(batch, height, width):
    return torch.zeros(batch, height, width, dtype=torch.bool)


def assert_same_outputs(a, b):
    assert a.keys() == b.keys()
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        if key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.quick
@pytest.mark.parametrize("flags", [{}, {"dynamic_scale": "type2", "head_mixture": True}], ids=["detr", "smca"])
def test_tensor_list_and_nested_tensor_give_the_same_outputs(flags):
    model = tiny_model(**flags)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        from_tensor = model(images)
        from_list = model([images[0], images[1]])
        from_tuple = model((images[0], images[1]))
        from_nested = model(NestedTensor(images, plain_mask(2, 64, 96)))
    assert from_tensor["pred_logits"].shape == (2, 6, 10) and from_tensor["pred_boxes"].shape == (2, 6, 4)
    for other in (from_list, from_tuple, from_nested):
        assert_same_outputs(from_tensor, other)


def test_mixed_sizes_list_equals_its_padded_nested_tensor():
    """A list of two sizes is padded bottom/right with a mask: the same as the NestedTensor written by hand. The
    largest image (not padded) gives what it gives alone as a (1, 3, H, W) tensor, up to float rounding; the padded
    one does not, as in DETR (the convolutions near its border see the zero padding)."""
    model = tiny_model(dynamic_scale="type2")
    small, large = torch.randn(3, 48, 64), torch.randn(3, 64, 96)
    padded = torch.zeros(2, 3, 64, 96)
    padded[0, :, :48, :64], padded[1] = small, large
    mask = torch.ones(2, 64, 96, dtype=torch.bool)
    mask[0, :48, :64] = False
    mask[1] = False
    with torch.no_grad():
        from_list = model([small, large])
        from_nested = model(NestedTensor(padded, mask))
        alone = model(large[None])
    assert_same_outputs(from_list, from_nested)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(from_list[key][1], alone[key][0], rtol=1e-4, atol=1e-5)


def test_segmentation_model_takes_the_three_forms():
    model = tiny_model(masks=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        from_tensor = model(images)
        from_list = model(list(images))
        from_nested = model(NestedTensor(images, plain_mask(2, 64, 64)))
    assert from_tensor["pred_masks"].shape == (2, 6, 16, 16)  # stride 4 of the batch
    assert_same_outputs(from_tensor, from_list)
    assert_same_outputs(from_tensor, from_nested)


def test_hub_model_takes_a_tensor_batch_as_detr_does():
    """DETR's notebook line: model(img.unsqueeze(0)) on the hub model."""
    torch.manual_seed(0)
    model = torch.hub.load(str(ROOT), "detr_resnet50", source="local", pretrained=False, backbone_weights="none")
    model.eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        batch = model(images)
        listed = model([images[0], images[1]])
        one = model(images[0].unsqueeze(0))
    assert_same_outputs(batch, listed)
    torch.testing.assert_close(one["pred_logits"][0], batch["pred_logits"][0], rtol=1e-4, atol=1e-5)


BAD_INPUTS = {
    "dict": ({"images": torch.randn(1, 3, 32, 32)}, "model input: a dict;"),
    "numpy": (np.zeros((1, 3, 32, 32), np.float32), "model input: a ndarray;"),
    "one image": (torch.randn(3, 32, 32), r"a torch.float32 tensor of shape \(3, 32, 32\);.*use image\[None\]"),
    "grey batch": (torch.randn(2, 1, 32, 32), r"a torch.float32 tensor of shape \(2, 1, 32, 32\);"),
    "uint8 batch": (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"a torch.uint8 tensor of shape \(1, 3, 32, 32\)"),
    "empty list": ([], "model input: an empty list;"),
    "list of batches": ([torch.randn(1, 3, 32, 32)], r"item 0 of the list is a torch.float32 tensor of shape "
                                                     r"\(1, 3, 32, 32\);"),
    "list of arrays": ([torch.randn(3, 32, 32), np.zeros((3, 32, 32))], "item 1 of the list is a ndarray;"),
    "nested, wrong mask": (NestedTensor(torch.randn(2, 3, 32, 32), plain_mask(2, 16, 32)),
                           r"a NestedTensor of images \(2, 3, 32, 32\) and mask \(2, 16, 32\);"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_a_wrong_input_is_one_value_error_naming_what_was_given(name):
    value, expected = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=expected) as info:
        as_nested_tensor(value, channels=3)
    assert "\n" not in str(info.value)


@pytest.mark.quick
def test_the_model_raises_the_value_error_before_running():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"pass a \(B, 3, H, W\) tensor, a list of \(3, H, W\) images or a "
                                         r"NestedTensor; for one image use image\[None\]"):
        model(torch.randn(3, 32, 32))
