"""Paired image/target transforms for detection, DETR's recipe and formulas.

Every transform is called as ``img, target = t(img, target)``; ``target`` may be ``None`` (inference on an
image alone), and then only the image is transformed. Until ``Normalize``, ``target['boxes']`` is (N, 4)
absolute xyxy in pixels of the current image; ``Normalize`` turns it into cxcywh normalised by the image
size, the format the model and the loss expect. ``target['masks']`` (N, H, W) bool, when present (panoptic
sets), follows the image: flipped, resized with nearest neighbour, cropped, and filtered with its boxes (DETR).
Geometry transforms work on PIL images; ``ToTensor`` comes after them.

Sizes and random draws are DETR's, so a seeded run sees what DETR sees: resized sides are truncated with
``int()`` (640x480 at 800/1333 becomes 1066x800), and the draws are DETR's calls in DETR's order (Python's
``random`` for the flip, the branch, the scale and the crop size; torchvision's ``RandomCrop.get_params``,
i.e. torch's generator, for the crop position). Python's ``random`` is seeded per epoch by main.py and per
DataLoader worker by PyTorch, so augmentation is reproducible and a resumed run is exact.
"""
import random

import torch
import torch.nn.functional as F_nn
import torchvision.transforms as TV
import torchvision.transforms.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-box fields that must be filtered together with the boxes.
_PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd", "masks")


def _keep_boxes(target: dict, keep: torch.Tensor) -> dict:
    for field in _PER_BOX_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return target


def hflip(img, target):
    """Mirror the image left-right; x1' = w - x2, x2' = w - x1."""
    w, _ = img.size
    img = F.hflip(img)
    if target is None:
        return img, None
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = torch.stack(
            [w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return img, target


def resized_size(image_size, size, max_size=None):
    """DETR's output (h, w) for an image of ``image_size`` = (w, h): the shorter side becomes ``size`` and the
    other ``int(size * long / short)`` (truncated, as DETR); if that longer side would pass ``max_size``, the
    shorter side becomes ``int(round(max_size * short / long))`` instead. A shorter side already at ``size``
    keeps the image as it is. ``size`` may also be an explicit (w, h)."""
    if isinstance(size, (list, tuple)):
        return int(size[1]), int(size[0])
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(img, target, size, max_size=None):
    """Resize to ``resized_size(img.size, size, max_size)``; boxes and area scale with the side ratios."""
    new_h, new_w = resized_size(img.size, size, max_size)
    w, h = img.size
    img = F.resize(img, [new_h, new_w])
    if target is None:
        return img, None
    ratio_w, ratio_h = new_w / w, new_h / h
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    if "masks" in target:
        masks = target["masks"][:, None].float()  # (N, 1, H, W)
        target["masks"] = F_nn.interpolate(masks, size=(new_h, new_w), mode="nearest")[:, 0] > 0.5
    target["size"] = torch.tensor([new_h, new_w])
    return img, target


def crop(img, target, top: int, left: int, height: int, width: int):
    """Crop a region; boxes are shifted and clipped to it, and boxes left with
    zero width or height are dropped with their labels/area/iscrowd/masks."""
    img = F.crop(img, top, left, height, width)
    if target is None:
        return img, None
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "masks" in target:  # F.crop zero-pads a region that leaves the image, as it does the image
        target["masks"] = F.crop(target["masks"], top, left, height, width)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target["boxes"] = boxes
        # Clipping changes the visible extent, so area is the clipped box's.
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = _keep_boxes(target, keep)
    return img, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return hflip(img, target)
        return img, target


class RandomResize:
    """Shorter side to a size drawn uniformly from ``sizes``; longer side capped."""

    def __init__(self, sizes, max_size: int | None = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, img, target):
        return resize(img, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region, width and height drawn from [min_size, max_size] (capped by the image), position
    from torchvision's ``RandomCrop.get_params``. DETR raises on an image narrower than ``min_size``; here the
    range then starts at the image's side instead (same draws otherwise)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, img, target):
        w = random.randint(min(self.min_size, img.width), min(img.width, self.max_size))
        h = random.randint(min(self.min_size, img.height), min(img.height, self.max_size))
        top, left, height, width = TV.RandomCrop.get_params(img, [h, w])
        return crop(img, target, top, left, height, width)


class CenterCrop:
    """Crop ``size`` = (h, w) around the centre; the offsets are rounded (DETR's)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, target):
        height, width = self.size
        top = int(round((img.height - height) / 2.0))
        left = int(round((img.width - width) / 2.0))
        return crop(img, target, top, left, height, width)


class RandomSelect:
    """Apply ``a`` with probability ``p``, otherwise ``b``."""

    def __init__(self, a, b, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, img, target):
        if random.random() < self.p:
            return self.a(img, target)
        return self.b(img, target)


class ToTensor:
    def __call__(self, img, target):
        return F.to_tensor(img), target


class Normalize:
    """ImageNet mean/std on the image; boxes xyxy-absolute -> cxcywh in [0, 1]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img, target):
        img = F.normalize(img, mean=self.mean, std=self.std)
        if target is None:
            return img, None
        target = target.copy()
        h, w = img.shape[-2:]
        if "boxes" in target:
            x1, y1, x2, y2 = target["boxes"].unbind(-1)
            cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
            target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        return img, target


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img, target):
        for t in self.transforms:
            img, target = t(img, target)
        return img, target

    def __repr__(self):
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


# DETR's COCO numbers: shorter side 480..800 (step 32), longer side <= 1333,
# and for the crop branch a pre-resize to 400/500/600 then a 384..600 crop.
COCO_SCALES = tuple(range(480, 801, 32))
COCO_MAX_SIZE = 1333
COCO_CROP_SIZES = (400, 500, 600)
COCO_CROP_RANGE = (384, 600)


def scaled_coco_transform_params(image_size: int) -> dict:
    """DETR's COCO numbers scaled by ``image_size / 800`` (800 = largest COCO
    scale), so small synthetic images keep the same augmentation geometry."""
    f = image_size / COCO_SCALES[-1]
    return dict(
        scales=sorted({round(s * f) for s in COCO_SCALES}),
        max_size=round(COCO_MAX_SIZE * f),
        crop_sizes=sorted({round(s * f) for s in COCO_CROP_SIZES}),
        crop_range=(round(COCO_CROP_RANGE[0] * f), round(COCO_CROP_RANGE[1] * f)),
    )


def make_coco_transforms(image_set: str, scales=COCO_SCALES, max_size: int = COCO_MAX_SIZE,
                         crop_sizes=COCO_CROP_SIZES, crop_range=COCO_CROP_RANGE) -> Compose:
    """DETR's train/val pipelines. ``image_set`` is 'train' or 'val'."""
    normalize = Compose([ToTensor(), Normalize()])
    if image_set == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize(crop_sizes),
                    RandomSizeCrop(*crop_range),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([scales[-1]], max_size=max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
