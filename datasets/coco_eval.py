"""COCO evaluation (boxes, and masks where a model predicts them) over possibly distributed predictions.

Detections are collected as COCO result dicts per IoU type and image, merged across ranks and scored once.
Two libraries do the scoring, chosen with ``backend`` (main.py's --coco_backend):

- ``faster_coco_eval`` (default): pycocotools' algorithm with the per-image matching and the accumulation
  in C++; the same 12 numbers (tests/test_coco_eval.py checks them for equality), several times faster on
  COCO-sized sets (``python -m experiments.benchmark eval``).
- ``pycocotools``: the reference implementation.

Either way the printed summary is pycocotools' 12 lines (faster_coco_eval also prints AR@0.5 and AR@0.75;
those two are left out so logs read the same with both).

The results object is built directly instead of through ``COCO.loadRes``: loadRes crashes on an empty
list and, depending on the pycocotools version, requires a ground-truth 'info' key; building it here
needs neither and never touches the ground-truth object or file.
"""
import contextlib
import copy
import io
import weakref

import numpy as np
import torch

from util import dist

COCO_BACKENDS = ("faster_coco_eval", "pycocotools")
DEFAULT_BACKEND = COCO_BACKENDS[0]
IOU_TYPES = ("bbox", "segm")
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
# masks (K, 1, H, W) or (K, H, W), probabilities or bools, are binarised at this value (DETR's PostProcessSegm)
MASK_THRESHOLD = 0.5


def _silent(*_args, **_kwargs) -> None:
    pass


