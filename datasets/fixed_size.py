"""Fixed resolution (--fixed_size N or HxW): every image is resized, aspect kept, to fit one H x W canvas, and
every batch is padded to exactly that canvas (main.py's collate, util.misc.collate_fn with ``pad_to``).

DETR pads each batch to its largest image, so an image's features, and with DC5 its AP, depend on which
images share its batch. On one canvas, padding (still masked, as DETR's) is the same in every batch, so the
predictions for an image do not depend on the batch size or the batch's other images.

Training keeps DETR's recipe with its sizes expressed inside the canvas: DETR's multi-scale choice of the
shorter side (480..800, capped at 1333) becomes a choice of scale s / max(scales) (0.6..1) of the size that
fits the canvas, and the crop branch (resize to 400/500/600, crop 384..600) runs unchanged before it.
Evaluation fits the canvas at scale 1. Sizes are floored, so a resized image never exceeds the canvas.
"""
import random

from . import transforms as T


def fitted_size(height: int, width: int, canvas, num: int = 1, den: int = 1) -> tuple[int, int]:
    """(h, w) of an image scaled by (num / den) x the largest scale that fits it in ``canvas`` (H, W), with
    the aspect ratio kept; exact integer arithmetic, floored, at least 1 pixel."""
    canvas_h, canvas_w = canvas
    if canvas_h * width <= canvas_w * height:  # the height reaches the canvas first
        new_h, new_w = canvas_h * num // den, width * canvas_h * num // (height * den)
    else:
        new_h, new_w = height * canvas_w * num // (width * den), canvas_w * num // den
    return max(1, new_h), max(1, new_w)


class FitResize:
    """Resize to the largest size that fits the canvas (H, W), times a scale drawn from ``scales`` relative to
    their largest (Python's ``random``, as DETR's RandomResize); one scale: a fixed fit."""

    def __init__(self, canvas, scales=(1,)):
        self.canvas = tuple(canvas)
        self.scales = list(scales)
        self.largest = max(self.scales)

    def __call__(self, img, target):
        scale = self.scales[0] if len(self.scales) == 1 else random.choice(self.scales)
        w, h = img.size
        new_h, new_w = fitted_size(h, w, self.canvas, scale, self.largest)
        return T.resize(img, target, (new_w, new_h))  # an explicit (w, h): boxes and area scale as DETR's


def make_fixed_size_transforms(image_set: str, canvas, scales=T.COCO_SCALES, crop_sizes=T.COCO_CROP_SIZES,
                               crop_range=T.COCO_CROP_RANGE, max_size=None):
    """DETR's train/val pipelines inside one canvas (H, W). ``max_size`` (DETR's longer-side cap) is accepted so
    ``scaled_coco_transform_params`` can be passed through; the canvas replaces it."""
    normalize = T.Compose([T.ToTensor(), T.Normalize()])
    if image_set == "train":
        return T.Compose([
            T.RandomHorizontalFlip(),
            T.RandomSelect(
                FitResize(canvas, scales),
                T.Compose([
                    T.RandomResize(crop_sizes),
                    T.RandomSizeCrop(*crop_range),
                    FitResize(canvas, scales),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return T.Compose([FitResize(canvas), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")


__all__ = ["FitResize", "fitted_size", "make_fixed_size_transforms"]
