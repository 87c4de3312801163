"""Hungarian matching between predicted queries and ground-truth boxes.

The cost of assigning query q to target t is

    cost_bbox * L1(box_q, box_t) + cost_class * class_cost(q, t) + cost_giou * -GIoU(box_q, box_t)

with L1 on normalized cxcywh boxes. The class cost is a function given at
construction, so the softmax (DETR) and focal (SMCA research code) variants
share one matcher.
"""
from functools import partial
from typing import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Keeps log() finite when a sigmoid saturates at 0 or 1 (same value as the research code).
FOCAL_COST_EPS = 1e-8

# Stand-in for non-finite costs: large enough never to be preferred over a finite cost.
_NONFINITE_COST = 1e8

ClassCost = Callable[[Tensor, Tensor], Tensor]


def softmax_class_cost(logits: Tensor, tgt_ids: Tensor) -> Tensor:
    """DETR's class cost: minus the softmax probability of the target class.

    logits (Q, C+1), tgt_ids (T,) -> cost (Q, T).
    """
    return -logits.softmax(-1)[:, tgt_ids]


def focal_class_cost(logits: Tensor, tgt_ids: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal class cost at the target class, p = sigmoid(logit):

        alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))

    i.e. the focal loss of a positive minus that of a negative, so only the
    change caused by making this query a positive counts.
    logits (Q, C+1), tgt_ids (T,) -> cost (Q, T).
    """
    prob = logits.sigmoid()[:, tgt_ids]  # (Q, T)
    positive = alpha * (1 - prob) ** gamma * -(prob + FOCAL_COST_EPS).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + FOCAL_COST_EPS).log()
    return positive - negative


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the total cost, per image."""

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float, class_cost: ClassCost):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0; set one of --set_cost_class/bbox/giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_ids: Tensor, tgt_boxes: Tensor) -> Tensor:
        """logits (Q, C+1), boxes (Q, 4) cxcywh, tgt_ids (T,), tgt_boxes (T, 4) cxcywh -> (Q, T)."""
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (Q, T)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (Q, T)
        cost_class = self.class_cost(logits, tgt_ids)  # (Q, T)
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: 'pred_logits' (B, Q, C+1), 'pred_boxes' (B, Q, 4) normalized cxcywh.
        targets: B dicts with 'labels' (T_b,) and 'boxes' (T_b, 4) normalized cxcywh.

        Returns B pairs (query_idx, target_idx), int64 tensors of length min(Q, T_b):
        query query_idx[k] is matched to target target_idx[k].
        """
        # Matching is done in float32 (AMP may give half) and on sanitized
        # predictions: a non-finite step must reach the loss (where the engine
        # can skip it) instead of crashing the assignment solver.
        all_logits = outputs["pred_logits"].float().nan_to_num(0.0)
        all_boxes = outputs["pred_boxes"].float().nan_to_num(0.0, posinf=1.0, neginf=0.0)
        indices = []
        for logits, boxes, target in zip(all_logits, all_boxes, targets):
            tgt_ids = target["labels"]
            tgt_boxes = target["boxes"].float()
            if len(tgt_ids) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, tgt_ids, tgt_boxes)
            cost = cost.nan_to_num(_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
            query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices


def build_matcher(args) -> HungarianMatcher:
    """args.cls_loss is already resolved to 'ce' or 'focal' (run_setup.resolve_args)."""
    class_costs = {
        "ce": softmax_class_cost,
        "focal": partial(focal_class_cost, alpha=args.focal_alpha, gamma=args.focal_gamma),
    }
    if args.cls_loss not in class_costs:
        raise ValueError(
            f"build_matcher: --cls_loss must be resolved to one of {sorted(class_costs)}, got {args.cls_loss!r}"
        )
    return HungarianMatcher(
        cost_class=args.set_cost_class,
        cost_bbox=args.set_cost_bbox,
        cost_giou=args.set_cost_giou,
        class_cost=class_costs[args.cls_loss],
    )
