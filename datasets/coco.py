"""COCO-format detection dataset (real COCO and the synthetic shapes set).

Items follow the team contract: ``(img Tensor[3,H,W], target)`` with
'boxes' (N,4) cxcywh normalised, 'labels' (N,) int64 COCO category ids,
'image_id', 'orig_size', 'size' (h, w), 'area', 'iscrowd'.

All annotation checks run once, when a file is parsed (datasets/check.py, docs/data-checks.md), so bad data
fails before training starts and the repairs it allows reach training and evaluation alike; only image decoding
is checked per item.
"""
import contextlib
import functools
import io
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO

from util.dist import is_main_process

from util.errors import UserError

from . import annotation_checks
from .images import ImageDecodeError, load_rgb

COCO_LAYOUT = "--coco_path with train2017/ val2017/ annotations/instances_{train,val}2017.json"


def _warn(msg: str) -> None:
    if is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def coco_paths(root, image_set: str, images=None, ann_file=None) -> tuple[Path, Path]:
    """Image folder and annotation file of ``image_set``: ``images`` / ``ann_file`` (--{image_set}_images,
    --{image_set}_ann) where given, else the COCO layout under ``root``; raises UserError naming the first
    path that is missing."""
    flags = f"--{image_set}_images and --{image_set}_ann"
    if (images is None or ann_file is None) and (root is None or str(root) == ""):
        raise UserError(f"--coco_path is required for --dataset_file coco unless {flags} are given "
                        f"(expects {COCO_LAYOUT})")
    if images is None or ann_file is None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"--coco_path {root} is not a directory (expects {COCO_LAYOUT})")
    img_folder = Path(images).expanduser() if images is not None else root / f"{image_set}2017"
    ann_file = Path(ann_file).expanduser() if ann_file is not None else (
        root / "annotations" / f"instances_{image_set}2017.json")
    if not img_folder.is_dir():
        raise UserError(f"image folder {img_folder} not found (expects {COCO_LAYOUT}, or pass {flags})")
    if not ann_file.is_file():
        raise UserError(f"annotation file {ann_file} not found (expects {COCO_LAYOUT}, or pass {flags})")
    return img_folder, ann_file


def load_coco_api(ann_file) -> COCO:
    """pycocotools COCO without its progress prints, checked and repaired by datasets/check.py: unreadable JSON
    or any error finding is a UserError (one line per finding). Parsed once per process and file version (path,
    size, mtime): the check pass, deriving --num_classes and building the dataset share one parse of a large
    file (COCO's training annotations are about 450 MB). Callers treat the object as read-only; its
    ``findings`` are the file's check results."""
    coco = parse_coco(ann_file)
    annotation_checks.raise_errors(coco.findings)
    return coco


def parse_coco(ann_file) -> COCO:
    """``load_coco_api`` without raising on error findings (the check pass reports them with others)."""
    return _parse_coco_api(*file_version(ann_file, "annotation file"))


def file_version(path, what: str) -> tuple:
    """(absolute path, size, mtime_ns) of a file, the key of a per-process parse cache; a missing file is a
    UserError 'cannot read <what> <path>'."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e}") from e
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def read_json(path: str, what: str):
    """A JSON file's content; unreadable or malformed is a UserError 'cannot read <what> <path>'."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from e


