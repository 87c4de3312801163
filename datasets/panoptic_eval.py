"""Panoptic quality (PQ = SQ x RQ) for all, thing and stuff classes, as panopticapi's ``pq_compute`` defines it.

panopticapi (the reference, github.com/cocodataset/panopticapi) is not on PyPI, and torchmetrics'
``PanopticQuality`` computes another quantity on COCO data: it has no crowd regions and takes ground-truth areas
from the pixels rather than the JSON. So this module implements pq_compute's definition, per image:

- a ground-truth segment (not crowd) and a predicted segment of the same category match when
  IoU > 0.5, with IoU = |G n P| / (|P| + area(G) - |G n P| - |P n VOID|); area(G) is the JSON's 'area', |P| the
  predicted pixels; VOID is id 0 of the ground-truth PNG;
- unmatched non-crowd ground truth is a false negative; crowd segments are neither;
- an unmatched prediction is a false positive unless more than half of its pixels lie on VOID or on the crowd
  region of its own category (the image's last crowd segment of that category, as pq_compute keeps one);
- per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2),
  summed over all images first; All / Things / Stuff average over the categories of the ground-truth JSON
  (its 'isthing') that have any TP, FP or FN ('n'). pq_compute divides by n = 0; here that gives 0.

Predictions are segment maps (H, W) of ids at the ground truth's size, 0 = unlabelled, with 'segments_info'
({'id', 'category_id'}). A predicted category that is not in the ground-truth JSON (pq_compute raises) counts in no
class; summarize() says how many such segments there were.
"""
import collections
from pathlib import Path

import numpy as np
import torch

from util import dist
from util.errors import UserError

from .coco_panoptic import read_segment_png

VOID = 0
OFFSET = 256 ** 3  # segment ids are below 256^3 (three PNG channels): pairs encode as gt * OFFSET + pred
IOU_THRESHOLD = 0.5
GROUPS = (("All", None), ("Things", True), ("Stuff", False))
# log.txt / stats keys per group, as DETR's engine names them
STATS_KEYS = {"All": "PQ_all", "Things": "PQ_th", "Stuff": "PQ_st"}


def image_pq_stats(gt_ids: np.ndarray, gt_segments: list, pred_ids: np.ndarray, pred_segments: list) -> dict:
    """One image's {category_id: [sum IoU, TP, FP, FN]} (see the module docstring); ids maps (H, W)."""
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"prediction is {pred_ids.shape[1]}x{pred_ids.shape[0]}, ground truth "
                         f"{gt_ids.shape[1]}x{gt_ids.shape[0]}")
    gt_segms = {int(s["id"]): s for s in gt_segments}
    pred_segms = {int(s["id"]): dict(s) for s in pred_segments}
    labels, counts = np.unique(pred_ids, return_counts=True)
    unseen = set(pred_segms)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise ValueError(f"predicted segment id {label} is in the map but not in segments_info")
        pred_segms[label]["area"] = count
        unseen.discard(label)
    if unseen:
        raise ValueError(f"predicted segment ids {sorted(unseen)} are in segments_info but not in the map")

    pairs, intersections = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64),
                                     return_counts=True)
    overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs, intersections)}
    stats = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in overlap.items():
        gt, pred = gt_segms.get(gt_label), pred_segms.get(pred_label)
        if gt is None or pred is None or gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
            continue
        union = pred["area"] + gt["area"] - intersection - overlap.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > IOU_THRESHOLD:
            stats[gt["category_id"]][0] += iou
            stats[gt["category_id"]][1] += 1
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_category = {}
    for gt_label, gt in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt.get("iscrowd", 0) == 1:
            crowd_by_category[gt["category_id"]] = gt_label
            continue
        stats[gt["category_id"]][3] += 1
    for pred_label, pred in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = overlap.get((VOID, pred_label), 0)
        if pred["category_id"] in crowd_by_category:
            ignored += overlap.get((crowd_by_category[pred["category_id"]], pred_label), 0)
        if ignored / pred["area"] > IOU_THRESHOLD:
            continue
        stats[pred["category_id"]][2] += 1
    return dict(stats)


def pq_average(stats: dict, categories: dict, isthing) -> tuple[dict, dict]:
    """({'pq', 'sq', 'rq', 'n'}, per-class {'pq', 'sq', 'rq'}) over the categories with the given 'isthing'
    (None: all), from summed {category_id: [sum IoU, TP, FP, FN]}."""
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for category_id, category in categories.items():
        if isthing is not None and (category.get("isthing", 0) == 1) != isthing:
            continue
        iou, tp, fp, fn = stats.get(category_id, (0.0, 0, 0, 0))
        if tp + fp + fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[category_id] = {"pq": iou / denominator, "sq": iou / tp if tp else 0.0, "rq": tp / denominator}
        pq += per_class[category_id]["pq"]
        sq += per_class[category_id]["sq"]
        rq += per_class[category_id]["rq"]
    if n == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def format_table(results: dict) -> str:
    """pq_compute's printed table (percentages, one decimal)."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name, _ in GROUPS:
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    return "\n".join(lines)


class PanopticEvaluator:
    """``update`` with per-image predictions, ``synchronize_between_processes``, ``summarize``. Only images passed
    to ``update`` are scored; a repeated image (DistributedSampler padding) replaces its earlier result.

    Args:
        panoptic: the ground-truth panoptic JSON (images, annotations, categories).
        ann_folder: the folder of its segment PNGs.
    """

    def __init__(self, panoptic: dict, ann_folder):
        self.categories = {int(c["id"]): c for c in panoptic["categories"]}
        self.ground_truth = {int(a["image_id"]): a for a in panoptic["annotations"]}
        self.ann_folder = Path(ann_folder)
        self.image_stats: dict[int, dict] = {}
        self.unknown_segments: dict[int, int] = {}  # image -> predicted segments of categories not in the JSON

    @classmethod
    def from_dataset(cls, dataset) -> "PanopticEvaluator":
        """For a CocoPanoptic dataset (or a Subset of one)."""
        while isinstance(dataset, torch.utils.data.Subset):
            dataset = dataset.dataset
        return cls(dataset.panoptic, dataset.ann_folder)

    def update(self, predictions: dict) -> None:
        """predictions: image_id -> {'segments': (H, W) ids at the original size, 'segments_info': [...]}."""
        for image_id, prediction in predictions.items():
            image_id = int(image_id)
            gt = self.ground_truth.get(image_id)
            if gt is None:
                raise UserError(f"image id {image_id} has no annotation in the panoptic ground truth")
            path = self.ann_folder / gt["file_name"]
            try:
                gt_ids = read_segment_png(path)
            except Exception as e:  # _BadImage or a missing file: the ground truth is broken, not the model
                raise UserError(f"cannot read the panoptic ground truth {path}: {e}") from None
            segments = torch.as_tensor(prediction["segments"]).cpu().numpy()
            info = prediction["segments_info"]
            self.image_stats[image_id] = image_pq_stats(gt_ids, gt["segments_info"], segments, info)
            self.unknown_segments[image_id] = sum(s["category_id"] not in self.categories for s in info)

    def synchronize_between_processes(self) -> None:
        stats, unknown = {}, {}
        for part_stats, part_unknown in dist.all_gather((self.image_stats, self.unknown_segments)):
            stats.update(part_stats)
            unknown.update(part_unknown)
        self.image_stats, self.unknown_segments = stats, unknown

    def totals(self) -> dict:
        """{category_id: [sum IoU, TP, FP, FN]} summed over the images."""
        totals = collections.defaultdict(lambda: [0.0, 0, 0, 0])
        for stats in self.image_stats.values():
            for category_id, values in stats.items():
                for k, value in enumerate(values):
                    totals[category_id][k] += value
        return dict(totals)

    def summarize(self) -> dict:
        """Print pq_compute's table and return its results: 'All', 'Things', 'Stuff' -> {'pq', 'sq', 'rq', 'n'}
        (fractions) and 'per_class'."""
        totals = self.totals()
        results = {}
        for name, isthing in GROUPS:
            results[name], per_class = pq_average(totals, self.categories, isthing)
            if isthing is None:
                results["per_class"] = per_class
        print(f"Panoptic quality over {len(self.image_stats)} images (panopticapi's pq_compute definition):")
        print(format_table(results))
        unknown = sum(self.unknown_segments.values())
        if unknown:
            print(f"{unknown} predicted segments have categories absent from the ground truth; they count in no class")
        return results


__all__ = ["PanopticEvaluator", "image_pq_stats", "pq_average", "format_table", "STATS_KEYS", "VOID"]
