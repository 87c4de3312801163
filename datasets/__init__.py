"""Dataset builders: the args namespace is read here and nowhere below."""
import torch

from util.errors import UserError

from . import synthetic_panoptic
from .coco import build_coco, coco_paths, max_category_id
from .coco_panoptic import (COCO_PANOPTIC_MAX_THING_ID, COCO_PANOPTIC_NUM_CLASSES, build_coco_panoptic,
                            check_panoptic_paths, max_panoptic_category_id)
from .synthetic import (DEFAULT_IMAGE_SIZE, DEFAULT_ROOT, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE,
                        ensure_synthetic)
from .transforms import make_coco_transforms, scaled_coco_transform_params

COCO_NUM_CLASSES = 91   # DETR's convention: COCO category ids 1..90 used directly as classes
DATASET_FILES = ("coco", "coco_panoptic", "synthetic", "synthetic_panoptic")
PANOPTIC_DATASETS = ("coco_panoptic", "synthetic_panoptic")


def _or_default(value, default):
    return default if value is None or value == "" else value


def _synthetic_root(args):
    """Generate (first use only) the synthetic set the flags describe (the panoptic one for
    synthetic_panoptic); returns (path, image_size)."""
    image_size = int(_or_default(args.synthetic_image_size, DEFAULT_IMAGE_SIZE))
    ensure = (synthetic_panoptic.ensure_synthetic_panoptic if args.dataset_file == "synthetic_panoptic"
              else ensure_synthetic)
    path = ensure(
        root=_or_default(args.synthetic_root, DEFAULT_ROOT),
        seed=int(_or_default(getattr(args, "synthetic_seed", None), args.seed)),
        train_size=int(_or_default(args.synthetic_train_size, DEFAULT_TRAIN_SIZE)),
        val_size=int(_or_default(args.synthetic_val_size, DEFAULT_VAL_SIZE)),
        image_size=image_size,
    )
    return path, image_size


def _check_supported(args) -> None:
    if args.dataset_file not in DATASET_FILES:
        raise UserError(f"--dataset_file {args.dataset_file!r} is unknown; use one of {', '.join(DATASET_FILES)}")
    if getattr(args, "masks", False) and args.dataset_file not in PANOPTIC_DATASETS:
        raise UserError(f"--masks trains DETR's panoptic segmentation head and needs segment masks: use "
                        f"--dataset_file coco_panoptic (with --coco_panoptic_path) or synthetic, not "
                        f"{args.dataset_file}")


def num_classes_for(args) -> int:
    """--num_classes if given; 91 for COCO, 250 for COCO panoptic (DETR's); max category id + 1 for synthetic."""
    _check_supported(args)
    if args.num_classes is not None:
        return int(args.num_classes)
    if args.dataset_file == "coco":
        return COCO_NUM_CLASSES
    if args.dataset_file == "coco_panoptic":
        return COCO_PANOPTIC_NUM_CLASSES
    root, _ = _synthetic_root(args)
    if args.dataset_file == "synthetic_panoptic":
        return max_panoptic_category_id(root / "annotations" / "panoptic_train2017.json") + 1
    return max_category_id(root / "annotations" / "instances_train2017.json") + 1


def max_thing_id(args) -> int:
    """Category ids up to this are things, the others stuff (the panoptic post-processor merges stuff)."""
    if args.dataset_file == "coco_panoptic":
        return COCO_PANOPTIC_MAX_THING_ID
    if args.dataset_file == "synthetic_panoptic":
        return synthetic_panoptic.MAX_THING_ID
    raise ValueError(f"--dataset_file {args.dataset_file} has no stuff classes")


def check_paths(args, image_sets) -> None:
    """The files and folders of --coco_path / --coco_panoptic_path that ``image_sets`` need, before any model or
    checkpoint is loaded; UserError naming the first missing one."""
    _check_supported(args)
    if args.dataset_file == "coco":
        for image_set in image_sets:
            coco_paths(args.coco_path, image_set)
    elif args.dataset_file == "coco_panoptic":
        check_panoptic_paths(args.coco_path, getattr(args, "coco_panoptic_path", None), image_sets)


def build_dataset(image_set: str, args):
    """'train' or 'val' split of --dataset_file, with DETR's transforms
    (scaled down to the image size for the synthetic set)."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    num_classes = num_classes_for(args)
    skip_bad_images = bool(getattr(args, "skip_bad_images", False))
    masks = bool(getattr(args, "masks", False))
    if args.dataset_file == "coco":
        return build_coco(image_set, args.coco_path, make_coco_transforms(image_set), num_classes,
                          skip_bad_images)
    if args.dataset_file == "coco_panoptic":
        return build_coco_panoptic(image_set, args.coco_path, args.coco_panoptic_path,
                                   make_coco_transforms(image_set), num_classes, masks, skip_bad_images)
    root, image_size = _synthetic_root(args)
    transforms = make_coco_transforms(image_set, **scaled_coco_transform_params(image_size))
    if args.dataset_file == "synthetic_panoptic":
        return build_coco_panoptic(image_set, root, root, transforms, num_classes, masks, skip_bad_images)
    return build_coco(image_set, root, transforms, num_classes, skip_bad_images)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset (unwrapping Subsets)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco
