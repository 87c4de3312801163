"""The training and evaluation transforms against a plain re-implementation of DETR's formulas, written here from
DETR's published recipe: same random calls in the same order (Python's random for flip, branch, scale and crop
size; torch for the crop position, as torchvision's RandomCrop.get_params), integer-truncated sizes, boxes
shifted/clipped/scaled, degenerate boxes dropped, areas scaled or recomputed. Both run on real PIL images of every
size in the grid, seeded the same, and must give the same output sizes, boxes, areas and labels."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import transforms as T

# (w, h) of the images: COCO's common shapes, a square, and an extreme aspect ratio
GRID = [(640, 480), (480, 640), (640, 427), (500, 375), (333, 500), (612, 612), (1, 1000)]
SCALES, MAX_SIZE = list(range(480, 801, 32)), 1333
CROP_SIZES, CROP_MIN, CROP_MAX = [400, 500, 600], 384, 600


def detr_size(w, h, size, max_size=None):
    """DETR's get_size_with_aspect_ratio, from its formulas: (h, w) after resizing."""
    if max_size is not None:
        mn, mx = float(min(w, h)), float(max(w, h))
        if mx / mn * size > max_size:
            size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class Plain:
    """The image as a size (w, h) and boxes/areas/labels as Python lists (float64), moved through DETR's steps."""

    def __init__(self, w, h, boxes, areas, labels):
        self.w, self.h = w, h
        self.boxes, self.areas, self.labels = boxes, areas, labels

    def flip(self):
        self.boxes = [[self.w - x2, y1, self.w - x1, y2] for x1, y1, x2, y2 in self.boxes]

    def resize(self, size, max_size=None):
        new_h, new_w = detr_size(self.w, self.h, size, max_size)
        rw, rh = new_w / self.w, new_h / self.h
        self.boxes = [[x1 * rw, y1 * rh, x2 * rw, y2 * rh] for x1, y1, x2, y2 in self.boxes]
        self.areas = [a * rw * rh for a in self.areas]
        self.w, self.h = new_w, new_h

    def crop(self, top, left, height, width):
        kept = []
        for (x1, y1, x2, y2), label in zip(self.boxes, self.labels):
            b = [min(max(x1 - left, 0), width), min(max(y1 - top, 0), height),
                 min(max(x2 - left, 0), width), min(max(y2 - top, 0), height)]
            if b[2] > b[0] and b[3] > b[1]:
                kept.append((b, (b[2] - b[0]) * (b[3] - b[1]), label))
        self.boxes = [b for b, _, _ in kept]
        self.areas = [a for _, a, _ in kept]
        self.labels = [label for _, _, label in kept]
        self.w, self.h = width, height

    def random_size_crop(self):
        cw = random.randint(CROP_MIN, min(self.w, CROP_MAX))
        ch = random.randint(CROP_MIN, min(self.h, CROP_MAX))
        if (cw, ch) == (self.w, self.h):  # torchvision draws no position for a full-image crop
            top = left = 0
        else:
            top = int(torch.randint(0, self.h - ch + 1, size=(1,)).item())
            left = int(torch.randint(0, self.w - cw + 1, size=(1,)).item())
        self.crop(top, left, ch, cw)

    def normalized(self):
        return [[(x1 + x2) / 2 / self.w, (y1 + y2) / 2 / self.h, (x2 - x1) / self.w, (y2 - y1) / self.h]
                for x1, y1, x2, y2 in self.boxes]


def detr_train(plain):
    """DETR's COCO training recipe, step by step."""
    if random.random() < 0.5:
        plain.flip()
    if random.random() < 0.5:
        plain.resize(random.choice(SCALES), MAX_SIZE)
    else:
        plain.resize(random.choice(CROP_SIZES))
        plain.random_size_crop()
        plain.resize(random.choice(SCALES), MAX_SIZE)
    return plain


def sample(w, h):
    """A real image of size (w, h) and three boxes in it (absolute xyxy), one of them small and off-centre."""
    rng = np.random.default_rng(w * 10007 + h)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    boxes = [[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h], [0.0, 0.0, 0.3 * w, 0.25 * h], [0.8 * w, 0.6 * h, w, h]]
    boxes = [[float(np.float32(v)) for v in b] for b in boxes]  # the values the float32 target holds
    areas = [(b[2] - b[0]) * (b[3] - b[1]) * 0.9 for b in boxes]  # an object's area is not its box's
    target = {"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 2, 3]),
              "area": torch.tensor(areas), "iscrowd": torch.zeros(3, dtype=torch.int64),
              "size": torch.tensor([h, w])}
    return img, target, Plain(w, h, boxes, [float(np.float32(a)) for a in areas], [1, 2, 3])


def seed(value):
    random.seed(value)
    torch.manual_seed(value)


