"""Box conversions and (generalized) IoU.

Boxes are (..., 4) tensors, either centre form (cx, cy, w, h) or corner form
(x0, y0, x1, y1). Pairwise functions take corner-form boxes (N, 4) and
(M, 4) and return (N, M) matrices.
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre form -> (..., 4) corner form."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner form -> (..., 4) centre form."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) corner form -> (...) area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of corner-form boxes (N, 4) x (M, 4).

    Returns (iou, union), both (N, M); the union is returned too because
    generalized_box_iou needs it.
    """
    area1 = box_area(boxes1)  # (N,)
    area2 = box_area(boxes2)  # (M,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    overlap = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    inter = overlap[..., 0] * overlap[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter  # (N, M)
    return inter / union, union


def _check_valid(boxes: Tensor, name: str) -> None:
    # Degenerate (inverted) boxes make the enclosing-box area meaningless and
    # silently corrupt GIoU, so fail loudly instead.
    assert (boxes[:, 2:] >= boxes[:, :2]).all(), (
        f"generalized_box_iou: {name} must be corner-form (x0, y0, x1, y1) with x1 >= x0 and "
        f"y1 >= y0; got {boxes[~(boxes[:, 2:] >= boxes[:, :2]).all(-1)][:3].tolist()} "
        "(convert centre-form boxes with box_cxcywh_to_xyxy first, and check for NaN)"
    )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019), (N, 4) x (M, 4) -> (N, M).

    GIoU = IoU - (enclosing area - union) / enclosing area, in [-1, 1].
    """
    _check_valid(boxes1, "boxes1")
    _check_valid(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    extent = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    enclosing = extent[..., 0] * extent[..., 1]  # (N, M)
    return iou - (enclosing - union) / enclosing
