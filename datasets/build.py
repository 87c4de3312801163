"""Dataset builders: the args namespace is read here and nowhere below (re-exported by datasets/__init__.py)."""
import argparse
import sys
from collections.abc import Mapping
from typing import Callable, Optional

import torch

from util.dist import is_main_process
from util.errors import UserError

from . import annotation_checks, synthetic_panoptic
from .check_panoptic import check_panoptic
from .class_names import COCO_NUM_CLASSES, class_names_of  # noqa: F401 (part of the package's API)
from .coco import build_coco, coco_paths, max_category_id, parse_coco
from .coco_panoptic import (COCO_PANOPTIC_NUM_CLASSES, build_coco_panoptic, check_panoptic_paths, image_paths,
                            load_panoptic_json, max_panoptic_category_id, panoptic_paths, stuff_category_ids)
from .fixed_size import make_fixed_size_transforms
from .mosaic import Mosaic
from .synthetic import (CATEGORIES, DEFAULT_IMAGE_SIZE, DEFAULT_ROOT, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE,
                        VOC_YEAR, ensure_synthetic)
from .transforms import make_coco_transforms, scaled_coco_transform_params
from .voc import VocDetection, class_list, parse_set_list, read_voc

DATASETS = ("coco", "coco_panoptic", "voc", "synthetic", "synthetic_panoptic")
# the sets with segment masks, for --masks (the synthetic one is what --dataset_file synthetic --masks reads)
PANOPTIC_DATASETS = ("coco_panoptic", "synthetic_panoptic")


def _or_default(value, default):
    return default if value is None or value == "" else value


def _synthetic_format(args) -> str:
    return getattr(args, "synthetic_format", None) or "coco"


def _synthetic_root(args):
    """Generate (first use only) the synthetic set the flags describe (the panoptic one for
    synthetic_panoptic); returns (path, image_size)."""
    image_size = int(_or_default(args.synthetic_image_size, DEFAULT_IMAGE_SIZE))
    common = dict(
        root=_or_default(args.synthetic_root, DEFAULT_ROOT),
        seed=int(_or_default(getattr(args, "synthetic_seed", None), args.seed)),
        train_size=int(_or_default(args.synthetic_train_size, DEFAULT_TRAIN_SIZE)),
        val_size=int(_or_default(args.synthetic_val_size, DEFAULT_VAL_SIZE)),
        image_size=image_size,
    )
    if args.dataset_file == "synthetic_panoptic":
        return synthetic_panoptic.ensure_synthetic_panoptic(**common), image_size
    preset = getattr(args, "synthetic_preset", None) or "default"
    return ensure_synthetic(**common, fmt=_synthetic_format(args), preset=preset), image_size


def _check_supported(args) -> None:
    if args.dataset_file not in DATASETS:
        raise UserError(f"--dataset_file {args.dataset_file!r} is unknown; use one of {', '.join(DATASETS)}")
    if getattr(args, "masks", False) and args.dataset_file not in PANOPTIC_DATASETS:
        raise UserError(f"--masks trains DETR's panoptic segmentation head and needs segment masks: use "
                        f"--dataset_file coco_panoptic (with --coco_panoptic_path) or synthetic, not "
                        f"{args.dataset_file}")


def _is_voc(args) -> bool:
    return args.dataset_file == "voc" or (args.dataset_file == "synthetic" and _synthetic_format(args) == "voc")


def _voc_classes(args) -> tuple:
    if args.dataset_file == "synthetic":
        return tuple(name for _, name, _ in CATEGORIES)
    return class_list(getattr(args, "voc_classes", None))


def _voc_source(args, image_set: str):
    """(VOCdevkit folder, [(year, set)], the flag naming the sets) of a VOC-layout split."""
    if args.dataset_file == "synthetic":
        root, _ = _synthetic_root(args)
        return root, [(VOC_YEAR, image_set)], "--synthetic_format voc"
    if not getattr(args, "voc_path", None):
        raise UserError("--voc_path is required for --dataset_file voc (the VOCdevkit folder holding VOC2007/ ...)")
    flag = f"--voc_{image_set}"
    return args.voc_path, parse_set_list(getattr(args, f"voc_{image_set}"), flag), flag


def _coco_ann_file(args, image_set: str):
    if args.dataset_file == "synthetic":
        root, _ = _synthetic_root(args)
        return coco_paths(root, image_set)[1]
    return coco_paths(args.coco_path, image_set, getattr(args, f"{image_set}_images", None),
                      getattr(args, f"{image_set}_ann", None))[1]


