import pytest
import torch
import torchvision.ops as tv

from util.box_ops import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou


def random_xyxy(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """n valid corner-form boxes in [0, 1]^2, some of them overlapping."""
    corners = torch.rand(n, 2, 2, generator=generator, dtype=dtype)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values  # (n, 2) each
    return torch.cat([low, high], dim=1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_iou_and_giou_match_torchvision(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    boxes1, boxes2 = random_xyxy(7, g, dtype), random_xyxy(5, g, dtype)
    iou, union = box_iou(boxes1, boxes2)
    torch.testing.assert_close(iou, tv.box_iou(boxes1, boxes2), atol=1e-6, rtol=0)
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), tv.generalized_box_iou(boxes1, boxes2),
                               atol=1e-6, rtol=0)
    inter = iou * union
    torch.testing.assert_close(union, tv.box_area(boxes1)[:, None] + tv.box_area(boxes2)[None] - inter,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(box_area(boxes1), tv.box_area(boxes1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.quick
def test_conversions_match_torchvision_and_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    xyxy = random_xyxy(11, g)
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, tv.box_convert(xyxy, "xyxy", "cxcywh"), atol=1e-6, rtol=0)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), tv.box_convert(cxcywh, "cxcywh", "xyxy"),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-12, rtol=0)
    # Batched leading dimensions convert element-wise.
    batched = cxcywh.reshape(1, 11, 4).expand(3, -1, -1)
    torch.testing.assert_close(box_cxcywh_to_xyxy(batched)[2], xyxy, atol=1e-12, rtol=0)


@pytest.mark.quick
def test_giou_hand_examples():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # Disjoint, side by side: IoU 0, union 2, enclosing 3 -> -1/3.
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / 3, abs=1e-7)
    # Identical boxes: GIoU = IoU = 1.
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0, abs=1e-7)
    # Half-overlapping: inter 0.5, union 1.5, enclosing 1.5 -> GIoU = IoU = 1/3.
    c = torch.tensor([[0.5, 0.0, 1.5, 1.0]])
    assert generalized_box_iou(a, c).item() == pytest.approx(1 / 3, abs=1e-7)
    iou, union = box_iou(a, c)
    assert union.item() == pytest.approx(1.5) and iou.item() == pytest.approx(1 / 3)


def test_giou_rejects_inverted_boxes_with_clear_message():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    inverted = torch.tensor([[0.5, 0.5, 0.2, 0.9]])
    with pytest.raises(AssertionError, match="boxes2 must be corner-form"):
        generalized_box_iou(good, inverted)
    with pytest.raises(AssertionError, match="boxes1 must be corner-form"):
        generalized_box_iou(torch.tensor([[float("nan"), 0.0, 1.0, 1.0]]), good)
