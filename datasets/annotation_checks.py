"""One validation pass over the annotation files a run reads (docs/data-checks.md); its command is
datasets/check.py (``python -m datasets.check FILE``).

Every inconsistency is one finding: one line naming the file, the offending ids and what to do. A finding is
either an error (the run stops before training) or a repair that cannot change what is measured, applied to
the one parsed copy that both training and evaluation read, and said once with a count. Nothing is dropped
without a line. The module imports neither torch nor pycocotools, so the command starts in a fraction of a
second; datasets/coco.py applies ``check_coco`` to every COCO-format file it parses, and
datasets/check_panoptic.py holds the checks of COCO panoptic files.
"""
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from util.errors import UserError

_SHOWN = 5  # offending ids shown per finding

# check key -> what the command's summary calls it, in the order it prints them
CHECKS = {
    "image_ids": "image ids unique",
    "image_sizes": "image width/height positive",
    "file_names": "image file names unique",
    "image_files": "image files exist",
    "opened_sizes": "declared sizes match the images",
    "category_ids": "category ids unique",
    "annotation_ids": "annotation ids unique",
    "annotation_images": "annotations name a listed image",
    "annotation_categories": "annotations name a listed category",
    "boxes": "boxes finite",
    "degenerate_boxes": "boxes w > 0 and h > 0 after clipping",
    "iscrowd": "iscrowd in {0, 1}",
    "areas": "areas present",
    "segmentations": "segmentation present (--masks)",
    "panoptic_annotations": "one panoptic annotation per image",
    "panoptic_pngs": "panoptic PNGs unique and present",
    "segment_ids": "segment ids unique per image",
}


@dataclass
class Finding:
    check: str  # a key of CHECKS
    file: str
    what: str  # e.g. "image ids listed more than once"
    ids: list  # the offending ids (or names), in file order
    fix: str  # what to do (errors), or what was done (repairs)
    error: bool = True

    def line(self) -> str:
        return f"{self.file}: {len(self.ids)} {self.what} ({few_ids(self.ids)}); {self.fix}"


def few_ids(ids) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN])
    return shown if len(ids) <= _SHOWN else f"{shown}, ... ({len(ids) - _SHOWN} more)"


def repeated(values) -> list:
    """The values that occur more than once, each once, in order of first occurrence."""
    counts = Counter(values)
    return list(dict.fromkeys(v for v in values if counts[v] > 1))


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def image_findings(images: list, file: str) -> list:
    """Ids, declared sizes and file names of an 'images' list (COCO and COCO panoptic alike)."""
    found = []
    ids = [image.get("id") for image in images]
    if None in ids:
        found.append(Finding("image_ids", file, "images without an 'id'",
                             [f"images[{k}]" for k, i in enumerate(ids) if i is None], "give every image an id"))
    duplicated = repeated([i for i in ids if i is not None])
    if duplicated:
        found.append(Finding("image_ids", file, "image ids listed more than once", duplicated,
                             "give each image its own id (an id must name one file and its boxes)"))
    bad_size = [image.get("id") for image in images
                if not (_positive_number(image.get("width")) and _positive_number(image.get("height")))]
    if bad_size:
        found.append(Finding("image_sizes", file, "images without a positive width and height", bad_size,
                             "set 'width' and 'height' to the image's size in pixels"))
    names = [image.get("file_name") for image in images]
    duplicated = repeated([n for n in names if n is not None])
    if duplicated or None in names:
        shown = [f"{n} (images {', '.join(str(image.get('id')) for image in images if image.get('file_name') == n)})"
                 for n in duplicated] + [f"image {image.get('id')} has none" for image in images
                                         if image.get("file_name") is None]
        found.append(Finding("file_names", file, "file names listed more than once or missing", shown,
                             "give each image entry its own file (one image listed twice is trained twice)"))
    return found