def num_classes_for(args) -> int:
    """--num_classes if given; else DETR's rule, largest category id + 1 (class num_classes is "no object"),
    read from the data and printed: from the training annotation file (the evaluated one under --eval), or
    from the class list of a VOC set (ids 1..K). COCO 2017 gives 91, as DETR; COCO panoptic DETR's 250."""
    _check_supported(args)
    if args.num_classes is not None:
        return int(args.num_classes)
    if args.dataset_file == "coco_panoptic":
        return COCO_PANOPTIC_NUM_CLASSES
    if _is_voc(args):
        classes = _voc_classes(args)
        print(f"num_classes {len(classes) + 1}: {len(classes)} VOC-layout classes with category ids "
              f"1..{len(classes)}, plus 1 (pass --num_classes to set it)")
        return len(classes) + 1
    if args.dataset_file == "synthetic_panoptic":
        ann_file = _synthetic_root(args)[0] / "annotations" / "panoptic_train2017.json"
        largest = max_panoptic_category_id(ann_file)
    else:
        ann_file = _coco_ann_file(args, "val" if getattr(args, "eval", False) else "train")
        largest = max_category_id(ann_file)
    print(f"num_classes {largest + 1}: largest category id {largest} in {ann_file}, plus 1 "
          f"(pass --num_classes to set it)")
    return largest + 1


def _transforms(image_set: str, args):
    """DETR's train/val transforms, scaled down to the image size for the synthetic sets, or their
    fixed-size variant (datasets/fixed_size.py) with --fixed_size."""
    params = {}
    if args.dataset_file in ("synthetic", "synthetic_panoptic"):
        params = scaled_coco_transform_params(int(_or_default(args.synthetic_image_size, DEFAULT_IMAGE_SIZE)))
    fixed_size = getattr(args, "fixed_size", None)
    if fixed_size:
        return make_fixed_size_transforms(image_set, fixed_size, **params)
    return make_coco_transforms(image_set, **params)


def stuff_ids(args) -> frozenset:
    """The stuff category ids of the panoptic set's ground truth (the panoptic post-processor merges stuff)."""
    if args.dataset_file == "coco_panoptic":
        return stuff_category_ids(panoptic_paths(args.coco_panoptic_path, "val")[1])
    if args.dataset_file == "synthetic_panoptic":
        return stuff_category_ids(_synthetic_root(args)[0] / "annotations" / "panoptic_val2017.json")
    raise ValueError(f"--dataset_file {args.dataset_file} has no panoptic ground truth")


def check_paths(args, image_sets) -> None:
    """The files and folders of --coco_path / --coco_panoptic_path that ``image_sets`` need, before any model or
    checkpoint is loaded; UserError naming the first missing one."""
    _check_supported(args)
    if args.dataset_file == "coco":
        for image_set in image_sets:
            _coco_ann_file(args, image_set)
    elif args.dataset_file == "coco_panoptic":
        check_panoptic_paths(args.coco_path, getattr(args, "coco_panoptic_path", None), image_sets)


def _findings(args, image_set: str, masks: bool) -> list:
    """The check findings of every annotation file ``image_set`` reads (datasets/check.py)."""
    if _is_voc(args):
        root, sets, flag = _voc_source(args, image_set)
        keep_difficult = image_set == "train" and bool(getattr(args, "voc_keep_difficult", False))
        return read_voc(root, sets, _voc_classes(args), keep_difficult, flag).findings
    found = []
    if args.dataset_file in PANOPTIC_DATASETS:
        synthetic = args.dataset_file == "synthetic_panoptic"
        root = _synthetic_root(args)[0] if synthetic else None
        png_folder, pan_file = panoptic_paths(root if synthetic else args.coco_panoptic_path, image_set)
        img_folder, instances = image_paths(root if synthetic else args.coco_path, image_set)
        found += check_panoptic(load_panoptic_json(pan_file), pan_file, png_folder, img_folder)
        if instances is None:
            return found
    elif args.dataset_file == "synthetic":
        img_folder, instances = coco_paths(_synthetic_root(args)[0], image_set)
    else:
        img_folder, instances = coco_paths(args.coco_path, image_set, getattr(args, f"{image_set}_images", None),
                                           getattr(args, f"{image_set}_ann", None))
    coco = parse_coco(instances)
    found += coco.findings + annotation_checks.image_file_findings(coco.dataset["images"], img_folder, str(instances))
    if masks and image_set == "val":  # the instances file masks are scored against
        found += annotation_checks.segmentation_findings(coco.dataset, str(instances))
    return found


