import itertools
import math
from argparse import Namespace
from functools import partial

import pytest
import torch
import torchvision.ops as tv

from models.matcher import HungarianMatcher, build_matcher, focal_class_cost, softmax_class_cost

NUM_CLASSES = 5  # real classes; logits have one more (no-object) column
COSTS = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)


def plain_focal_cost(logit: float, alpha: float, gamma: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)


def plain_softmax_cost(logits_row: list[float], label: int) -> float:
    exps = [math.exp(v) for v in logits_row]
    return -exps[label] / sum(exps)


def reference_cost(logits, boxes, labels, tgt_boxes, class_cost_fn) -> list[list[float]]:
    """(Q, T) matching cost from plain element-wise formulas (torchvision for GIoU)."""
    giou = tv.generalized_box_iou(tv.box_convert(boxes, "cxcywh", "xyxy"),
                                  tv.box_convert(tgt_boxes, "cxcywh", "xyxy"))
    cost = []
    for q in range(len(boxes)):
        row = []
        for t in range(len(labels)):
            l1 = sum(abs(boxes[q, k].item() - tgt_boxes[t, k].item()) for k in range(4))
            cls = class_cost_fn(logits[q].tolist(), int(labels[t]))
            row.append(COSTS["cost_bbox"] * l1 + COSTS["cost_class"] * cls - COSTS["cost_giou"] * giou[q, t].item())
        cost.append(row)
    return cost


def brute_force_min(cost: list[list[float]]) -> float:
    """Minimum total cost over all one-to-one assignments of min(Q, T) pairs."""
    num_q, num_t = len(cost), len(cost[0])
    if num_q >= num_t:
        return min(sum(cost[q][t] for t, q in enumerate(qs)) for qs in itertools.permutations(range(num_q), num_t))
    return min(sum(cost[q][t] for q, t in enumerate(ts)) for ts in itertools.permutations(range(num_t), num_q))


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """n valid normalized cxcywh boxes."""
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


CLASS_COSTS = {
    "softmax": (softmax_class_cost, plain_softmax_cost),
    "focal": (partial(focal_class_cost, alpha=0.25, gamma=2.0),
              lambda row, label: plain_focal_cost(row[label], 0.25, 2.0)),
}


@pytest.mark.parametrize("variant", sorted(CLASS_COSTS))
@pytest.mark.parametrize("seed", range(6))
def test_matching_is_brute_force_optimal(variant, seed):
    class_cost, plain_class_cost = CLASS_COSTS[variant]
    matcher = HungarianMatcher(**COSTS, class_cost=class_cost)
    g = torch.Generator().manual_seed(seed)
    num_queries = 6
    # Per image: more queries than targets, fewer queries than targets (via a
    # 3-query slice below), and no targets at all.
    num_targets = [4, 1 + seed % 4, 0]
    logits = torch.randn(len(num_targets), num_queries, NUM_CLASSES + 1, generator=g) * 3
    boxes = torch.cat([random_boxes(num_queries, g)[None] for _ in num_targets])
    targets = [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": random_boxes(n, g)}
               for n in num_targets]

    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert len(indices) == len(targets)
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, n)
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        if n == 0:
            continue
        cost = reference_cost(logits[b], boxes[b], target["labels"], target["boxes"], plain_class_cost)
        total = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        assert total == pytest.approx(brute_force_min(cost), abs=1e-5)

    # Fewer queries (3) than targets (4): every query is matched, to distinct targets.
    few = {"pred_logits": logits[:1, :3], "pred_boxes": boxes[:1, :3]}
    (src, tgt), = matcher(few, targets[:1])
    assert sorted(src.tolist()) == [0, 1, 2]
    cost = reference_cost(logits[0, :3], boxes[0, :3], targets[0]["labels"], targets[0]["boxes"], plain_class_cost)
    total = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
    assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.4, 1.5), (0.5, 0.0)])
def test_focal_class_cost_equals_plain_formula(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, NUM_CLASSES + 1, generator=g, dtype=torch.float64) * 4
    logits[0, 1] = 40.0  # saturated sigmoid: the eps keeps the cost finite
    logits[1, 2] = -40.0
    labels = torch.tensor([1, 2, 2, 0, 5])
    cost = focal_class_cost(logits, labels, alpha=alpha, gamma=gamma)
    assert cost.shape == (4, 5)
    expected = torch.tensor([[plain_focal_cost(logits[q, t].item(), alpha, gamma) for t in labels.tolist()]
                             for q in range(4)], dtype=torch.float64)
    torch.testing.assert_close(cost, expected, atol=1e-9, rtol=1e-9)
    assert torch.isfinite(cost).all()


@pytest.mark.quick
def test_softmax_class_cost_is_minus_target_probability():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])  # probabilities 0.2, 0.6, 0.2
    cost = softmax_class_cost(logits, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(cost, torch.tensor([[-0.6, -0.2, -0.6]]))


def test_obvious_assignment_and_nonfinite_predictions_do_not_crash():
    matcher = HungarianMatcher(**COSTS, class_cost=softmax_class_cost)
    tgt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])
    # Query 2 sits on target 0, query 0 on target 1, query 1 far from both.
    pred_boxes = torch.tensor([[[0.8, 0.8, 0.1, 0.1], [0.5, 0.1, 0.05, 0.05], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, NUM_CLASSES + 1)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": tgt_boxes}]
    (src, tgt), = matcher({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    assert dict(zip(src.tolist(), tgt.tolist())) == {2: 0, 0: 1}

    # A diverged step still yields a valid assignment, so the loss (not the
    # solver) is where the non-finite value shows up.
    (src, tgt), = matcher({"pred_logits": torch.full_like(logits, float("nan")),
                           "pred_boxes": torch.full_like(pred_boxes, float("nan"))}, targets)
    assert len(src) == 2 and sorted(tgt.tolist()) == [0, 1]


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="all matching costs are 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0, class_cost=softmax_class_cost)


@pytest.mark.quick
def test_build_matcher_chooses_class_cost():
    args = Namespace(cls_loss="focal", set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
                     focal_alpha=0.4, focal_gamma=1.5)
    matcher = build_matcher(args)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    logits = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(matcher.class_cost(logits, torch.tensor([1])),
                               torch.tensor([[plain_focal_cost(-1.2, 0.4, 1.5)]], dtype=torch.float64))

    args.cls_loss = "ce"
    assert build_matcher(args).class_cost is softmax_class_cost
    args.cls_loss = "auto"
    with pytest.raises(ValueError, match="--cls_loss"):
        build_matcher(args)
