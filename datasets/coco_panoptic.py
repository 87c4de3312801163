"""COCO panoptic segmentation in DETR's layout (``--dataset_file coco_panoptic``; also the synthetic panoptic set).

Images come from ``--coco_path`` (``train2017/``, ``val2017/``), segments from ``--coco_panoptic_path``:
``annotations/panoptic_{train,val}2017.json`` and the PNG folders ``panoptic_{train,val}2017/``, where every pixel's
segment id is R + 256 G + 256^2 B (0: VOID, unlabelled). Targets are DETR's: one entry per segment of the JSON's
'segments_info' (crowd segments included, as DETR trains on them) with 'labels', 'boxes' (from the masks, DETR's
masks_to_boxes), 'area', 'iscrowd' and, with ``return_masks`` (``--masks``), 'masks' (N, H, W) bool.

Box and mask AP are scored against the instances file (``annotations/instances_val2017.json`` under
``--coco_path``, things only), as DETR does for panoptic runs; PQ against the panoptic JSON and PNGs
(datasets/panoptic_eval.py).
"""
import contextlib
import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torchvision.ops import masks_to_boxes

from util.errors import UserError

from . import annotation_checks
from .check_panoptic import check_panoptic
from .coco import CocoDetection, _BadImage, coco_paths, file_version, load_coco_api, read_json

PANOPTIC_LAYOUT = ("--coco_panoptic_path with annotations/panoptic_{train,val}2017.json and the PNG folders "
                   "panoptic_{train,val}2017/")
# DETR's class count for COCO panoptic: "large enough to hold max_obj_id + 1" (category ids reach 200)
COCO_PANOPTIC_NUM_CLASSES = 250
# COCO panoptic's stuff category ids (its things keep COCO's ids 1..90): DETR's is_thing_map is False for these
COCO_PANOPTIC_STUFF_IDS = frozenset(range(92, 201))


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 segment PNG -> (H, W) int64 ids, id = R + 256 G + 256^2 B (COCO panoptic's encoding)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8, the inverse of rgb2id."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2 % 256], axis=-1).astype(np.uint8)


def read_segment_png(path: Path) -> np.ndarray:
    """A segment PNG as (H, W) ids; an unreadable file raises _BadImage naming it."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise _BadImage(f"cannot read panoptic PNG {path}: {e}") from e
    return rgb2id(rgb)


def load_panoptic_json(ann_file) -> dict:
    """A COCO panoptic JSON; unreadable or malformed is a UserError naming the file. Parsed once per process and
    file version (as coco.load_coco_api): the post-processor's stuff classes and the dataset share the parse.
    Callers treat the dict as read-only."""
    return _parse_panoptic_json(*file_version(ann_file, "panoptic annotation file"))


@functools.lru_cache(maxsize=4)
def _parse_panoptic_json(ann_file: str, size: int, mtime_ns: int) -> dict:
    data = read_json(ann_file, "panoptic annotation file")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{ann_file} is not a COCO panoptic file (no {', '.join(missing)})")
    return data


def max_panoptic_category_id(ann_file) -> int:
    """Largest category id of a panoptic JSON (categories and segments)."""
    data = load_panoptic_json(ann_file)
    ids = [int(c["id"]) for c in data["categories"]]
    ids += [int(s["category_id"]) for ann in data["annotations"] for s in ann["segments_info"]]
    if not ids:
        raise UserError(f"{ann_file} lists no categories; pass --num_classes")
    return max(ids)


def stuff_category_ids(ann_file) -> frozenset:
    """The ids of a panoptic JSON's stuff categories ('isthing' 0). COCO panoptic: 92-200, the complement of DETR's
    is_thing_map (ids up to 90)."""
    return frozenset(int(c["id"]) for c in load_panoptic_json(ann_file)["categories"] if not c.get("isthing", 0))


def panoptic_paths(coco_panoptic_path, image_set: str) -> tuple[Path, Path]:
    """PNG folder and panoptic JSON of ``image_set``; UserError naming the first missing one."""
    if coco_panoptic_path is None or str(coco_panoptic_path) == "":
        raise UserError(f"--dataset_file coco_panoptic needs {PANOPTIC_LAYOUT}")
    root = Path(coco_panoptic_path).expanduser()
    if not root.is_dir():
        raise UserError(f"--coco_panoptic_path {root} is not a directory (expects {PANOPTIC_LAYOUT})")
    png_folder = root / f"panoptic_{image_set}2017"
    ann_file = root / "annotations" / f"panoptic_{image_set}2017.json"
    if not ann_file.is_file():
        raise UserError(f"panoptic annotation file {ann_file} not found (expects {PANOPTIC_LAYOUT})")
    if not png_folder.is_dir():
        raise UserError(f"panoptic PNG folder {png_folder} not found (expects {PANOPTIC_LAYOUT})")
    return png_folder, ann_file


def _images_api(panoptic: dict) -> COCO:
    """A COCO object holding the panoptic JSON's images and categories, without annotations."""
    coco = COCO()
    coco.dataset = {"images": panoptic["images"], "categories": panoptic["categories"], "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoPanoptic(CocoDetection):
    """Images of a COCO panoptic JSON with their segments as targets (see the module docstring).

    ``coco`` is the COCO object the box/mask evaluator scores against: the instances file when given, else the
    panoptic JSON's images without annotations. ``panoptic`` (the JSON) and ``ann_folder`` are what PQ reads.
    Image reading, bad-image handling and transforms are CocoDetection's.
    """

    def __init__(self, img_folder, ann_folder, ann_file, transforms=None, return_masks: bool = True,
                 instances_file=None, num_classes: int | None = None, skip_bad_images: bool = False):
        # not CocoDetection.__init__: the items and targets come from the panoptic JSON, not an instances file
        self.img_folder = Path(img_folder)
        self.ann_folder = Path(ann_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.return_masks = return_masks
        self.skip_bad_images = skip_bad_images
        self.num_bad_images_skipped = 0
        self.num_degenerate_dropped = 0  # none: boxes come from the masks, and DETR keeps every segment
        self.panoptic = load_panoptic_json(ann_file)
        annotation_checks.raise_errors(check_panoptic(self.panoptic, ann_file))
        self.segments = {ann["image_id"]: ann for ann in self.panoptic["annotations"]}
        self.ids = sorted(image["id"] for image in self.panoptic["images"])
        # things and stuff: every category a panoptic prediction can name (checkpoints store them)
        self.class_names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.panoptic["categories"]}
        without = [i for i in self.ids if i not in self.segments]
        if without:
            raise UserError(f"{self.ann_file} has no annotation for {len(without)} of its images "
                            f"(e.g. image id {without[0]})")
        self.coco = load_coco_api(instances_file) if instances_file else _images_api(self.panoptic)
        absent = [i for i in self.ids if i not in self.coco.imgs]
        if absent:
            raise UserError(f"{instances_file} lacks {len(absent)} images of {self.ann_file} "
                            f"(e.g. image id {absent[0]})")
        if num_classes is not None:
            self._check_segment_categories(num_classes)

    def _check_segment_categories(self, num_classes: int) -> None:
        cat_ids = [int(s["category_id"]) for ann in self.panoptic["annotations"] for s in ann["segments_info"]]
        if cat_ids and (max(cat_ids) > num_classes - 1 or min(cat_ids) < 0):
            raise UserError(f"{self.ann_file} has category ids in [{min(cat_ids)}, {max(cat_ids)}] but --num_classes "
                            f"is {num_classes}; set --num_classes {max(cat_ids) + 1} or larger")

    def _target(self, img_id: int) -> dict:
        ann = self.segments[img_id]
        info = self.coco.imgs[img_id]
        segments = ann["segments_info"]
        ids = read_segment_png(self.ann_folder / ann["file_name"])
        if ids.shape != (info["height"], info["width"]):
            raise _BadImage(f"panoptic PNG {self.ann_folder / ann['file_name']} is {ids.shape[1]}x{ids.shape[0]} "
                            f"but its image is {info['width']}x{info['height']}")
        segment_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        masks = torch.from_numpy(ids[None] == segment_ids[:, None, None])  # (N, H, W) bool
        target = {
            "labels": torch.tensor([int(s["category_id"]) for s in segments], dtype=torch.int64),
            "boxes": masks_to_boxes(masks) if len(segments) else torch.zeros((0, 4)),
            "area": torch.tensor([float(s["area"]) for s in segments], dtype=torch.float32),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
        }
        if self.return_masks:
            target["masks"] = masks
        return target


def image_paths(coco_path, image_set: str) -> tuple[Path, Path | None]:
    """The image folder of ``image_set`` under ``--coco_path`` and, for 'val', the instances file that box and mask
    AP are scored against (training reads no instances file); UserError naming the first missing one."""
    if coco_path is None or str(coco_path) == "":
        raise UserError("--dataset_file coco_panoptic needs --coco_path (the COCO images train2017/ val2017/ and "
                        "annotations/instances_val2017.json)")
    if image_set == "val":
        return coco_paths(coco_path, image_set)
    img_folder = Path(coco_path).expanduser() / f"{image_set}2017"
    if not img_folder.is_dir():
        raise UserError(f"image folder {img_folder} not found (--coco_path holds the COCO images of "
                        f"--dataset_file coco_panoptic)")
    return img_folder, None


def build_coco_panoptic(image_set: str, coco_path, coco_panoptic_path, transforms, num_classes: int,
                        return_masks: bool, skip_bad_images: bool = False) -> CocoPanoptic:
    """The split of DETR's layout; the val split also reads ``--coco_path``'s instances file for box/mask AP."""
    png_folder, ann_file = panoptic_paths(coco_panoptic_path, image_set)
    img_folder, instances_file = image_paths(coco_path, image_set)
    return CocoPanoptic(img_folder, png_folder, ann_file, transforms, return_masks=return_masks,
                        instances_file=instances_file, num_classes=num_classes, skip_bad_images=skip_bad_images)


def check_panoptic_paths(coco_path, coco_panoptic_path, image_sets) -> None:
    """Every file and folder the splits need, before anything is loaded (UserError naming the first missing)."""
    for image_set in image_sets:
        panoptic_paths(coco_panoptic_path, image_set)
        image_paths(coco_path, image_set)


__all__ = ["CocoPanoptic", "build_coco_panoptic", "check_panoptic_paths", "image_paths", "panoptic_paths", "rgb2id",
           "id2rgb", "stuff_category_ids",
           "read_segment_png", "load_panoptic_json", "max_panoptic_category_id", "COCO_PANOPTIC_NUM_CLASSES"]
