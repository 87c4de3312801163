"""A small, seeded detection dataset of coloured shapes, written as real COCO.

Layout under ``<root>/<name>/`` (``name`` encodes every parameter, so settings
never collide): ``train2017/*.jpg``, ``val2017/*.jpg``,
``annotations/instances_{train,val}2017.json``. The JSON deliberately has no
'info' key, so the evaluator's handling of such files is always exercised.

With ``fmt="voc"`` the same images and objects are written in Pascal VOC's layout instead, under
``<root>/<name>-voc/`` (a VOCdevkit folder): ``VOCshapes/JPEGImages/{train,val}NNNNNN.jpg`` (the same JPEG
bytes), ``VOCshapes/Annotations/*.xml`` (1-based inclusive corners, nothing difficult or truncated) and
``VOCshapes/ImageSets/Main/{train,val}.txt``, read by ``datasets.voc`` as the sets ``shapes-train`` and
``shapes-val`` with the class names of ``CATEGORIES``.

It is built for fast learning on a CPU: four categories, each one shape in
one distinct colour, 1-3 non-overlapping objects of 20-50% of the image side
on a plain, mildly noisy grey background. Reading goes through the ordinary
``CocoDetection`` loader and ``CocoEvaluator``.

``preset="multiscale"`` (main.py: ``--synthetic_preset multiscale``, docs/multiscale-smca.md) is a set where scale
matters: every image holds one large object (50-70% of the side) and 2-4 small squares-bounded shapes (2-3% of
the side), so sizes span at least 16x in every image. It needs images of at least 64 px (256 px draws the small
objects at 5-8 px) and is cached under its own name.

Generation happens on first use into a private temporary folder that is then
renamed into place; a rename is atomic, so a half-written folder is never
visible, an interrupted run is simply redone, and ranks racing to generate
the same folder all end up reading one complete copy.
"""
import io
import json
import os
import shutil
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from util.errors import UserError

# Bump when the generator's output changes, so old caches are not reused.
FORMAT_VERSION = 1
DEFAULT_ROOT = "~/.cache/smca_detr/synthetic"
DEFAULT_TRAIN_SIZE = 512
DEFAULT_VAL_SIZE = 64
DEFAULT_IMAGE_SIZE = 128

# (COCO category id, name, RGB): colour alone separates the classes, so the
# model's effort goes into localisation.
CATEGORIES = (
    (1, "square", (220, 40, 40)),
    (2, "circle", (40, 180, 60)),
    (3, "triangle", (40, 80, 230)),
    (4, "diamond", (240, 200, 30)),
)
# Fraction of the bounding box each shape covers (COCO 'area' is the shape's).
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}
MIN_SIDE, MAX_SIDE = 0.2, 0.5  # object side as a fraction of the image side
MAX_OBJECTS = 3
JPEG_QUALITY = 95
_SPLIT_KEYS = {"train": 0, "val": 1}
_STALE_TMP_SECONDS = 3600


# --synthetic_preset multiscale: side fractions of the one large and the 2-4 small objects of every image;
# LARGE_SIDE[0] / SMALL_SIDE[1] >= MIN_SIZE_SPAN (after rounding to pixels too, from MIN_MULTISCALE_IMAGE_SIZE on)
LARGE_SIDE, SMALL_SIDE = (0.5, 0.7), (0.02, 0.03)
SMALL_OBJECTS = (2, 4)
MIN_SIZE_SPAN = 16
MIN_MULTISCALE_IMAGE_SIZE = 64
PRESETS = ("default", "multiscale")


def dataset_name(seed: int, train_size: int, val_size: int, image_size: int, preset: str = "default") -> str:
    name = f"shapes-v{FORMAT_VERSION}-seed{seed}-train{train_size}-val{val_size}-px{image_size}"
    return name if preset == "default" else f"{name}-{preset}"


