"""Turn model outputs into per-image detections in absolute image coordinates (docs/ablation-modules.md,
"Classification loss", post-processing).

Both post-processors return, per image, 'scores' (K,), 'labels' (K,) int64
and 'boxes' (K, 4) absolute xyxy in the size given by target_sizes
(the original image size for COCO evaluation), and 'queries' (K,) int64, the
query each detection comes from (the mask post-processor picks its mask).
"""
import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy


def _absolute_xyxy(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """boxes (B, K, 4) normalized cxcywh, target_sizes (B, 2) = (h, w) -> (B, K, 4) absolute xyxy."""
    height, width = target_sizes.unbind(1)  # (B,), (B,)
    scale = torch.stack([width, height, width, height], dim=1).to(boxes.dtype)  # (B, 4)
    return box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """Softmax classifier (DETR): each query gives one detection, its best non-background class, in query
    order. ``num_select``: keep only the best that many queries, by decreasing score (None: every query)."""

    def __init__(self, num_select: int | None = None):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4); target_sizes (B, 2) = (h, w).

        Returns B dicts with min(num_select, Q) detections each.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"PostProcess: {len(logits)} predictions but {len(target_sizes)} target sizes")
        # Softmax over all C+1 classes, then the best of the C real ones: the
        # score is the probability of that class, not renormalized.
        prob = logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
        scores, labels = prob.max(-1)  # (B, Q), (B, Q)
        boxes = boxes.float()
        query_idx = torch.arange(logits.shape[1], device=logits.device).expand(len(logits), -1)  # (B, Q)
        if self.num_select is not None and self.num_select < logits.shape[1]:
            scores, query_idx = scores.topk(self.num_select, dim=1)  # (B, k)
            labels = labels.gather(1, query_idx)
            boxes = boxes.gather(1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
        abs_boxes = _absolute_xyxy(boxes, target_sizes)
        return [{"scores": s, "labels": l, "boxes": b, "queries": q}
                for s, l, b, q in zip(scores, labels, abs_boxes, query_idx)]


class PostProcessFocal(nn.Module):
    """Sigmoid (focal) classifier, as the original SMCA code: the top ``num_select`` (query, column) pairs by
    sigmoid score over all Q x (C+1) logits, the no-object column included, label = column index; several
    classes per query allowed. Pairs in the no-object column are then dropped: they match no category, so
    COCO scores are those of the original code, which reports them with label C."""

    def __init__(self, num_select: int):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4); target_sizes (B, 2) = (h, w).

        Returns B dicts with at most min(num_select, Q*(C+1)) detections each, by decreasing score.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"PostProcessFocal: {len(logits)} predictions but {len(target_sizes)} target sizes")
        prob = logits.float().sigmoid()  # (B, Q, C+1)
        columns = prob.shape[-1]
        k = min(self.num_select, prob.shape[1] * columns)
        scores, flat_idx = prob.flatten(1).topk(k, dim=1)  # (B, k): index into Q*(C+1), query-major
        query_idx = flat_idx // columns  # (B, k)
        labels = flat_idx % columns  # (B, k); columns - 1 is "no object"
        picked = torch.gather(boxes.float(), 1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
        abs_boxes = _absolute_xyxy(picked, target_sizes)  # (B, k, 4)
        results = []
        for s, l, b, q in zip(scores, labels, abs_boxes, query_idx):
            real = l != columns - 1
            results.append({"scores": s[real], "labels": l[real], "boxes": b[real], "queries": q[real]})
        return results


def build_postprocessor(cls_loss: str = "ce", num_queries: int = 100, num_detections: int | None = None) -> nn.Module:
    """The post-processor that matches the classification loss ('ce' or 'focal', resolved). ``num_detections``
    (None: the default) caps the detections kept per image: num_queries pairs for focal (the original SMCA
    code), one per query for ce (DETR)."""
    if cls_loss == "focal":
        return PostProcessFocal(num_detections or num_queries)
    if cls_loss == "ce":
        return PostProcess(num_detections)
    raise ValueError(f"build_postprocessor: cls_loss must be resolved to 'ce' or 'focal', got {cls_loss!r}")


def build_postprocessors(args) -> dict[str, nn.Module]:
    """{'bbox': build_postprocessor} for resolved args (--cls_loss, --num_queries, --num_detections)."""
    return {"bbox": build_postprocessor(args.cls_loss, args.num_queries, args.num_detections)}