def check_data(args, image_sets) -> None:
    """The validation pass over every annotation file the run reads, before anything trains
    (docs/data-checks.md): UserError with one line per error; the repairs said once, with their counts."""
    _check_supported(args)
    masks = bool(getattr(args, "masks", False))
    findings = [f for image_set in image_sets for f in _findings(args, image_set, masks)]
    annotation_checks.raise_errors(findings)
    if is_main_process():
        for line in annotation_checks.unsaid_repairs(findings):
            print(f"warning: {line}", file=sys.stderr, flush=True)


def build_dataset(image_set: str, args):
    """'train' or 'val' split of --dataset_file with its transforms; the training split wrapped in Mosaic
    (datasets/mosaic.py) when --mosaic > 0."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    num_classes = num_classes_for(args)
    skip_bad_images = bool(getattr(args, "skip_bad_images", False))
    transforms = _transforms(image_set, args)
    mosaic = float(getattr(args, "mosaic", 0) or 0) if image_set == "train" else 0.0
    # Mosaic composes untransformed images and runs the transforms itself
    item_transforms = None if mosaic else transforms
    masks = bool(getattr(args, "masks", False))
    if _is_voc(args):
        root, sets, flag = _voc_source(args, image_set)
        keep_difficult = image_set == "train" and bool(getattr(args, "voc_keep_difficult", False))
        dataset = VocDetection(root, sets, _voc_classes(args), transforms=item_transforms, num_classes=num_classes,
                               skip_bad_images=skip_bad_images, keep_difficult=keep_difficult, flag=flag)
    elif args.dataset_file == "coco":
        dataset = build_coco(image_set, args.coco_path, item_transforms, num_classes, skip_bad_images,
                             images=getattr(args, f"{image_set}_images", None),
                             ann_file=getattr(args, f"{image_set}_ann", None))
    elif args.dataset_file == "coco_panoptic":
        dataset = build_coco_panoptic(image_set, args.coco_path, args.coco_panoptic_path, item_transforms,
                                      num_classes, masks, skip_bad_images)
    elif args.dataset_file == "synthetic_panoptic":
        root, _ = _synthetic_root(args)
        dataset = build_coco_panoptic(image_set, root, root, item_transforms, num_classes, masks, skip_bad_images)
    else:
        root, _ = _synthetic_root(args)
        dataset = build_coco(image_set, root, item_transforms, num_classes, skip_bad_images)
    return Mosaic(dataset, transforms, mosaic) if mosaic else dataset


def uses_voc_metric(dataset) -> bool:
    """Whether evaluation on ``dataset`` also reports the VOC metric (datasets/voc_eval.py)."""
    while isinstance(dataset, (torch.utils.data.Subset, Mosaic)):
        dataset = dataset.dataset
    return isinstance(dataset, VocDetection)


def check_split(dataset, image_set: str, need_annotations: bool = False) -> None:
    """Fail before training when a split cannot be used, naming its annotation file: no images, or (for the
    split COCO evaluation scores) no annotations, which would make every metric -1."""
    base = dataset
    while isinstance(base, (torch.utils.data.Subset, Mosaic)):
        base = base.dataset
    source = getattr(base, "ann_file", None) or f"the {image_set} split"
    if len(dataset) == 0:
        raise UserError(f"the {image_set} set is empty: {source} lists no images; check --coco_path / the split")
    if need_annotations and not base.coco.dataset.get("annotations"):
        raise UserError(f"the {image_set} set has no annotations: {source} lists {len(dataset)} images and no "
                        f"boxes, so COCO evaluation would report -1 for every metric; use a split with annotations")


def eval_transform(config: Optional[Mapping] = None) -> Callable:
    """The validation transform of the run a checkpoint's stored ``config`` describes (its --dataset_file,
    --synthetic_image_size, --fixed_size; None: DETR's official checkpoints, COCO's), as a function of an
    image alone: PIL image -> normalised (3, H, W) model input."""
    flags = argparse.Namespace(**{"dataset_file": "coco", "synthetic_image_size": None, "fixed_size": None,
                                  **(config or {})})
    transforms = _transforms("val", flags)

    def transform(image):
        return transforms(image, None)[0]

    return transform


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset (unwrapping Subsets)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco
