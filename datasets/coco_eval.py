"""COCO box evaluation over (possibly distributed) predictions.

Detections are collected as COCO result dicts per image, merged across ranks,
and scored once with pycocotools' COCOeval. The results object is built
directly instead of through ``COCO.loadRes``: loadRes crashes on an empty
list and, depending on the pycocotools version, requires a ground-truth
'info' key; building it here needs neither and never touches the
ground-truth object or file.
"""
import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util import dist

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


def _xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


class CocoEvaluator:
    """``update`` with per-image predictions (absolute xyxy in the original
    image), ``synchronize_between_processes``, ``accumulate``, ``summarize``.
    Only images passed to ``update`` are scored, so a partial pass over the
    validation set gives the metrics of that part."""

    def __init__(self, coco_gt: COCO, iou_types=("bbox",)):
        iou_types = tuple(iou_types)
        if iou_types != ("bbox",):
            raise ValueError(f"only iou_types=('bbox',) is supported, got {iou_types}")
        self.coco_gt = coco_gt
        self.iou_types = iou_types
        self.results: dict[int, list[dict]] = {}   # image_id -> COCO result dicts
        self.coco_eval: dict[str, COCOeval] = {}
        self._stats: list[float] | None = None

    def update(self, res: dict) -> None:
        """res: image_id -> {'scores' (K,), 'labels' (K,), 'boxes' (K,4) xyxy absolute}."""
        for image_id, pred in res.items():
            image_id = int(image_id)
            boxes = _xyxy_to_xywh(torch.as_tensor(pred["boxes"], dtype=torch.float64).reshape(-1, 4))
            scores = torch.as_tensor(pred["scores"]).tolist()
            labels = torch.as_tensor(pred["labels"]).tolist()
            # A repeated image (e.g. DistributedSampler padding) replaces, not duplicates.
            self.results[image_id] = [
                {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
                for b, c, s in zip(boxes.tolist(), labels, scores)
            ]
        self._stats = None

    def detections(self) -> list[dict]:
        """Every detection as COCO results (image_id, category_id, bbox xywh, score), by image id: the file
        format of test-dev submissions and ``COCO.loadRes``."""
        return [d for image_id in sorted(self.results) for d in self.results[image_id]]

    def synchronize_between_processes(self) -> None:
        merged: dict[int, list[dict]] = {}
        for part in dist.all_gather(self.results):
            merged.update(part)
        self.results = merged

    def _results_api(self, detections: list[dict]) -> COCO:
        res = COCO()
        res.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        for i, det in enumerate(detections, start=1):
            w, h = det["bbox"][2], det["bbox"][3]
            res.dataset["annotations"].append({**det, "id": i, "area": w * h, "iscrowd": 0})
        with contextlib.redirect_stdout(io.StringIO()):
            res.createIndex()
        return res

    def accumulate(self) -> None:
        img_ids = sorted(self.results)
        detections = self.detections()
        coco_eval = COCOeval(self.coco_gt, self._results_api(detections), iouType="bbox")
        coco_eval.params.imgIds = img_ids
        if img_ids:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.evaluate()
                coco_eval.accumulate()
        self.coco_eval = {"bbox": coco_eval}
        self._stats = None

    def summarize(self) -> list[float]:
        """Print pycocotools' 12-line summary; returns the 12 stats as floats."""
        if "bbox" not in self.coco_eval:
            self.accumulate()
        coco_eval = self.coco_eval["bbox"]
        print("IoU metric: bbox")
        if coco_eval.params.imgIds:
            coco_eval.summarize()
            self._stats = [float(v) for v in np.asarray(coco_eval.stats)]
        else:
            # pycocotools cannot summarise nothing; an empty evaluation scores 0.
            print("no images were evaluated; all metrics are 0")
            self._stats = [0.0] * len(STAT_NAMES)
        return list(self._stats)

    @property
    def stats(self) -> list[float]:
        """The 12 COCO numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl)."""
        if self._stats is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.summarize()
        return list(self._stats)