@pytest.mark.parametrize("w,h", GRID)
def test_validation_resize_is_detr_truncation(w, h):
    img, target, plain = sample(w, h)
    out, got = T.make_coco_transforms("val")(img, target)
    plain.resize(800, MAX_SIZE)
    assert tuple(out.shape[-2:]) == (plain.h, plain.w) == detr_size(w, h, 800, MAX_SIZE)
    assert got["size"].tolist() == [plain.h, plain.w]
    torch.testing.assert_close(got["boxes"], torch.tensor(plain.normalized(), dtype=torch.float32),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["area"], torch.tensor(plain.areas, dtype=torch.float32), rtol=1e-6, atol=0)


@pytest.mark.quick
def test_resize_sizes_of_the_grid():
    """The table in the closing note: 640x480 -> 1066x800 (DETR truncates; rounding would give 1067)."""
    sizes = {(w, h): T.resized_size((w, h), 800, MAX_SIZE) for w, h in GRID}
    assert sizes == {(640, 480): (800, 1066), (480, 640): (1066, 800), (640, 427): (800, 1199),
                     (500, 375): (800, 1066), (333, 500): (1201, 800), (612, 612): (800, 800),
                     (1, 1000): (1000, 1)}


@pytest.mark.parametrize("w,h", [s for s in GRID if s != (1, 1000)])
def test_training_transforms_match_detr_for_the_same_draws(w, h):
    """Twelve seeds per size reach both branches and both flip states; every output matches DETR's steps."""
    train = T.make_coco_transforms("train")
    branches = set()
    for s in range(12):
        branches.add(_branch(s))
        img, target, plain = sample(w, h)
        seed(s)
        out, got = train(img, target)
        fork_state = (random.getstate(), torch.get_rng_state())
        seed(s)
        detr_train(plain)
        # both consumed exactly the same draws from both generators
        assert random.getstate() == fork_state[0] and torch.equal(torch.get_rng_state(), fork_state[1])
        assert tuple(out.shape[-2:]) == (plain.h, plain.w), s
        assert got["size"].tolist() == [plain.h, plain.w]
        assert got["labels"].tolist() == plain.labels
        torch.testing.assert_close(got["boxes"], torch.tensor(plain.normalized(), dtype=torch.float32).reshape(-1, 4),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["area"], torch.tensor(plain.areas, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-3)
    assert branches == {"flip+resize", "flip+crop", "resize", "crop"}


def _branch(s):
    """Which way seed ``s`` goes: DETR's first two draws are the flip and the branch."""
    random.seed(s)
    flip = random.random() < 0.5
    crop = random.random() >= 0.5
    return ("flip+" if flip else "") + ("crop" if crop else "resize")


def test_extreme_aspect_ratio_multiscale_branch():
    """1x1000: the max_size cap makes the target side round(1333 / 1000) = 1, already the short side, so DETR
    keeps the image at 1x1000 (rounding the scale instead would give 1x1333)."""
    train = T.make_coco_transforms("train")
    for s in range(40):
        random.seed(s)
        if random.random() < 0.5 or random.random() >= 0.5:
            continue  # the unflipped multi-scale branch only (the crop branch first blows 1x1000 up to 400x400000)
        img, target, plain = sample(1, 1000)
        seed(s)
        out, got = train(img, target)
        seed(s)
        detr_train(plain)
        assert tuple(out.shape[-2:]) == (plain.h, plain.w) == (1000, 1)
        torch.testing.assert_close(got["boxes"], torch.tensor(plain.normalized(), dtype=torch.float32),
                                   rtol=1e-6, atol=1e-7)
        return
    pytest.fail("no seed in range(40) took the multi-scale branch")


@pytest.mark.quick
def test_center_crop_rounds_offsets_and_clips_boxes():
    img, target, plain = sample(640, 427)
    out, got = T.CenterCrop((300, 451))(img, target)
    top, left = int(round((427 - 300) / 2.0)), int(round((640 - 451) / 2.0))
    assert (top, left) == (64, 94)
    plain.crop(top, left, 300, 451)
    assert out.size == (451, 300) and got["size"].tolist() == [300, 451]
    torch.testing.assert_close(got["boxes"], torch.tensor(plain.boxes, dtype=torch.float32), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got["area"], torch.tensor(plain.areas, dtype=torch.float32), rtol=1e-5, atol=1e-3)
    assert np.array_equal(np.asarray(out), np.asarray(img)[top:top + 300, left:left + 451])


def test_transforms_accept_an_image_without_target():
    img, _, _ = sample(640, 480)
    seed(0)
    out, target = T.make_coco_transforms("train")(img, None)
    assert target is None and out.shape[0] == 3
    out, target = T.make_coco_transforms("val")(img, None)
    assert target is None and tuple(out.shape[-2:]) == (800, 1066)


def test_synthetic_scaled_transforms_use_the_same_formulas():
    params = T.scaled_coco_transform_params(128)
    img, target, plain = sample(128, 96)
    out, got = T.make_coco_transforms("val", **params)(img, target)
    plain.resize(params["scales"][-1], params["max_size"])
    assert tuple(out.shape[-2:]) == (plain.h, plain.w) == (128, 170)  # int(128 * 128 / 96) = 170
    torch.testing.assert_close(got["boxes"], torch.tensor(plain.normalized(), dtype=torch.float32),
                               rtol=1e-6, atol=1e-7)
