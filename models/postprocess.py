"""Turn model outputs into per-image detections in absolute image coordinates.

Both post-processors return, per image, 'scores' (K,), 'labels' (K,) int64
and 'boxes' (K, 4) absolute xyxy in the size given by target_sizes
(the original image size for COCO evaluation).
"""
import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy

# COCO's maxDets: evaluation never looks past the 100 best detections per image.
COCO_MAX_DETECTIONS = 100


def _absolute_xyxy(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """boxes (B, K, 4) normalized cxcywh, target_sizes (B, 2) = (h, w) -> (B, K, 4) absolute xyxy."""
    height, width = target_sizes.unbind(1)  # (B,), (B,)
    scale = torch.stack([width, height, width, height], dim=1).to(boxes.dtype)  # (B, 4)
    return box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """Softmax classifier (DETR): each query gives one detection, its best non-background class."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4); target_sizes (B, 2) = (h, w).

        Returns B dicts with Q detections each.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"PostProcess: {len(logits)} predictions but {len(target_sizes)} target sizes")
        # Softmax over all C+1 classes, then the best of the C real ones: the
        # score is the probability of that class, not renormalized.
        prob = logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
        scores, labels = prob.max(-1)  # (B, Q), (B, Q)
        abs_boxes = _absolute_xyxy(boxes.float(), target_sizes)  # (B, Q, 4)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, abs_boxes)]


class PostProcessFocal(nn.Module):
    """Sigmoid (focal) classifier: the top-k (query, class) pairs by score, several classes per query allowed."""

    def __init__(self, num_select: int = COCO_MAX_DETECTIONS):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4); target_sizes (B, 2) = (h, w).

        Returns B dicts with k = min(num_select, Q*C) detections each, by decreasing score.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"PostProcessFocal: {len(logits)} predictions but {len(target_sizes)} target sizes")
        # The last (no-object) column is never a positive target under the
        # focal loss, so it is not a class to report.
        prob = logits.float()[..., :-1].sigmoid()  # (B, Q, C)
        num_classes = prob.shape[-1]
        k = min(self.num_select, prob.shape[1] * num_classes)
        scores, flat_idx = prob.flatten(1).topk(k, dim=1)  # (B, k): index into Q*C, query-major
        query_idx = flat_idx // num_classes  # (B, k)
        labels = flat_idx % num_classes  # (B, k)
        picked = torch.gather(boxes.float(), 1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
        abs_boxes = _absolute_xyxy(picked, target_sizes)  # (B, k, 4)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, abs_boxes)]


def build_postprocessors(args) -> dict[str, nn.Module]:
    """args.cls_loss is already resolved to 'ce' or 'focal'; the post-processor must match the loss."""
    postprocessors = {"ce": PostProcess, "focal": PostProcessFocal}
    if args.cls_loss not in postprocessors:
        raise ValueError(
            f"build_postprocessors: --cls_loss must be resolved to one of {sorted(postprocessors)}, "
            f"got {args.cls_loss!r}"
        )
    return {"bbox": postprocessors[args.cls_loss]()}
