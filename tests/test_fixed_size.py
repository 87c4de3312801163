"""Fixed resolution (--fixed_size): sizes, transforms, collate, and evaluation independent of images per batch."""
import contextlib
import io
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import datasets
import engine
from datasets import transforms as T
from datasets.coco import CocoDetection
from datasets.fixed_size import FitResize, fitted_size, make_fixed_size_transforms
from datasets.synthetic import ensure_synthetic
from models import build_model
from options import fixed_size
import training
from util.misc import collate_fn

# one intra-op thread: tiny models on a loaded 2-core machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

CANVAS = (48, 64)
# (w, h) crops of the 64 px synthetic images: landscape, portrait, square, smaller than the canvas
CROPS = [(64, 64), (64, 40), (40, 64), (56, 32), (30, 30), (64, 48), (32, 60), (50, 50)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path]:
    """A COCO-format set of images of different sizes (top-left crops of synthetic images), custom names."""
    synth = ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=4, train_size=4, val_size=len(CROPS),
                             image_size=64)
    root = tmp_path_factory.mktemp("mixed")
    data = json.loads((synth / "annotations/instances_val2017.json").read_text())
    (root / "pictures").mkdir()
    annotations = []
    for image, (w, h) in zip(data["images"], CROPS):
        Image.open(synth / "val2017" / image["file_name"]).crop((0, 0, w, h)).save(
            root / "pictures" / image["file_name"], quality=95)
        image.update(width=w, height=h)
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, bw, bh = ann["bbox"]
            x2, y2 = min(x + bw, w), min(y + bh, h)
            if x2 > x and y2 > y:
                annotations.append({**ann, "bbox": [x, y, x2 - x, y2 - y], "area": (x2 - x) * (y2 - y)})
    data["annotations"] = annotations
    (root / "mixed.json").write_text(json.dumps(data))
    return root / "pictures", root / "mixed.json"


def test_fixed_size_flag_forms():
    assert fixed_size("1024") == (1024, 1024) and fixed_size("800x1333") == (800, 1333)
    for bad in ("0", "800x", "x800", "big", "-5x10"):
        with pytest.raises(Exception, match="expected N or HxW|at least 1x1"):
            fixed_size(bad)


@pytest.mark.quick
def test_fitted_size_matches_exact_arithmetic():
    for canvas in [(48, 64), (64, 48), (1024, 1024), (800, 1333)]:
        for h in (1, 7, 30, 333, 480, 500, 612, 1000):
            for w in (1, 9, 40, 375, 427, 640, 612):
                for num, den in ((1, 1), (480, 800), (704, 800)):
                    scale = min(Fraction(canvas[0], h), Fraction(canvas[1], w)) * Fraction(num, den)
                    expected = (max(1, int(h * scale)), max(1, int(w * scale)))   # floor of the exact product
                    got = fitted_size(h, w, canvas, num, den)
                    assert got == expected, (canvas, h, w, num, den)
                    assert got[0] <= canvas[0] and got[1] <= canvas[1]
                    if num == den:
                        assert canvas[0] in got or canvas[1] in got


def test_transforms_fit_the_canvas_and_keep_relative_boxes(mixed):
    images, ann = mixed
    plain = CocoDetection(images, ann, transforms=T.Compose([T.ToTensor(), T.Normalize()]))
    val = CocoDetection(images, ann, transforms=make_fixed_size_transforms("val", CANVAS))
    for i in range(len(val)):
        img, target = val[i]
        h, w = img.shape[-2:]
        assert (h == CANVAS[0] and w <= CANVAS[1]) or (w == CANVAS[1] and h <= CANVAS[0])
        assert target["size"].tolist() == [h, w]
        # aspect kept: normalised boxes are the original ones up to the floor of one side
        torch.testing.assert_close(target["boxes"], plain[i][1]["boxes"], atol=0.02, rtol=0)
    image = Image.open(images / val.coco.imgs[val.ids[1]]["file_name"])   # inference: the image alone
    alone, nothing = FitResize(CANVAS)(image, None)
    assert nothing is None and alone.size == tuple(val[1][0].shape[:0:-1])
    train = CocoDetection(images, ann, transforms=make_fixed_size_transforms(
        "train", CANVAS, **T.scaled_coco_transform_params(64)))
    torch.manual_seed(0)
    seen = set()
    for _ in range(4):
        for i in range(len(train)):
            img, target = train[i]
            seen.add(tuple(img.shape[-2:]))
            assert img.shape[-2] <= CANVAS[0] and img.shape[-1] <= CANVAS[1]
    assert len(seen) > len(CROPS)   # scale jitter inside the canvas