@functools.lru_cache(maxsize=4)
def _parse_coco_api(ann_file: str, size: int, mtime_ns: int) -> COCO:
    dataset = read_json(ann_file, "annotation file")
    if not isinstance(dataset, dict) or "images" not in dataset:
        raise UserError(f"annotation file {ann_file} is not COCO format (no 'images' list)")
    coco = COCO()
    coco.findings = annotation_checks.check_coco(dataset, ann_file)
    coco.dataset = dataset
    if not any(f.error for f in coco.findings):  # pycocotools' index needs sound ids
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO annotation file; every image is kept, including those
    without annotations (negatives)."""

    def __init__(self, img_folder, ann_file, transforms=None, num_classes: int | None = None,
                 skip_bad_images: bool = False, coco: COCO | None = None):
        """``coco``: annotations already in memory (a converted VOC set); ``ann_file`` then only names them."""
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self.coco = coco if coco is not None else load_coco_api(ann_file)
        self.ids = sorted(self.coco.imgs)
        # {category id: name} from the annotation file (stored in checkpoints, shown by predict.py)
        self.class_names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.dataset["categories"]}
        self.num_bad_images_skipped = 0
        # the parse's repairs (datasets/check.py), said once per process: degenerate boxes are already gone
        # from the annotations that both the targets and the evaluation ground truth read
        findings = getattr(self.coco, "findings", [])
        self.num_degenerate_dropped = sum(len(f.ids) for f in findings if f.check == "degenerate_boxes")
        for line in annotation_checks.unsaid_repairs(findings):
            _warn(line)
        if num_classes is not None:
            self._check_category_ids(num_classes)

    def _check_category_ids(self, num_classes: int) -> None:
        cat_ids = [int(a["category_id"]) for a in self.coco.dataset["annotations"]]
        if not cat_ids:
            return
        lo, hi = min(cat_ids), max(cat_ids)
        if hi > num_classes - 1 or lo < 0:
            raise UserError(
                f"{self.ann_file} has category ids in [{lo}, {hi}] but --num_classes is {num_classes} "
                f"(ids must lie in [0, num_classes-1]); set --num_classes {hi + 1} or larger")

    def _target(self, img_id: int) -> dict:
        """Training target in absolute xyxy, as DETR builds it: crowd regions are left out (the evaluator
        still sees them), boxes clipped to the image in float32 and degenerate ones dropped."""
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        info = self.coco.imgs[img_id]
        boxes, keep = _clipped_xyxy([a["bbox"] for a in anns], [info["width"]] * len(anns),
                                    [info["height"]] * len(anns))
        labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        area = torch.tensor([float(a["area"]) if "area" in a else float(a["bbox"][2]) * float(a["bbox"][3])
                             for a in anns], dtype=torch.float32)
        return {"boxes": boxes[keep], "labels": labels[keep], "area": area[keep],
                "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64)}

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, img_id: int) -> Image.Image:
        info = self.coco.imgs[img_id]
        path = self.img_folder / info["file_name"]
        try:
            img = load_rgb(path)  # every PIL mode by its rule (datasets/images.py)
        except ImageDecodeError as e:
            raise _BadImage(str(e)) from e
        expected = (info.get("width"), info.get("height"))
        if None not in expected and img.size != expected:
            raise _BadImage(f"image {path} is {img.size[0]}x{img.size[1]} but {self.ann_file} says "
                            f"{expected[0]}x{expected[1]}")
        return img

    def __getitem__(self, idx: int):
        # A bad image is replaced by the next index's item, so the substitute
        # is deterministic; len(self) failures in a row means nothing is readable.
        for attempt in range(len(self)):
            i = (idx + attempt) % len(self)
            try:
                return self._get(i)
            except _BadImage as e:
                if not self.skip_bad_images:
                    raise UserError(f"{e}; fix or remove it, or pass --skip_bad_images") from None
                self.num_bad_images_skipped += 1
                _warn(f"{e}; skipped (--skip_bad_images; {self.num_bad_images_skipped} skips so far "
                      f"in this process)")
        raise UserError(f"no readable image in {self.img_folder}")

    def _get(self, i: int):
        img_id = self.ids[i]
        img = self._load_image(img_id)
        w, h = img.size
        target = self._target(img_id)
        target["image_id"] = torch.tensor([img_id])
        target["orig_size"] = torch.tensor([h, w])
        target["size"] = torch.tensor([h, w])
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target


def _clipped_xyxy(bboxes, widths, heights):
    """COCO xywh boxes -> (N, 4) xyxy clipped to their image, and the (N,) mask of boxes with positive extent.
    float32 arithmetic in DETR's order (x2 = x + w, then clamp), so the values equal DETR's bit for bit."""
    boxes = torch.as_tensor(bboxes, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    limits = torch.tensor([widths, heights], dtype=torch.float32).t().reshape(-1, 2).repeat(1, 2)  # (N, 4)
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return boxes, keep


class _BadImage(Exception):
    """An image file that cannot be decoded or does not match its annotation."""


def build_coco(image_set: str, coco_path, transforms, num_classes: int,
               skip_bad_images: bool = False, images=None, ann_file=None) -> CocoDetection:
    img_folder, ann_file = coco_paths(coco_path, image_set, images, ann_file)
    return CocoDetection(img_folder, ann_file, transforms=transforms, num_classes=num_classes,
                         skip_bad_images=skip_bad_images)


def max_category_id(ann_file) -> int:
    """Largest category id listed in an annotation file (categories and annotations)."""
    coco = load_coco_api(ann_file)
    ids = [int(c["id"]) for c in coco.dataset["categories"]]
    ids += [int(a["category_id"]) for a in coco.dataset["annotations"]]
    if not ids:
        raise UserError(f"{ann_file} lists no categories; pass --num_classes")
    return max(ids)


__all__ = ["CocoDetection", "build_coco", "coco_paths", "load_coco_api", "max_category_id",
           "COCO_LAYOUT"]