def _boxes_overlap(a, b) -> bool:
    """Boxes as (x, y, w, h) in pixels; touching edges do not count."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, x: int, y: int, w: int, h: int, color) -> None:
    # Pixel (i, j) covers [i, i+1); PIL's coordinates are inclusive pixel
    # indices, so a shape spanning w pixels ends at x + w - 1.
    x1, y1 = x + w - 1, y + h - 1
    xc, yc = x + (w - 1) / 2, y + (h - 1) / 2
    if name == "square":
        draw.rectangle([x, y, x1, y1], fill=color)
    elif name == "circle":
        draw.ellipse([x, y, x1, y1], fill=color)
    elif name == "triangle":
        draw.polygon([(x, y1), (x1, y1), (xc, y)], fill=color)
    elif name == "diamond":
        draw.polygon([(xc, y), (x1, yc), (xc, y1), (x, yc)], fill=color)
    else:
        raise ValueError(f"unknown shape {name!r}")


def sample_objects(rng: np.random.Generator, image_size: int):
    """1-MAX_OBJECTS non-overlapping shapes as (category_id, name, [x, y, w, h], fill RGB); an object that finds
    no free spot in 50 draws is skipped."""
    s = image_size
    objects = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cat_id, name, color = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        side = int(round(rng.uniform(MIN_SIDE, MAX_SIDE) * s))
        # Squares and circles stay round; the others get a mild aspect change.
        aspect = 1.0 if name in ("square", "circle") else float(rng.uniform(0.8, 1.25))
        w = max(2, min(s, int(round(side * aspect))))
        h = max(2, min(s, side))
        # Rejection sampling for a free spot; an object that does not fit is skipped.
        for _try in range(50):
            box = [int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1)), w, h]
            if not any(_boxes_overlap(box, o[2]) for o in objects):
                break
        else:
            continue
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(color) + jitter, 0, 255))
        objects.append((cat_id, name, box, fill))
    return objects


def _place(rng: np.random.Generator, image_size: int, objects: list, side: int, tries: int = 50):
    """A random free square box [x, y, side, side] for ``objects``, or None after ``tries`` draws."""
    for _try in range(tries):
        box = [int(rng.integers(0, image_size - side + 1)), int(rng.integers(0, image_size - side + 1)), side, side]
        if not any(_boxes_overlap(box, o[2]) for o in objects):
            return box
    return None


def sample_objects_multiscale(rng: np.random.Generator, image_size: int):
    """The multiscale preset: one large shape, then 2-4 small ones on free spots (a small one that finds none in
    50 draws is skipped, but never the first: the image's span of sizes is the preset's point). Same tuples as
    ``sample_objects``."""
    s = image_size
    sides = [int(round(rng.uniform(*LARGE_SIDE) * s))]
    sides += [max(2, int(round(rng.uniform(*SMALL_SIDE) * s)))
              for _ in range(int(rng.integers(SMALL_OBJECTS[0], SMALL_OBJECTS[1] + 1)))]
    objects = []
    for index, side in enumerate(sides):
        box = _place(rng, s, objects, side, tries=50 if index > 1 else 10_000)
        if box is None:
            continue
        cat_id, name, color = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        jitter = rng.integers(-20, 21, size=3)
        objects.append((cat_id, name, box, tuple(int(c) for c in np.clip(np.array(color) + jitter, 0, 255))))
    return objects


SAMPLERS = {"default": sample_objects, "multiscale": sample_objects_multiscale}


def render_image(rng: np.random.Generator, image_size: int, preset: str = "default"):
    """One image and its objects as (category_id, [x, y, w, h], area)."""
    s = image_size
    base = rng.uniform(100, 160) + rng.uniform(-15, 15, size=3)
    pixels = base + rng.normal(0.0, 6.0, size=(s, s, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    objects = []
    for cat_id, name, box, fill in SAMPLERS[preset](rng, s):
        _draw_shape(draw, name, *box, fill)
        objects.append((cat_id, box, float(box[2] * box[3] * _FILL[name])))
    return img, objects


def _write_split(out: Path, split: str, num_images: int, seed: int, image_size: int, preset: str) -> None:
    img_dir = out / f"{split}2017"
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        # One generator per image: image i never depends on how many came before.
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split], i])
        img, objects = render_image(rng, image_size, preset)
        image_id = i + 1
        file_name = f"{image_id:06d}.jpg"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        (img_dir / file_name).write_bytes(buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size})
        for cat_id, box, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_id, "bbox": [float(v) for v in box],
                                "area": area, "iscrowd": 0})
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES]
    ann_dir = out / "annotations"
    ann_dir.mkdir(exist_ok=True)
    with open(ann_dir / f"instances_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


VOC_YEAR = "shapes"  # the VOCdevkit folder VOC<year> of the VOC layout


def _voc_xml(file_name: str, image_size: int, objects) -> bytes:
    names = {cid: name for cid, name, _ in CATEGORIES}
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{VOC_YEAR}"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", image_size), ("height", image_size), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for cat_id, (x, y, w, h), _area in objects:
        obj = ET.SubElement(root, "object")
        for tag, value in (("name", names[cat_id]), ("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
            ET.SubElement(obj, tag).text = str(value)
        box = ET.SubElement(obj, "bndbox")
        # VOC corners are 1-based and inclusive: pixels x .. x + w - 1 are columns x + 1 .. x + w
        for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_split_voc(out: Path, split: str, num_images: int, seed: int, image_size: int, preset: str) -> None:
    year_dir = out / f"VOC{VOC_YEAR}"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year_dir / folder).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split], i])  # as the COCO layout: the same images
        img, objects = render_image(rng, image_size, preset)
        stem = f"{split}{i + 1:06d}"  # both splits share JPEGImages/
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        (year_dir / "JPEGImages" / f"{stem}.jpg").write_bytes(buf.getvalue())
        (year_dir / "Annotations" / f"{stem}.xml").write_bytes(_voc_xml(f"{stem}.jpg", image_size, objects))
        stems.append(stem)
    (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))


_WRITERS = {"coco": _write_split, "voc": _write_split_voc}


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Leftovers of interrupted generations; old enough that no live process owns them."""
    for tmp in root.glob(f".{name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def ensure_synthetic(root=DEFAULT_ROOT, seed: int = 42, train_size: int = DEFAULT_TRAIN_SIZE,
                     val_size: int = DEFAULT_VAL_SIZE, image_size: int = DEFAULT_IMAGE_SIZE,
                     fmt: str = "coco", preset: str = "default") -> Path:
    """Path of the generated dataset in layout ``fmt`` ('coco' or 'voc') and ``preset`` (PRESETS), generating it
    first if it is not there."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown synthetic format {fmt!r}; expected one of {sorted(_WRITERS)}")
    if preset not in SAMPLERS:
        raise ValueError(f"unknown synthetic preset {preset!r}; expected one of {PRESETS}")
    check_sizes(train_size, val_size, image_size)
    if preset == "multiscale" and image_size < MIN_MULTISCALE_IMAGE_SIZE:
        raise UserError(f"--synthetic_preset multiscale needs --synthetic_image_size >= {MIN_MULTISCALE_IMAGE_SIZE} "
                        f"(its small objects are 2-3% of the side), got {image_size}")

    def write(tmp: Path) -> None:
        _WRITERS[fmt](tmp, "train", train_size, seed, image_size, preset)
        _WRITERS[fmt](tmp, "val", val_size, seed, image_size, preset)

    name = dataset_name(seed, train_size, val_size, image_size, preset) + ("-voc" if fmt == "voc" else "")
    return generate_once(root, name, write)


def check_sizes(train_size: int, val_size: int, image_size: int) -> None:
    for flag, value, low in (("--synthetic_train_size", train_size, 1),
                             ("--synthetic_val_size", val_size, 1),
                             ("--synthetic_image_size", image_size, 16)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")


def generate_once(root, name: str, write) -> Path:
    """``root/name``, made first by ``write(folder)`` into a private folder renamed into place (see the module
    docstring) if it is not there yet."""
    root = Path(root).expanduser()
    final = root / name
    if final.is_dir():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot create the synthetic dataset cache under {root} ({e}); "
                        f"pass a writable --synthetic_root") from e
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first; theirs is complete and identical.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_tmp(root, name)
    return final
