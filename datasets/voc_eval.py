"""The Pascal VOC detection metric: per-class AP at IoU >= 0.5 by the devkit's rules (VOCevaldet.m, VOCap.m).

Per class, the detections of all evaluated images are sorted by score, highest first (ties keep their input
order, as the devkit's stable sort). Each detection is compared with the ground-truth boxes of its class in
its image and takes the one with the largest IoU (the first on ties). Then, with that IoU:

- >= 0.5 and the box is difficult: ignored, neither true nor false positive;
- >= 0.5, the box is not difficult and not yet taken: true positive, and the box is taken;
- otherwise (below 0.5, or a box already taken by a higher-scored detection): false positive.

Along the sorted list, recall = TP / (non-difficult boxes of the class) and precision = TP / (TP + FP).

- ``11point`` (VOC2007): the mean over t = 0, 0.1, ..., 1 of the largest precision at recall >= t (0 if none).
- ``area`` (VOC2010 and later): the area under the precision-recall curve, after replacing each precision by
  the largest precision at equal or higher recall.

A class without non-difficult ground truth in the evaluated images has no AP: -1 in the stats (COCO's
convention), '-' in the table, and it is left out of the mean. Boxes are continuous-coordinate xyxy, so IoUs
need no devkit ``+1`` (datasets/voc.py converts VOC's inclusive pixel indices on reading).
"""
import numpy as np
import torch

from util import dist

IOU_THRESHOLD = 0.5
DEFINITIONS = ("11point", "area")


def voc_ap(recall, precision, definition: str) -> float:
    """AP of one class from its recall/precision after each detection of the score-sorted list."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if definition == "11point":
        # k * 0.1, not k / 10: the devkit's 0:0.1:1 (e.g. 3 * 0.1 = 0.30000000000000004)
        thresholds = [k * 0.1 for k in range(11)]
        return float(sum(precision[recall >= t].max(initial=0.0) for t in thresholds) / 11)
    if definition == "area":
        r = np.concatenate([[0.0], recall, [1.0]])
        p = np.concatenate([[0.0], precision, [0.0]])
        p = np.maximum.accumulate(p[::-1])[::-1]  # the best precision at equal or higher recall
        steps = np.flatnonzero(r[1:] != r[:-1]) + 1
        return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))
    raise ValueError(f"unknown AP definition {definition!r}; expected one of {DEFINITIONS}")


def _iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) xyxy -> (D, G) IoU; 0 where the boxes do not overlap."""
    lt = np.maximum(boxes[:, None, :2], gt[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], gt[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_d = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    union = area_d[:, None] + area_g[None, :] - inter
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def class_recall_precision(image_ids, scores, boxes, ground_truth, iou_threshold: float = IOU_THRESHOLD):
    """One class. Detections: ``image_ids`` (D,), ``scores`` (D,), ``boxes`` (D, 4) xyxy; ``ground_truth``:
    image_id -> ((G, 4) boxes, (G,) difficult flags). Returns (recall, precision, n_positives) after each
    counted detection of the score-sorted list (ignored detections are left out of the curve)."""
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n_pos = int(sum((~np.asarray(d, dtype=bool)).sum() for _, d in ground_truth.values()))
    # the best ground-truth box of each detection, one IoU matrix per image
    best_iou = np.zeros(len(scores))
    best_gt = np.full(len(scores), -1)
    for image_id, (gt_boxes, _) in ground_truth.items():
        rows = np.flatnonzero(image_ids == image_id)
        if len(rows) and len(gt_boxes):
            ious = _iou(boxes[rows], np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))  # (D_i, G_i)
            best_gt[rows] = ious.argmax(axis=1)  # the first maximum, as the devkit's strict '>'
            best_iou[rows] = ious.max(axis=1)
    taken = {image_id: np.zeros(len(d), dtype=bool) for image_id, (_, d) in ground_truth.items()}
    hits = []  # 1: true positive, 0: false positive, in score order
    for k in np.argsort(-scores, kind="stable"):  # stable: ties keep input order, as the devkit
        if best_iou[k] >= iou_threshold:
            image_id, j = int(image_ids[k]), int(best_gt[k])
            if ground_truth[image_id][1][j]:
                continue  # difficult: ignored
            if not taken[image_id][j]:
                taken[image_id][j] = True
                hits.append(1)
                continue
        hits.append(0)
    hits = np.asarray(hits, dtype=np.float64)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = tp / n_pos if n_pos else np.full_like(tp, np.nan)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, n_pos


def _ap_text(ap: float) -> str:
    return f"{ap:.4f}" if ap >= 0 else "-"


class VocEvaluator:
    """``update`` with per-image predictions (as CocoEvaluator: image_id -> {'scores', 'labels', 'boxes'
    xyxy absolute}), ``synchronize_between_processes``, ``summarize`` (prints the table, returns the stats).
    Ground truth: ``coco_gt``'s annotations, ``difficult`` from their 'difficult' key (datasets/voc.py),
    else from 'iscrowd'. Only images passed to ``update`` are scored."""

    def __init__(self, coco_gt, iou_threshold: float = IOU_THRESHOLD):
        self.iou_threshold = iou_threshold
        self.class_names = {int(c["id"]): c["name"] for c in coco_gt.dataset["categories"]}
        per_image = {}  # (category id, image id) -> [(xyxy box, difficult)]
        for ann in coco_gt.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            difficult = bool(ann.get("difficult", ann.get("iscrowd", 0)))
            per_image.setdefault((int(ann["category_id"]), int(ann["image_id"])), []).append(
                ([x, y, x + w, y + h], difficult))
        self._gt_by_key = {key: (np.array([b for b, _ in v], dtype=np.float64).reshape(-1, 4),
                                 np.array([d for _, d in v], dtype=bool)) for key, v in per_image.items()}
        self.results: dict[int, tuple] = {}  # image_id -> (scores, labels, boxes) as numpy

    def update(self, res: dict) -> None:
        for image_id, pred in res.items():
            self.results[int(image_id)] = (
                torch.as_tensor(pred["scores"]).detach().cpu().double().numpy().reshape(-1),
                torch.as_tensor(pred["labels"]).detach().cpu().numpy().reshape(-1),
                torch.as_tensor(pred["boxes"]).detach().cpu().double().numpy().reshape(-1, 4))

    def synchronize_between_processes(self) -> None:
        merged = {}
        for part in dist.all_gather(self.results):
            merged.update(part)
        self.results = merged

    def average_precisions(self) -> dict[int, dict]:
        """category id -> {'11point': AP, 'area': AP, 'objects': non-difficult boxes} (AP -1: no boxes)."""
        image_ids = sorted(self.results)
        if image_ids:
            scores, labels, boxes = (np.concatenate([self.results[i][f] for i in image_ids]) for f in range(3))
            owner = np.concatenate([np.full(len(self.results[i][0]), i) for i in image_ids])
        else:
            scores, labels, boxes, owner = np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 4)), np.zeros(0)
        out = {}
        for cat_id in self.class_names:
            ground_truth = {i: self._gt_by_key[(cat_id, i)] for i in image_ids if (cat_id, i) in self._gt_by_key}
            mine = labels == cat_id
            recall, precision, n_pos = class_recall_precision(owner[mine], scores[mine], boxes[mine], ground_truth,
                                                              self.iou_threshold)
            out[cat_id] = {d: voc_ap(recall, precision, d) if n_pos else -1.0 for d in DEFINITIONS}
            out[cat_id]["objects"] = n_pos
        return out

    def summarize(self) -> dict:
        """Print the per-class table and return {'voc_mAP50_11point', 'voc_mAP50_area',
        'voc_AP50_per_class': {name: {'11point', 'area'}}}."""
        aps = self.average_precisions()
        scored = [a for a in aps.values() if a["objects"]]
        means = {d: float(np.mean([a[d] for a in scored])) if scored else -1.0 for d in DEFINITIONS}
        width = max([len("mean")] + [len(n) for n in self.class_names.values()])
        print(f"VOC metric: AP at IoU >= {self.iou_threshold:g}, difficult objects ignored "
              f"({len(self.results)} images)")
        print(f"{'class':<{width}}  {'AP50 11-point (VOC07)':>21}  {'AP50 area (VOC10+)':>18}  {'objects':>7}")
        for cat_id, a in aps.items():
            print(f"{self.class_names[cat_id]:<{width}}  {_ap_text(a['11point']):>21}  {_ap_text(a['area']):>18}  "
                  f"{a['objects']:>7}")
        print(f"{'mean':<{width}}  {_ap_text(means['11point']):>21}  {_ap_text(means['area']):>18}  "
              f"{sum(a['objects'] for a in aps.values()):>7}   (mAP over {len(scored)} classes)")
        return {"voc_mAP50_11point": means["11point"], "voc_mAP50_area": means["area"],
                "voc_AP50_per_class": {self.class_names[c]: {d: a[d] for d in DEFINITIONS} for c, a in aps.items()}}


__all__ = ["VocEvaluator", "voc_ap", "class_recall_precision", "DEFINITIONS", "IOU_THRESHOLD"]
