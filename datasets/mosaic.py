"""Mosaic augmentation (--mosaic P): with probability P a training sample is four images in a 2x2 mosaic.

The canvas is twice the first image's height and width, filled with the ImageNet mean colour (zero after
normalisation, like DETR's padding). A centre (xc, yc) is drawn uniformly from the middle half of the
canvas, and each image touches it with one corner, without rescaling::

    +------------+---------+      image 0 (the sample's own) ends at the centre: its bottom-right corner
    |   image 0  | image 1 |      image 1 starts at xc and ends at yc: its bottom-left corner
    |---------(xc,yc)------|      image 2 ends at xc and starts at yc: its top-right corner
    |   image 2  | image 3 |      image 3 starts at the centre: its top-left corner
    +------------+---------+

Whatever falls outside the canvas is cut; boxes are shifted by their image's offset and clipped to the
part of that image that is visible, boxes left without width or height are dropped, and every per-box field
(labels, area, iscrowd) follows its box. ``area`` is scaled by the visible fraction of its box. DETR's
augmentations then run on the mosaic as on any image, so after their resize objects appear at about half
their usual scale (Mosaic's usual shift towards small objects).

Random draws (use or not, the three other images, the centre) come from Python's ``random``, which
main.py seeds per epoch and DataLoader seeds per worker, as the rest of the pipeline: a resumed run draws
the same mosaics.
"""
import random

import torch
from PIL import Image

from .transforms import IMAGENET_MEAN

FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
_PER_BOX_FIELDS = ("boxes", "labels", "area", "iscrowd")


def mosaic_offsets(sizes, centre) -> list[tuple[int, int]]:
    """Top-left corner (x, y) of each of the four images, sizes [(w, h)] * 4, around ``centre`` (xc, yc)."""
    xc, yc = centre
    (w0, h0), (w1, h1), (w2, h2), _ = sizes
    return [(xc - w0, yc - h0), (xc, yc - h1), (xc - w2, yc), (xc, yc)]


def mosaic(samples, centre, canvas_size):
    """Four (PIL image, target with absolute xyxy boxes) -> one (image, target) of ``canvas_size`` (w, h).
    The target keeps the first sample's other fields (image_id); 'size' and 'orig_size' become the canvas's."""
    width, height = canvas_size
    canvas = Image.new("RGB", (width, height), FILL)
    offsets = mosaic_offsets([img.size for img, _ in samples], centre)
    parts = {name: [] for name in _PER_BOX_FIELDS}
    for (img, target), (ox, oy) in zip(samples, offsets):
        # the visible part of this image, in canvas coordinates
        x1, y1 = max(ox, 0), max(oy, 0)
        x2, y2 = min(ox + img.size[0], width), min(oy + img.size[1], height)
        if x2 <= x1 or y2 <= y1:
            continue
        canvas.paste(img.crop((x1 - ox, y1 - oy, x2 - ox, y2 - oy)), (x1, y1))
        boxes = target["boxes"].reshape(-1, 4) + torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        clipped = torch.stack([boxes[:, 0].clamp(x1, x2), boxes[:, 1].clamp(y1, y2),
                               boxes[:, 2].clamp(x1, x2), boxes[:, 3].clamp(y1, y2)], dim=1)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        parts["boxes"].append(clipped[keep])
        parts["labels"].append(target["labels"][keep])
        parts["area"].append((target["area"] * visible / full.clamp(min=1e-12))[keep])
        parts["iscrowd"].append(target["iscrowd"][keep])
    first = samples[0][1]
    out = {name: value for name, value in first.items() if name not in _PER_BOX_FIELDS}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64)}
    for name in _PER_BOX_FIELDS:
        out[name] = torch.cat(parts[name]) if parts[name] else empty[name]
    out["size"] = out["orig_size"] = torch.tensor([height, width])
    return canvas, out


class Mosaic(torch.utils.data.Dataset):
    """``dataset`` returns untransformed samples (PIL image, absolute xyxy target); with probability ``p`` an
    item is the mosaic of it and three random others, then ``transforms`` (DETR's) run on the result."""

    def __init__(self, dataset, transforms, p: float):
        self.dataset = dataset
        self.transforms = transforms
        self.p = p

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def coco(self):
        return self.dataset.coco

    @property
    def class_names(self):
        return self.dataset.class_names

    def __getitem__(self, idx: int):
        if random.random() < self.p:
            indices = [idx] + [random.randrange(len(self.dataset)) for _ in range(3)]
            samples = [self.dataset[i] for i in indices]
            w, h = samples[0][0].size
            centre = (random.randint(w // 2, w + w // 2), random.randint(h // 2, h + h // 2))
            img, target = mosaic(samples, centre, (2 * w, 2 * h))
        else:
            img, target = self.dataset[idx]
        return self.transforms(img, target) if self.transforms is not None else (img, target)


__all__ = ["Mosaic", "mosaic", "mosaic_offsets", "FILL"]
