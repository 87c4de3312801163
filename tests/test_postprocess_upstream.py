"""Focal post-processing scores as the original SMCA code: on the same model outputs, the fork's post-processor +
evaluator give exactly the COCO stats of a plain re-implementation of the original post-processing (top
num_queries pairs over Q x (C+1) sigmoid scores, label = column, no-object pairs reported with label C), scored
directly with pycocotools' loadRes + COCOeval."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datasets.coco_eval import CocoEvaluator
from models.postprocess import PostProcessFocal

NUM_IMAGES, QUERIES, NUM_CLASSES = 8, 30, 5  # category ids 1..4; num_classes = max id + 1; column 5 = no object
W, H = 320, 240


def ground_truth():
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, NUM_IMAGES + 1):
        images.append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(1, 6))):
            w, h = rng.uniform(20, 120), rng.uniform(20, 100)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "category_id": int(rng.integers(1, NUM_CLASSES))})
    coco = COCO()
    coco.dataset = {"info": {}, "images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": str(i)} for i in range(1, NUM_CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def model_outputs(coco):
    """Logits and boxes as a half-trained model gives them: the first queries sit near the objects with their
    class ahead, the rest are noise; the no-object column gets mid-range logits, so it competes for slots."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(NUM_IMAGES, QUERIES, NUM_CLASSES + 1, generator=g) - 2.0
    logits[..., -1] += 1.5
    boxes = torch.rand(NUM_IMAGES, QUERIES, 4, generator=g) * 0.4 + 0.1
    for b, image_id in enumerate(range(1, NUM_IMAGES + 1)):
        for q, ann in enumerate(coco.imgToAnns[image_id]):
            x, y, w, h = ann["bbox"]
            jitter = torch.randn(4, generator=g) * 0.02
            boxes[b, q] = torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H]) + jitter
            logits[b, q, ann["category_id"]] += 3.0 + torch.rand((), generator=g).item()
    return logits, boxes


def plain_original_detections(logits, boxes, k):
    """The original code's post-processing, written out with NumPy: per image the top k of all Q x (C+1) sigmoid
    scores, query = index // (C+1), label = index % (C+1) (the no-object column included), boxes cxcywh -> xywh
    in pixels; COCO results dicts, the no-object ones kept as the original code keeps them."""
    results = []
    for b in range(logits.shape[0]):
        prob = (1.0 / (1.0 + np.exp(-logits[b].numpy().astype(np.float64)))).reshape(-1)
        order = np.argsort(-prob, kind="stable")[:k]
        columns = logits.shape[-1]
        for index in order:
            cx, cy, w, h = boxes[b, index // columns].tolist()
            results.append({"image_id": b + 1, "category_id": int(index % columns), "score": float(prob[index]),
                            "bbox": [(cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H]})
    return results


def pycocotools_stats(coco, results):
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats]


def fork_stats(coco, logits, boxes, k):
    evaluator = CocoEvaluator(coco, ("bbox",))
    sizes = torch.tensor([[H, W]] * NUM_IMAGES)
    detections = PostProcessFocal(num_select=k)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    evaluator.update({b + 1: d for b, d in enumerate(detections)})
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.summarize(), detections


@pytest.mark.quick
def test_fork_stats_equal_the_original_post_processing_scored_by_pycocotools():
    coco = ground_truth()
    logits, boxes = model_outputs(coco)
    original = plain_original_detections(logits, boxes, k=QUERIES)
    no_object = sum(d["category_id"] == NUM_CLASSES for d in original)
    assert 0 < no_object < len(original)  # the no-object column really took some of the k slots
    expected = pycocotools_stats(coco, original)
    stats, detections = fork_stats(coco, logits, boxes, k=QUERIES)
    assert sum(len(d["scores"]) for d in detections) == len(original) - no_object
    np.testing.assert_allclose(stats, expected, rtol=0, atol=1e-12)
    assert expected[0] > 0.2  # a meaningful AP, not a degenerate all-zero comparison


def test_the_k_budget_changes_the_numbers():
    """Why the default matters: the fork's former rule (top 100 over the Q x C real columns) scores the same
    outputs differently, so a table scored that way does not reproduce the original's rows."""
    coco = ground_truth()
    logits, boxes = model_outputs(coco)
    original = pycocotools_stats(coco, plain_original_detections(logits, boxes, k=QUERIES))
    real = logits.clone()
    real[..., -1] = -torch.inf  # the former rule never considered the no-object column
    former = pycocotools_stats(coco, plain_original_detections(real, boxes, k=100))
    assert former != original
