"""Dataset builders: the args namespace is read here and nowhere below."""
import torch

from util.errors import UserError

from .coco import build_coco, max_category_id
from .synthetic import (DEFAULT_IMAGE_SIZE, DEFAULT_ROOT, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE,
                        ensure_synthetic)
from .transforms import make_coco_transforms, scaled_coco_transform_params

COCO_NUM_CLASSES = 91   # DETR's convention: COCO category ids 1..90 used directly as classes


def _or_default(value, default):
    return default if value is None or value == "" else value


def _synthetic_root(args):
    """Generate (first use only) the synthetic set the flags describe; returns (path, image_size)."""
    image_size = int(_or_default(args.synthetic_image_size, DEFAULT_IMAGE_SIZE))
    path = ensure_synthetic(
        root=_or_default(args.synthetic_root, DEFAULT_ROOT),
        seed=int(_or_default(getattr(args, "synthetic_seed", None), args.seed)),
        train_size=int(_or_default(args.synthetic_train_size, DEFAULT_TRAIN_SIZE)),
        val_size=int(_or_default(args.synthetic_val_size, DEFAULT_VAL_SIZE)),
        image_size=image_size,
    )
    return path, image_size


def _check_supported(args) -> None:
    if getattr(args, "masks", False):
        raise UserError("--masks (segmentation) is not supported by this fork; remove --masks")
    if args.dataset_file not in ("coco", "synthetic"):
        raise UserError(f"--dataset_file {args.dataset_file!r} is unknown; use coco or synthetic")


def num_classes_for(args) -> int:
    """--num_classes if given; 91 for COCO; max category id + 1 for synthetic."""
    _check_supported(args)
    if args.num_classes is not None:
        return int(args.num_classes)
    if args.dataset_file == "coco":
        return COCO_NUM_CLASSES
    root, _ = _synthetic_root(args)
    return max_category_id(root / "annotations" / "instances_train2017.json") + 1


def build_dataset(image_set: str, args):
    """'train' or 'val' split of --dataset_file, with DETR's transforms
    (scaled down to the image size for the synthetic set)."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    num_classes = num_classes_for(args)
    skip_bad_images = bool(getattr(args, "skip_bad_images", False))
    if args.dataset_file == "coco":
        return build_coco(image_set, args.coco_path, make_coco_transforms(image_set), num_classes,
                          skip_bad_images)
    root, image_size = _synthetic_root(args)
    transforms = make_coco_transforms(image_set, **scaled_coco_transform_params(image_size))
    return build_coco(image_set, root, transforms, num_classes, skip_bad_images)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset (unwrapping Subsets)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco
