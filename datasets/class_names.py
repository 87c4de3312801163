"""Category names by category id: every dataset object has ``class_names`` ({id (int): name (str)}), checkpoints
store them, and the names of COCO's 91-id label space (DETR's official checkpoints) are built in."""
from typing import Dict, Optional

import torch

from .synthetic import CATEGORIES

# COCO 2017's 80 categories under their ids 1..90 (the ten unused ids have no name): DETR's class indices
COCO_CLASS_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
COCO_NUM_CLASSES = 91  # DETR's convention: COCO category ids 1..90 used directly as classes
SYNTHETIC_CLASS_NAMES = {cat_id: name for cat_id, name, _ in CATEGORIES}


def class_names_of(dataset) -> Optional[Dict[int, str]]:
    """The ``class_names`` of a dataset (unwrapping Subsets); None if it has none."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "class_names", None)
    return None if names is None else {int(k): str(v) for k, v in names.items()}


def default_class_names(dataset_file: Optional[str], num_classes: int) -> Optional[Dict[int, str]]:
    """Names for a checkpoint that stores none: COCO's for DETR's official 91-class checkpoints
    (``dataset_file`` None: they store no configuration), the shapes' for the synthetic set. None otherwise: a
    COCO-format run of this fork that predates stored names may have used a custom annotation file."""
    if dataset_file == "synthetic":
        return dict(SYNTHETIC_CLASS_NAMES)
    if dataset_file is None and num_classes == COCO_NUM_CLASSES:
        return dict(COCO_CLASS_NAMES)
    return None


def class_name(names: Optional[Dict[int, str]], category_id: int) -> str:
    """The name of ``category_id``, or 'class <id>' where it has none."""
    return (names or {}).get(int(category_id), f"class {int(category_id)}")
