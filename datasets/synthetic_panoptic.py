"""A small, seeded panoptic segmentation set, written as real COCO panoptic in DETR's layout
(``--dataset_file synthetic --masks``, or ``--dataset_file synthetic_panoptic`` for box training on it).

Each image is split into 2-3 stuff regions by slanted horizontal boundaries (categories 5-7: wall, floor, sky,
each in its own noisy colour), with a 1-pixel VOID seam (id 0, unlabelled, as COCO's unlabelled pixels) along
each boundary; on top of them lie the detection set's shapes (datasets/synthetic.py's sampling and drawing:
things, categories 1-4). Layout under ``<root>/<name>/``, usable as both ``--coco_path`` and
``--coco_panoptic_path``:

    train2017/*.jpg  val2017/*.jpg                      images
    panoptic_{train,val}2017/*.png                      segment ids, id = R + 256 G + 256^2 B
    annotations/panoptic_{train,val}2017.json           segments_info per image, categories with 'isthing'
    annotations/instances_{train,val}2017.json          the things with RLE masks (box and mask AP)

Segment ids are category_id * ID_STRIDE + k, so they use all three PNG channels and the decoding is exercised.
Generation is deterministic per (seed, split, image index) and cached like the detection set (same atomic
write, same root; delete the folder to regenerate).
"""
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from .coco_panoptic import id2rgb
from .synthetic import (CATEGORIES, DEFAULT_IMAGE_SIZE, DEFAULT_ROOT, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE,
                        JPEG_QUALITY, _draw_shape, check_sizes, generate_once, sample_objects)

# Bump when the generator's output changes, so old caches are not reused.
FORMAT_VERSION = 1
# (category id, name, RGB); ids follow the shapes' 1-4, colours stay apart from theirs
STUFF = (
    (5, "wall", (120, 120, 120)),
    (6, "floor", (150, 105, 70)),
    (7, "sky", (170, 190, 210)),
)
MAX_THING_ID = max(cat_id for cat_id, _, _ in CATEGORIES)
ID_STRIDE = 50_000
MIN_REGIONS, MAX_REGIONS = 2, 3
BOUNDARY_JITTER = 0.1  # boundary offsets vary by this fraction of the image side
MAX_SLOPE = 0.3
SEAM_HALF_WIDTH = 0.5  # pixels whose centre lies this close to a boundary are VOID
_SPLIT_KEYS = {"train": 0, "val": 1}
_PANOPTIC_STREAM = 1  # keeps these images' random draws apart from the detection set's


def dataset_name(seed: int, train_size: int, val_size: int, image_size: int) -> str:
    return f"panoptic-v{FORMAT_VERSION}-seed{seed}-train{train_size}-val{val_size}-px{image_size}"


def _stuff_regions(rng: np.random.Generator, s: int):
    """(s, s) region index (0 at the top), (s, s) seam mask and the stuff category of each region."""
    regions = int(rng.integers(MIN_REGIONS, MAX_REGIONS + 1))
    offsets = [s * (i / regions + rng.uniform(-BOUNDARY_JITTER, BOUNDARY_JITTER)) for i in range(1, regions)]
    slopes = rng.uniform(-MAX_SLOPE, MAX_SLOPE, size=regions - 1)
    categories = [STUFF[int(k)] for k in rng.permutation(len(STUFF))[:regions]]
    y, x = np.mgrid[0:s, 0:s] + 0.5  # pixel centres
    region = np.zeros((s, s), dtype=np.int64)
    seam = np.zeros((s, s), dtype=bool)
    for offset, slope in zip(offsets, slopes):
        line = offset + slope * (x - s / 2)
        region += y > line
        seam |= np.abs(y - line) < SEAM_HALF_WIDTH
    return region, seam, categories


def render_panoptic(rng: np.random.Generator, image_size: int):
    """One image, its (s, s) segment id map and its segments as (segment id, category id, isthing)."""
    s = image_size
    region, seam, stuff = _stuff_regions(rng, s)
    jitter = rng.uniform(-15, 15, size=(len(stuff), 3))
    colours = np.array([c for _, _, c in stuff], dtype=np.float64) + jitter  # (regions, 3)
    pixels = colours[region] + rng.normal(0.0, 6.0, size=(s, s, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    ids = np.array([cat_id * ID_STRIDE for cat_id, _, _ in stuff], dtype=np.int64)[region]
    ids[seam] = 0
    draw = ImageDraw.Draw(img)
    things = []
    for k, (cat_id, name, box, fill) in enumerate(sample_objects(rng, s), start=1):
        _draw_shape(draw, name, *box, fill)
        shape = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(shape), name, *box, 255)  # the same rasterisation as the picture
        ids[np.asarray(shape) > 0] = cat_id * ID_STRIDE + k
        things.append((cat_id * ID_STRIDE + k, cat_id, True))
    present = set(np.unique(ids).tolist())
    segments = [(cat_id * ID_STRIDE, cat_id, False) for cat_id, _, _ in stuff if cat_id * ID_STRIDE in present]
    return img, ids, segments + things


def _bbox(mask: np.ndarray) -> list:
    """COCO [x, y, w, h] of a boolean mask (w and h count pixels)."""
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
            float(rows.max() - rows.min() + 1)]


def _write_split(out: Path, split: str, num_images: int, seed: int, image_size: int) -> None:
    img_dir, png_dir, ann_dir = out / f"{split}2017", out / f"panoptic_{split}2017", out / "annotations"
    for folder in (img_dir, png_dir, ann_dir):
        folder.mkdir(parents=True, exist_ok=True)
    images, panoptic, instances = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split], i, _PANOPTIC_STREAM])
        img, ids, segments = render_panoptic(rng, image_size)
        image_id = i + 1
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        (img_dir / f"{image_id:06d}.jpg").write_bytes(buf.getvalue())
        Image.fromarray(id2rgb(ids), "RGB").save(png_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": image_size,
                       "height": image_size})
        segments_info = []
        for segment_id, cat_id, isthing in segments:
            mask = ids == segment_id
            info = {"id": segment_id, "category_id": cat_id, "iscrowd": 0, "bbox": _bbox(mask),
                    "area": int(mask.sum())}
            segments_info.append(info)
            if isthing:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": cat_id,
                                  "segmentation": rle, "bbox": info["bbox"], "area": float(info["area"]),
                                  "iscrowd": 0})
        panoptic.append({"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": segments_info})
    things = [{"id": cat_id, "name": name, "supercategory": "shape", "isthing": 1, "color": list(colour)}
              for cat_id, name, colour in CATEGORIES]
    stuff = [{"id": cat_id, "name": name, "supercategory": "background", "isthing": 0, "color": list(colour)}
             for cat_id, name, colour in STUFF]
    with open(ann_dir / f"panoptic_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": things + stuff}, f)
    with open(ann_dir / f"instances_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": instances, "categories": things}, f)


def ensure_synthetic_panoptic(root=DEFAULT_ROOT, seed: int = 42, train_size: int = DEFAULT_TRAIN_SIZE,
                              val_size: int = DEFAULT_VAL_SIZE, image_size: int = DEFAULT_IMAGE_SIZE) -> Path:
    """Path of the generated panoptic set, generating it first if it is not there."""
    check_sizes(train_size, val_size, image_size)

    def write(tmp: Path) -> None:
        _write_split(tmp, "train", train_size, seed, image_size)
        _write_split(tmp, "val", val_size, seed, image_size)

    return generate_once(root, dataset_name(seed, train_size, val_size, image_size), write)


__all__ = ["ensure_synthetic_panoptic", "render_panoptic", "dataset_name", "STUFF", "MAX_THING_ID", "ID_STRIDE"]