def image_file_findings(images: list, folder, file: str, open_images: bool = False) -> list:
    """Every image's file exists under ``folder`` (existence only); with ``open_images`` each header is also read
    and its size compared with the declared width/height."""
    folder = Path(folder)
    try:  # one listing instead of a stat per image (COCO's training split has 118k, often on a network file system)
        listed = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    except OSError:
        listed = set()
    missing, mismatched = [], []
    for image in images:
        name = image.get("file_name")
        if name is None:
            continue
        path = folder / name
        if name not in listed and not path.is_file():
            missing.append(f"{image.get('id')}: {path}")
        elif open_images:
            from PIL import Image, UnidentifiedImageError  # only the command opens images
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, UnidentifiedImageError) as e:
                mismatched.append(f"{image.get('id')}: {path} unreadable ({e})")
                continue
            if size != (image.get("width"), image.get("height")):
                mismatched.append(f"{image.get('id')}: {path} is {size[0]}x{size[1]}, declared "
                                  f"{image.get('width')}x{image.get('height')}")
    found = []
    if missing:
        found.append(Finding("image_files", file, "image files not found", missing,
                             f"restore them under {folder} or remove their entries (and annotations)"))
    if mismatched:
        found.append(Finding("opened_sizes", file, "images whose size differs from the declared width/height",
                             mismatched, "correct 'width'/'height' (boxes are in the stored image's pixels)"))
    return found


def category_findings(categories: list, file: str) -> tuple:
    ids = [c.get("id") for c in categories]
    duplicated = repeated(ids)
    found = [Finding("category_ids", file, "category ids listed more than once", duplicated,
                     "give each category its own id (an id must name one class)")] if duplicated else []
    return found, set(ids)


def _clip(boxes: np.ndarray, sizes: np.ndarray) -> tuple:
    """(N, 4) xywh and (N, 2) image (w, h) -> (N, 4) xyxy clipped to the image, (N,) keep: float32 in the
    loader's order (x2 = x + w, clamp at 0, then at the image size): the box is kept here exactly when the loader
    (datasets/coco.py, DETR's rule) keeps it."""
    xyxy = boxes.astype(np.float32)
    xyxy[:, 2:] += xyxy[:, :2]
    limits = np.tile(sizes.astype(np.float32), (1, 2))
    xyxy = np.minimum(np.maximum(xyxy, np.float32(0)), limits)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy, keep


_NUMBERS = (int, float)  # by type(): JSON's true/false are not coordinates


def _valid_box(box) -> bool:
    if type(box) not in (list, tuple) or len(box) != 4:
        return False
    x, y, w, h = box
    # the sum is finite exactly when all four are (inf - inf and anything + nan are nan)
    return (type(x) in _NUMBERS and type(y) in _NUMBERS and type(w) in _NUMBERS and type(h) in _NUMBERS
            and math.isfinite(x + y + w + h))


def _label(ann) -> str:
    """How a finding names an annotation: its id, or the VOC file it was converted from."""
    return str(ann["voc_xml"]) if "voc_xml" in ann else str(ann.get("id"))


def check_coco(data: dict, file: str) -> list:
    """Check a COCO instances file's content and repair, in place, what can be repaired without changing what is
    measured (the rules: docs/data-checks.md). Returns the findings; repairs have ``error=False``."""
    file = str(file)
    images, annotations = data["images"], data.setdefault("annotations", [])
    found = image_findings(images, file)
    cat_found, categories = category_findings(data.setdefault("categories", []), file)
    found += cat_found
    sizes = {image.get("id"): (image.get("width"), image.get("height")) for image in images
             if _positive_number(image.get("width")) and _positive_number(image.get("height"))}

    image_ids = {image.get("id") for image in images}
    # a file without images is an empty split, which the builders name as such (datasets/build.py, check_split)
    orphans = [_label(a) for a in annotations if a.get("image_id") not in image_ids] if images else []
    if orphans:
        found.append(Finding("annotation_images", file, "annotations whose image_id is not in 'images'", orphans,
                             "add the images or remove the annotations"))
    unknown = defaultdict(list)
    for a in annotations:
        if a.get("category_id") not in categories:
            unknown[a.get("category_id")].append(_label(a))
    if unknown:
        shown = [f"category {c}: annotations {few_ids(labels)}" for c, labels in unknown.items()]
        found.append(Finding("annotation_categories", file, "category ids used by annotations but not in "
                             "'categories'", shown, "add them to 'categories' (with a name) or remove those "
                             "annotations; a class missing there is trained but never evaluated"))
    bad_crowd = [_label(a) for a in annotations if "iscrowd" in a and a["iscrowd"] not in (0, 1)]
    if bad_crowd:
        found.append(Finding("iscrowd", file, "annotations with iscrowd other than 0 or 1", bad_crowd,
                             "set iscrowd to 1 for crowd regions (ignored by the evaluation) and 0 otherwise"))
    bad_box = [a for a in annotations if not _valid_box(a.get("bbox"))]
    if bad_box:
        found.append(Finding("boxes", file, "annotations without a finite bbox [x, y, w, h]",
                             [_label(a) for a in bad_box], "write four finite numbers or remove the annotations"))
    return found + _repair(data, file, sizes, {id(a) for a in bad_box})