class _Pycocotools:
    name = "pycocotools"

    def __init__(self):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.COCO, self._cocoeval = COCO, COCOeval

    def evaluator(self, coco_gt, coco_dt, iou_type: str):
        return self._cocoeval(coco_gt, coco_dt, iouType=iou_type)

    def evaluate(self, coco_eval) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            coco_eval.evaluate()
            coco_eval.accumulate()

    def summary_lines(self, coco_eval) -> list[str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_eval.summarize()
        return out.getvalue().splitlines()


class _FasterCocoEval:
    name = "faster_coco_eval"

    def __init__(self):
        from faster_coco_eval import COCO, COCOeval_faster

        self.COCO, self._cocoeval = COCO, COCOeval_faster

    def evaluator(self, coco_gt, coco_dt, iou_type: str):
        # separate_eval=False: matching and accumulation in one C++ call (the library's fast path)
        return self._cocoeval(coco_gt, coco_dt, iouType=iou_type, print_function=_silent, separate_eval=False)

    def evaluate(self, coco_eval) -> None:
        coco_eval.evaluate()
        coco_eval.accumulate()

    def summary_lines(self, coco_eval) -> list[str]:
        lines = []
        coco_eval.print_function = lines.append
        coco_eval.summarize()
        coco_eval.print_function = _silent
        return lines


_BACKENDS = {"pycocotools": _Pycocotools, "faster_coco_eval": _FasterCocoEval}
# ground truth converted to another library's COCO class, per source object: built once per process
_CONVERTED_GT = weakref.WeakKeyDictionary()


def _ground_truth(backend, coco_gt):
    """``coco_gt`` as an object of the backend's COCO class; a copy (built once) when it is another library's."""
    if isinstance(coco_gt, backend.COCO):
        return coco_gt
    converted = _CONVERTED_GT.setdefault(coco_gt, {})
    if backend.name not in converted:
        gt = backend.COCO()
        # a deep copy: both libraries write into annotation dicts while evaluating ('ignore', mask RLEs)
        gt.dataset = copy.deepcopy(coco_gt.dataset)
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        converted[backend.name] = gt
    return converted[backend.name]


def ground_truth(coco_gt, backend: str = DEFAULT_BACKEND):
    """``coco_gt`` as the given backend's COCO object (the conversion an evaluator does on its first use)."""
    return _ground_truth(_BACKENDS[backend](), coco_gt)


def _results_api(backend, coco_gt, detections: list[dict]):
    """The detections as a COCO object of the backend's library: ids from 1, iscrowd 0, the gt's images and
    categories. 'area' is the box area, or the mask area for results with a 'segmentation' (as loadRes)."""
    res = backend.COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    for i, det in enumerate(detections, start=1):
        area = det["area"] if "area" in det else det["bbox"][2] * det["bbox"][3]
        res.dataset["annotations"].append({**det, "id": i, "area": area, "iscrowd": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def _box_results(image_id: int, pred: dict) -> list[dict]:
    boxes = _xyxy_to_xywh(torch.as_tensor(pred["boxes"], dtype=torch.float64).reshape(-1, 4))
    scores = torch.as_tensor(pred["scores"]).tolist()
    labels = torch.as_tensor(pred["labels"]).tolist()
    return [{"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
            for b, c, s in zip(boxes.tolist(), labels, scores)]


def _mask_results(image_id: int, pred: dict) -> list[dict]:
    """Masks as compressed RLE (counts as text, so results stay JSON-able), with the mask's area and box."""
    from pycocotools import mask as mask_util

    if "masks" not in pred:
        raise ValueError("segm evaluation needs 'masks' (K, 1, H, W) in every prediction")
    masks = torch.as_tensor(pred["masks"])
    masks = masks.reshape(-1, *masks.shape[-2:]) > MASK_THRESHOLD  # (K, H, W) bool
    scores = torch.as_tensor(pred["scores"]).tolist()
    labels = torch.as_tensor(pred["labels"]).tolist()
    # pycocotools encodes (H, W, K) Fortran-order uint8
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    results = []
    for rle, c, s in zip(rles, labels, scores):
        area, bbox = float(mask_util.area(rle)), mask_util.toBbox(rle).tolist()
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": int(c), "segmentation": rle, "score": float(s),
                        "area": area, "bbox": bbox})
    return results


_TO_RESULTS = {"bbox": _box_results, "segm": _mask_results}


class CocoEvaluator:
    """``update`` with per-image predictions (absolute xyxy boxes in the original image; 'masks' at the original
    size for 'segm'), ``synchronize_between_processes``, ``accumulate``, ``summarize``. Only images passed to
    ``update`` are scored, so a partial pass over the validation set gives the metrics of that part.

    Args:
        coco_gt: the ground truth as a pycocotools or faster_coco_eval COCO object (converted once if needed).
        iou_types: any of 'bbox', 'segm'.
        backend: 'faster_coco_eval' or 'pycocotools' (same numbers; see the module docstring).
    """

    def __init__(self, coco_gt, iou_types=("bbox",), backend: str = DEFAULT_BACKEND):
        iou_types = tuple(iou_types)
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {COCO_BACKENDS}, got {backend!r}")
        self.coco_gt = coco_gt
        self.iou_types = iou_types
        self.backend = _BACKENDS[backend]()
        self.results: dict[str, dict[int, list[dict]]] = {t: {} for t in iou_types}  # type -> image -> dicts
        self.coco_eval: dict = {}
        self._stats: dict[str, list[float]] | None = None

    def update(self, res: dict) -> None:
        """res: image_id -> {'scores' (K,), 'labels' (K,), 'boxes' (K,4) xyxy absolute[, 'masks' (K,1,H,W)]}."""
        for image_id, pred in res.items():
            image_id = int(image_id)
            for iou_type in self.iou_types:
                # A repeated image (e.g. DistributedSampler padding) replaces, not duplicates.
                self.results[iou_type][image_id] = _TO_RESULTS[iou_type](image_id, pred)
        self._stats = None

    def detections(self, iou_type: str = "bbox") -> list[dict]:
        """Every result of ``iou_type`` as COCO results (image_id, category_id, bbox xywh, score), by image id:
        the file format of test-dev submissions and ``COCO.loadRes``."""
        return [d for image_id in sorted(self.results[iou_type]) for d in self.results[iou_type][image_id]]

    def synchronize_between_processes(self) -> None:
        merged = {t: {} for t in self.iou_types}
        for part in dist.all_gather(self.results):
            for iou_type in self.iou_types:
                merged[iou_type].update(part[iou_type])
        self.results = merged

    @property
    def img_ids(self) -> list[int]:
        """The images evaluated (of the first IoU type; every type sees the same images)."""
        return sorted(self.results[self.iou_types[0]])

    def accumulate(self) -> None:
        coco_gt = _ground_truth(self.backend, self.coco_gt)
        self.coco_eval = {}
        for iou_type in self.iou_types:
            img_ids = sorted(self.results[iou_type])
            detections = self.detections(iou_type)
            coco_eval = self.backend.evaluator(coco_gt, _results_api(self.backend, coco_gt, detections), iou_type)
            coco_eval.params.imgIds = img_ids
            if img_ids:
                self.backend.evaluate(coco_eval)
            self.coco_eval[iou_type] = coco_eval
        self._stats = None

    def summarize(self) -> list[float]:
        """Print pycocotools' 12-line summary per IoU type; returns the 12 stats of the first type as floats."""
        if not self.coco_eval:
            self.accumulate()
        self._stats = {}
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            if coco_eval.params.imgIds:
                lines = self.backend.summary_lines(coco_eval)
                print("\n".join(lines[:len(STAT_NAMES)]))
                self._stats[iou_type] = [float(v) for v in np.asarray(coco_eval.stats)[:len(STAT_NAMES)]]
            else:
                # neither library can summarise nothing; an empty evaluation scores 0.
                print("no images were evaluated; all metrics are 0")
                self._stats[iou_type] = [0.0] * len(STAT_NAMES)
        return list(self._stats[self.iou_types[0]])

    @property
    def stats_by_type(self) -> dict[str, list[float]]:
        """IoU type -> the 12 COCO numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl)."""
        if self._stats is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.summarize()
        return {t: list(v) for t, v in self._stats.items()}

    @property
    def stats(self) -> list[float]:
        """The 12 COCO numbers of the first IoU type."""
        return self.stats_by_type[self.iou_types[0]]