@pytest.mark.quick
def test_collate_pads_to_the_canvas():
    images = [torch.ones(3, 20, 30), torch.ones(3, 48, 10)]
    samples, _ = collate_fn(list(zip(images, [{}, {}])), pad_to=CANVAS)
    assert samples.tensors.shape == (2, 3, *CANVAS)
    expected = torch.ones(2, *CANVAS, dtype=torch.bool)
    expected[0, :20, :30] = False
    expected[1, :48, :10] = False
    assert torch.equal(samples.mask, expected)
    assert samples.tensors[0, :, 20:].abs().sum() == 0
    with pytest.raises(ValueError, match="does not fit"):
        collate_fn([(torch.ones(3, 49, 10), {})], pad_to=CANVAS)


def _outputs(model, dataset, batch_size, collate):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    per_image = {}
    with torch.no_grad():
        for samples, targets in loader:
            out = model(samples)
            for k, t in enumerate(targets):
                per_image[int(t["image_id"])] = (out["pred_logits"][k], out["pred_boxes"][k])
    return per_image


def _ground_truth_from(model, postprocessors, dataset, collate, per_image: int = 3) -> COCO:
    """Ground truth = the model's own top detections at one image per batch, so AP is high and moves with
    any change in the predictions."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate)
    annotations = []
    with torch.no_grad():
        for samples, (target,) in loader:
            result = postprocessors["bbox"](model(samples), target["orig_size"][None])[0]
            for k in result["scores"].argsort(descending=True)[:per_image].tolist():
                x1, y1, x2, y2 = result["boxes"][k].tolist()
                annotations.append({"id": len(annotations) + 1, "image_id": int(target["image_id"]),
                                    "category_id": int(result["labels"][k]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": list(dataset.coco.dataset["images"]), "annotations": annotations,
                    "categories": [{"id": c, "name": str(c)} for c in range(model.class_embed.out_features)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_eval_is_identical_at_1_2_and_4_images_per_batch(mixed, tiny_args):
    images, ann = mixed
    args = tiny_args(dataset_file="coco", val_images=images, val_ann=ann, fixed_size="48x64", batch_size=1)
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    model.eval()
    dataset = datasets.build_dataset("val", args)
    collate = training.collate(args)

    outputs = {bs: _outputs(model, dataset, bs, collate) for bs in (1, 2, 4)}
    for bs in (2, 4):
        for image_id, (logits, boxes) in outputs[1].items():
            torch.testing.assert_close(outputs[bs][image_id][0], logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(outputs[bs][image_id][1], boxes, atol=1e-5, rtol=0)

    gt = _ground_truth_from(model, postprocessors, dataset, collate)
    stats = {}
    for bs in (1, 2, 4):
        loader = torch.utils.data.DataLoader(dataset, batch_size=bs, collate_fn=collate)
        stats[bs] = engine.evaluate(model, criterion, postprocessors, loader, gt, torch.device("cpu"))[1]
    assert stats[1][0] > 0.5                      # the self-made ground truth is mostly found
    assert stats[1] == stats[2] == stats[4]

    # without a fixed canvas, DETR pads each batch to its largest image: other outputs, another AP
    detr = CocoDetection(images, ann, transforms=T.make_coco_transforms("val", scales=[48], max_size=64))
    single, paired = _outputs(model, detr, 1, collate_fn), _outputs(model, detr, 2, collate_fn)
    assert max((single[i][1] - paired[i][1]).abs().max().item() for i in single) > 1e-3
    detr_stats = [engine.evaluate(model, criterion, postprocessors,
                                  torch.utils.data.DataLoader(detr, batch_size=bs, collate_fn=collate_fn), gt,
                                  torch.device("cpu"))[1] for bs in (1, 2)]
    assert detr_stats[0] != detr_stats[1]
