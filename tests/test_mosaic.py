"""Mosaic (--mosaic P): box bookkeeping and pixels against a plain computation, seeding, exact resume."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import main
from datasets.coco import CocoDetection
from datasets.mosaic import FILL, Mosaic, mosaic
from datasets.synthetic import ensure_synthetic
from util.misc import collate_fn

# one intra-op thread: tiny models on a loaded 2-core machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

SIZES = [(40, 30), (50, 20), (24, 36), (60, 44)]   # (w, h) of the four images
CENTRE = (35, 25)
CANVAS = (80, 60)                                   # twice the first image


def _sample(k, w, h):
    """A solid image (colour by k) with boxes: inside, cut by the canvas edge, entirely cut, and a crowd one."""
    img = Image.new("RGB", (w, h), (40 * k + 10, 200 - 30 * k, 17 * k))
    boxes = [[2.0, 3.0, 12.0, 13.0], [w - 6.0, h - 5.0, w - 1.0, h - 0.5], [0.0, 0.0, 4.0, 4.0],
             [1.5, 2.5, w - 1.0, h - 2.0]]
    n = len(boxes)
    target = {"boxes": torch.tensor(boxes), "labels": torch.arange(n) + 10 * k,
              "area": torch.tensor([50.0 + k, 40.0, 16.0, 30.0]), "iscrowd": torch.tensor([0, 0, 0, 1]),
              "image_id": torch.tensor([100 + k]), "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    return img, target


@pytest.mark.quick
def test_mosaic_boxes_and_pixels_match_a_plain_computation():
    samples = [_sample(k, w, h) for k, (w, h) in enumerate(SIZES)]
    img, target = mosaic(samples, CENTRE, CANVAS)

    # plain computation: where each image's top-left corner goes, what of it is on the canvas
    xc, yc = CENTRE
    W, H = CANVAS
    corners = [(xc - SIZES[0][0], yc - SIZES[0][1]), (xc, yc - SIZES[1][1]), (xc - SIZES[2][0], yc), (xc, yc)]
    expected = {"boxes": [], "labels": [], "area": [], "iscrowd": []}
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[:, :] = FILL
    for (image, t), (w, h), (ox, oy) in zip(samples, SIZES, corners):
        left, top, right, bottom = max(ox, 0), max(oy, 0), min(ox + w, W), min(oy + h, H)
        src = np.asarray(image)
        for y in range(top, bottom):
            for x in range(left, right):
                pixels[y, x] = src[y - oy, x - ox]
        for box, label, area, crowd in zip(t["boxes"].tolist(), t["labels"].tolist(), t["area"].tolist(),
                                           t["iscrowd"].tolist()):
            x1, y1, x2, y2 = box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy
            c = [min(max(x1, left), right), min(max(y1, top), bottom), min(max(x2, left), right),
                 min(max(y2, top), bottom)]
            if c[2] > c[0] and c[3] > c[1]:
                expected["boxes"].append(c)
                expected["labels"].append(label)
                expected["area"].append(area * (c[2] - c[0]) * (c[3] - c[1]) / ((x2 - x1) * (y2 - y1)))
                expected["iscrowd"].append(crowd)

    assert img.size == CANVAS and np.array_equal(np.asarray(img), pixels)
    torch.testing.assert_close(target["boxes"], torch.tensor(expected["boxes"]), rtol=0, atol=1e-5)
    assert target["labels"].tolist() == expected["labels"]
    torch.testing.assert_close(target["area"], torch.tensor(expected["area"]), rtol=1e-6, atol=1e-4)
    assert target["iscrowd"].tolist() == expected["iscrowd"]
    # the bookkeeping did something: image 0's box in its top-left corner and image 3's box in its
    # bottom-right corner fall off the canvas, a box of image 1 is cut to 1 pixel, crowd flags survive
    labels = target["labels"].tolist()
    assert 2 not in labels and 31 not in labels and 0 in labels and 12 in labels and 11 in labels
    assert target["boxes"][labels.index(11)].tolist() == [79.0, 20.0, 80.0, 24.5]
    assert target["iscrowd"].sum() == 4
    assert target["image_id"].tolist() == [100]
    assert target["size"].tolist() == target["orig_size"].tolist() == [H, W]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=1, train_size=12, val_size=4,
                            image_size=48)


def _raw(synth):
    return CocoDetection(synth / "train2017", synth / "annotations/instances_train2017.json")


def test_mosaic_dataset_is_seeded_by_python_random(synth):
    ds = Mosaic(_raw(synth), transforms=None, p=1.0)
    random.seed(3)
    img, target = ds[5]
    assert img.size == (96, 96) and target["image_id"].tolist() == [ds.dataset.ids[5]]
    random.seed(3)
    again, target_again = ds[5]
    assert np.array_equal(np.asarray(img), np.asarray(again))
    assert torch.equal(target["boxes"], target_again["boxes"])
    # other draws give other mosaics; p=0 gives the plain item
    assert any(not np.array_equal(np.asarray(img), np.asarray(ds[5][0])) for _ in range(5))
    plain = Mosaic(ds.dataset, transforms=None, p=0.0)[5]
    assert np.array_equal(np.asarray(plain[0]), np.asarray(ds.dataset[5][0]))


def _batches(dataset, seed, workers=2):
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_fn)
    return [(b[0].tensors.clone(), [t["boxes"] for t in b[1]]) for b in loader]


def test_mosaic_in_dataloader_workers_follows_the_torch_seed(synth):
    """DataLoader seeds Python's random in each worker from torch's generator, which main.py seeds per epoch."""
    import datasets.transforms as T

    ds = Mosaic(_raw(synth), T.make_coco_transforms("train", **T.scaled_coco_transform_params(48)), p=0.5)
    a, b, c = _batches(ds, 0), _batches(ds, 0), _batches(ds, 1)
    assert all(torch.equal(x[0], y[0]) and all(torch.equal(p, q) for p, q in zip(x[1], y[1])) for x, y in zip(a, b))
    assert any(x[0].shape != y[0].shape or not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_resume_with_mosaic_is_exact(tmp_path):
    """2 epochs straight == 1 epoch + resume, with mosaics drawn in a DataLoader worker: bitwise equal weights."""
    common = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward",
              "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4", "--num_queries", "6",
              "--batch_size", "2", "--synthetic_root", str(tmp_path / "synthetic"), "--synthetic_train_size", "8",
              "--synthetic_val_size", "2", "--synthetic_image_size", "48", "--device", "cpu", "--num_workers", "1",
              "--max_iters_per_epoch", "2", "--eval_every", "100", "--mosaic", "0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main.cli([*common, "--epochs", "2", "--output_dir", str(straight)]) == 0
    assert main.cli([*common, "--epochs", "1", "--output_dir", str(split)]) == 0
    assert main.cli([*common, "--epochs", "2", "--output_dir", str(split), "--resume", "auto"]) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
