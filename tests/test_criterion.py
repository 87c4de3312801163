from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as tv

import models.criterion as criterion_module
from models.criterion import SetCriterion, build_criterion
from models.matcher import build_matcher
from models.postprocess import PostProcess, PostProcessFocal, build_postprocessors

NUM_CLASSES = 4  # real classes; logits have one more (no-object) column
NUM_QUERIES = 5
EOS_COEF = 0.1
ALPHA, GAMMA = 0.25, 2.0


class FixedMatcher(torch.nn.Module):
    """Returns preset indices, so the loss tests do not depend on the Hungarian solver."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return [(torch.tensor(s, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for s, t in self.indices]


# Image 0: three targets matched to queries 4, 0, 2; image 1: no targets; image 2: one target on query 3.
INDICES = [([4, 0, 2], [1, 0, 2]), ([], []), ([3], [0])]
NUM_BOXES = 4


def make_batch(seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, NUM_QUERIES, NUM_CLASSES + 1, generator=g) * 2).requires_grad_(requires_grad)
    centre = torch.rand(3, NUM_QUERIES, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(3, NUM_QUERIES, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centre, size], -1).requires_grad_(requires_grad)
    targets = [
        {"labels": torch.tensor([2, 0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.6, 0.3, 0.1],
                                                                    [0.7, 0.2, 0.1, 0.3]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def make_criterion(focal: bool, alpha: float = ALPHA, gamma: float = GAMMA) -> SetCriterion:
    return SetCriterion(NUM_CLASSES, FixedMatcher(INDICES), weight_dict={},
                        losses=["labels_focal", "cardinality_focal", "boxes", "cardinality"] if focal
                        else ["labels", "boxes", "cardinality"],
                        eos_coef=EOS_COEF, focal_alpha=alpha, focal_gamma=gamma)


def matched_classes_in_test(targets, indices) -> torch.Tensor:
    """(B, Q) class per query, no-object (NUM_CLASSES) when unmatched, built with plain loops."""
    classes = torch.full((len(targets), NUM_QUERIES), NUM_CLASSES, dtype=torch.int64)
    for b, (src, tgt) in enumerate(indices):
        for q, t in zip(src, tgt):
            classes[b, q] = targets[b]["labels"][t]
    return classes


@pytest.mark.parametrize("alpha,gamma", [(ALPHA, GAMMA), (0.4, 1.5)])
def test_focal_loss_equals_torchvision_sum_over_num_boxes(alpha, gamma):
    outputs, targets = make_batch()
    losses = make_criterion(focal=True, alpha=alpha, gamma=gamma)(outputs, targets)
    onehot = torch.zeros(3, NUM_QUERIES, NUM_CLASSES + 1)
    for b, (src, tgt) in enumerate(INDICES):
        for q, t in zip(src, tgt):
            onehot[b, q, targets[b]["labels"][t]] = 1.0
    assert onehot.sum() == NUM_BOXES
    expected = tv.sigmoid_focal_loss(outputs["pred_logits"], onehot, alpha=alpha, gamma=gamma,
                                     reduction="sum") / NUM_BOXES
    torch.testing.assert_close(losses["loss_ce"], expected, atol=1e-6, rtol=1e-6)
    losses["loss_ce"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0


def test_ce_loss_equals_weighted_cross_entropy():
    outputs, targets = make_batch()
    losses = make_criterion(focal=False)(outputs, targets)
    weight = torch.tensor([1.0] * NUM_CLASSES + [EOS_COEF])
    classes = matched_classes_in_test(targets, INDICES)
    expected = F.cross_entropy(outputs["pred_logits"].reshape(-1, NUM_CLASSES + 1), classes.reshape(-1),
                               weight=weight)
    torch.testing.assert_close(losses["loss_ce"], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("focal", [False, True])
def test_box_losses_class_error_and_cardinality(focal):
    outputs, targets = make_batch()
    losses = make_criterion(focal)(outputs, targets)
    src_boxes, tgt_boxes = [], []
    for b, (src, tgt) in enumerate(INDICES):
        for q, t in zip(src, tgt):
            src_boxes.append(outputs["pred_boxes"][b, q])
            tgt_boxes.append(targets[b]["boxes"][t])
    src_boxes, tgt_boxes = torch.stack(src_boxes), torch.stack(tgt_boxes)
    expected_l1 = (src_boxes - tgt_boxes).abs().sum() / NUM_BOXES
    giou = tv.generalized_box_iou(tv.box_convert(src_boxes, "cxcywh", "xyxy"),
                                  tv.box_convert(tgt_boxes, "cxcywh", "xyxy")).diagonal()
    torch.testing.assert_close(losses["loss_bbox"], expected_l1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / NUM_BOXES, atol=1e-6, rtol=1e-6)

    # class_error: percentage of matched queries whose argmax over all C+1 logits is not their class (DETR's and
    # the original SMCA code's definition, for both losses)
    logits = outputs["pred_logits"].detach()
    wrong = [logits[b, q].argmax().item() != targets[b]["labels"][t].item()
             for b, (src, tgt) in enumerate(INDICES) for q, t in zip(src, tgt)]
    assert losses["class_error"].item() == pytest.approx(100 * sum(wrong) / len(wrong))

    counts = torch.tensor([3.0, 0.0, 1.0])
    predicted = torch.tensor([sum(logits[b, q].argmax().item() != NUM_CLASSES for q in range(NUM_QUERIES))
                              for b in range(3)], dtype=torch.float)
    assert losses["cardinality_error"].item() == pytest.approx((predicted - counts).abs().mean().item())
    assert not losses["cardinality_error"].requires_grad
    if focal:
        confident = torch.tensor([sum(logits[b, q, :NUM_CLASSES].sigmoid().max().item() > 0.5
                                      for q in range(NUM_QUERIES)) for b in range(3)], dtype=torch.float)
        expected = (confident - counts).abs().mean().item()
        assert losses["cardinality_error_focal"].item() == pytest.approx(expected)
    else:
        assert "cardinality_error_focal" not in losses


def test_perfect_focal_predictions_have_zero_class_error():
    outputs, targets = make_batch(requires_grad=False)
    logits = torch.full_like(outputs["pred_logits"], -5.0)
    for b, (src, tgt) in enumerate(INDICES):
        for q, t in zip(src, tgt):
            logits[b, q, targets[b]["labels"][t]] = 5.0
    losses = make_criterion(focal=True)({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, targets)
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error_focal"].item() == 0.0
    # upstream's count under focal: unmatched queries' argmax lands on a real column, so every query counts
    assert losses["cardinality_error"].item() == pytest.approx((5 - 3 + 5 - 0 + 5 - 1) / 3)


@pytest.mark.parametrize("focal", [False, True])
def test_aux_outputs_get_suffixed_losses(focal):
    final, targets = make_batch(0)
    aux = [make_batch(seed)[0] for seed in (1, 2)]
    criterion = make_criterion(focal)
    losses = criterion({**final, "aux_outputs": aux}, targets)
    assert criterion.matcher.calls == 3  # final layer + each aux layer matched on its own
    base = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"} | ({"cardinality_error_focal"} if focal else set())
    assert set(losses) == base | {"class_error"} | {f"{k}_{i}" for k in base for i in (0, 1)}
    for i, layer in enumerate(aux):
        alone = criterion(layer, targets)
        for k in base:
            torch.testing.assert_close(losses[f"{k}_{i}"], alone[k])


@pytest.mark.parametrize("focal", [False, True])
def test_images_without_targets(focal):
    outputs, _ = make_batch()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(3)]
    args = Namespace(cls_loss="focal" if focal else "ce", set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0,
                     focal_alpha=ALPHA, focal_gamma=GAMMA)
    criterion = SetCriterion(NUM_CLASSES, build_matcher(args), weight_dict={},
                             losses=["labels_focal" if focal else "labels", "boxes", "cardinality"],
                             eos_coef=EOS_COEF, focal_alpha=ALPHA, focal_gamma=GAMMA)
    losses = criterion(outputs, empty)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # No positives: every logit is a negative and num_boxes is clamped to 1.
    zeros = torch.zeros_like(outputs["pred_logits"])
    if focal:
        expected = tv.sigmoid_focal_loss(outputs["pred_logits"], zeros, alpha=ALPHA, gamma=GAMMA, reduction="sum")
    else:
        expected = F.cross_entropy(outputs["pred_logits"].reshape(-1, NUM_CLASSES + 1),
                                   torch.full((3 * NUM_QUERIES,), NUM_CLASSES))
    torch.testing.assert_close(losses["loss_ce"], expected, atol=1e-6, rtol=1e-6)
    assert losses["class_error"].item() == 100.0  # DETR's accuracy() is 0 without targets
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_num_boxes_is_averaged_over_workers(monkeypatch):
    # Simulate a second rank holding 6 boxes: (4 + 6) / 2 workers = 5 boxes per worker.
    def fake_all_reduce(tensor):
        tensor += 6

    monkeypatch.setattr(criterion_module, "is_dist_avail_and_initialized", lambda: True)
    monkeypatch.setattr(criterion_module, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    outputs, targets = make_batch()
    distributed = make_criterion(focal=True)(outputs, targets)
    monkeypatch.undo()
    single = make_criterion(focal=True)(outputs, targets)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(distributed[k], single[k] * NUM_BOXES / 5)


@pytest.mark.quick
def test_unknown_loss_name_rejected():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(NUM_CLASSES, FixedMatcher(INDICES), {}, ["labels", "polygons"], EOS_COEF, ALPHA, GAMMA)


@pytest.mark.parametrize("cls_loss,no_aux_loss,masks", [("ce", False, False), ("focal", False, False),
                                                        ("focal", True, False), ("ce", False, True)])
def test_build_criterion(cls_loss, no_aux_loss, masks):
    args = Namespace(cls_loss=cls_loss, cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,
                     no_aux_loss=no_aux_loss, dec_layers=3, eos_coef=EOS_COEF, focal_alpha=ALPHA,
                     focal_gamma=GAMMA, masks=masks, mask_loss_coef=3.0, dice_loss_coef=4.0)
    criterion = build_criterion(args, NUM_CLASSES, FixedMatcher(INDICES))
    final = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = dict(final)
    if not no_aux_loss:
        expected.update({f"{k}_{i}": v for k, v in final.items() for i in (0, 1)})
    if masks:  # the last decoder layer only (DETR)
        expected.update({"loss_mask": 3.0, "loss_dice": 4.0})
    assert criterion.weight_dict == expected
    class_losses = ["labels_focal", "cardinality_focal"] if cls_loss == "focal" else ["labels"]
    assert criterion.losses == [*class_losses, "boxes", "cardinality", *(["masks"] if masks else [])]
    assert criterion.class_weight.tolist() == pytest.approx([1.0] * NUM_CLASSES + [EOS_COEF])


# ---- post-processing ----

@pytest.mark.quick
def test_focal_postprocess_picks_top_pairs_over_every_column_then_drops_no_object():
    # Q = 3 queries, C = 2 real classes + the no-object column, which competes for the k slots (original SMCA).
    logits = torch.tensor([[[0.0, 3.0, 2.5],
                            [2.0, 1.0, -5.0],
                            [-1.0, -3.0, -4.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]])
    sizes = torch.tensor([[200, 100]])  # (h, w)
    result, = PostProcessFocal(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    # Best three pairs: (q0, c1) logit 3, (q0, no-object) 2.5, (q1, c0) 2; the no-object pair is dropped.
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0]).sigmoid())
    expected_q0 = torch.tensor([40.0, 60.0, 60.0, 140.0])  # cx 50, cy 100, w 20, h 80
    expected_q1 = torch.tensor([0.0, 100.0, 50.0, 200.0])  # cx 25, cy 150, w 50, h 100
    torch.testing.assert_close(result["boxes"], torch.stack([expected_q0, expected_q1]))
    assert result["labels"].dtype == torch.int64

    # k larger than Q*(C+1) = 9: every pair, the three no-object ones dropped, sorted by score.
    result, = PostProcessFocal(num_select=100)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert result["labels"].tolist() == [1, 0, 1, 0, 0, 1]
    assert (result["scores"][:-1] >= result["scores"][1:]).all()


def test_softmax_postprocess_best_real_class_per_query():
    logits = torch.tensor([[[1.0, 2.0, 5.0], [3.0, 0.0, 0.0]]])  # query 0: no-object wins, class 1 reported
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.5, 0.25, 0.5, 0.5]]])
    sizes = torch.tensor([[10, 20]])  # (h, w)
    result, = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    prob = logits[0].softmax(-1)
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(result["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[0.0, 0.0, 20.0, 10.0], [5.0, 0.0, 15.0, 5.0]]))


def test_postprocess_batches_match_single_images():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 7, NUM_CLASSES + 1, generator=g),
               "pred_boxes": torch.rand(2, 7, 4, generator=g) * 0.5 + 0.1}
    sizes = torch.tensor([[480, 640], [300, 200]])
    for post in (PostProcess(), PostProcess(num_select=3), PostProcessFocal(num_select=10)):
        batched = post(outputs, sizes)
        for b in range(2):
            single, = post({k: v[b:b + 1] for k, v in outputs.items()}, sizes[b:b + 1])
            for k in ("scores", "labels", "boxes"):
                torch.testing.assert_close(batched[b][k], single[k])


def test_softmax_postprocess_num_select_keeps_the_best_queries():
    logits = torch.tensor([[[1.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    boxes = torch.rand(1, 3, 4) * 0.5 + 0.1
    sizes = torch.tensor([[10, 20]])
    every, = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    best, = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    order = every["scores"].argsort(descending=True)[:2]
    assert order.tolist() == [1, 2]
    for key in ("scores", "labels", "boxes"):
        torch.testing.assert_close(best[key], every[key][order])


def test_build_postprocessors():
    ce = build_postprocessors(Namespace(cls_loss="ce", num_detections=None, num_queries=7))["bbox"]
    assert isinstance(ce, PostProcess) and ce.num_select is None
    focal = build_postprocessors(Namespace(cls_loss="focal", num_detections=None, num_queries=7))["bbox"]
    assert isinstance(focal, PostProcessFocal) and focal.num_select == 7  # num_queries, as the original code
    focal = build_postprocessors(Namespace(cls_loss="focal", num_detections=100, num_queries=7))["bbox"]
    assert focal.num_select == 100
    ce = build_postprocessors(Namespace(cls_loss="ce", num_detections=5, num_queries=7))["bbox"]
    assert ce.num_select == 5