def _repair(data: dict, file: str, sizes: dict, bad_box: set) -> list:
    """The repairs of docs/data-checks.md; ``bad_box``: id() of the annotations whose bbox is an error."""
    found = []
    annotations = data["annotations"]
    ids = [a.get("id") for a in annotations]
    counts = Counter(ids)
    taken = {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}
    renumbered, seen, next_id = [], set(), max(taken, default=0) + 1
    for a in annotations:
        if a.get("id") is None or (counts[a["id"]] > 1 and a["id"] in seen):
            renumbered.append(f"{a.get('id')} -> {next_id}")
            a["id"] = next_id
            next_id += 1
        seen.add(a["id"])
    if renumbered:
        found.append(Finding("annotation_ids", file, "annotation ids repeated or missing, renumbered", renumbered,
                             "repaired for training and evaluation alike (evaluation looks annotations up by "
                             "id); give every annotation its own id to silence this", error=False))
    no_crowd = [_label(a) for a in annotations if "iscrowd" not in a]
    for a in annotations:
        a.setdefault("iscrowd", 0)
    if no_crowd:
        found.append(Finding("iscrowd", file, "annotations without iscrowd, set to 0", no_crowd,
                             "repaired for training and evaluation alike (COCO's default)", error=False))
    # a box that is an error itself (not finite, or on an image without a size) is left to its error line
    sound = [a for a in annotations if id(a) not in bad_box and a.get("image_id") in sizes]
    if sound:
        boxes = np.array([a["bbox"] for a in sound], dtype=np.float64).reshape(-1, 4)
        _, keep = _clip(boxes, np.array([sizes[a["image_id"]] for a in sound], dtype=np.float64))
        dropped = {id(a) for a, k in zip(sound, keep) if not k}
        if dropped:
            data["annotations"] = annotations = [a for a in annotations if id(a) not in dropped]
            found.append(Finding("degenerate_boxes", file, "boxes with w <= 0 or h <= 0 once clipped to their "
                                 "image, dropped", [_label(a) for a, k in zip(sound, keep) if not k],
                                 "dropped from training and from the evaluation ground truth alike (no prediction "
                                 "can match them); fix or remove them to silence this", error=False))
    no_area = [a for a in annotations if "area" not in a and id(a) not in bad_box]
    for a in no_area:
        a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    no_area = [_label(a) for a in no_area]
    if no_area:
        found.append(Finding("areas", file, "annotations without an area, set to the box's w * h", no_area,
                             "repaired for training and evaluation alike (the evaluation's small/medium/large "
                             "ranges read it)", error=False))
    return found


def segmentation_findings(data: dict, file: str) -> list:
    """--masks scores masks against this file: every annotation needs a 'segmentation'."""
    missing = [_label(a) for a in data.get("annotations", []) if not a.get("segmentation")]
    return [Finding("segmentations", file, "annotations without a segmentation", missing,
                    "--masks scores masks against this file: add polygons or RLE masks, or drop --masks")] \
        if missing else []


def raise_errors(findings: list) -> None:
    """UserError holding one line per error finding (main.py prints each as 'error: <line>')."""
    errors = [f.line() for f in findings if f.error]
    if errors:
        raise UserError("\n".join(errors))


_SAID = set()  # repair lines already said in this process


def unsaid_repairs(findings: list) -> list:
    """The repair lines of ``findings`` not yet said in this process (each is said once, by whoever comes
    first: the run's check pass or the dataset that applies them)."""
    lines = [f.line() for f in findings if not f.error and f.line() not in _SAID]
    _SAID.update(lines)
    return lines
