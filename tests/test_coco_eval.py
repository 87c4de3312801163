"""The two COCO scoring backends give the same 12 numbers (to float64 rounding) and print the same summary: on the
synthetic set, on random detections with crowd regions, empty images and tied scores, and on masks (segm); and
engine.evaluate's time breakdown with either backend."""
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from datasets.coco import CocoDetection
from datasets.coco_eval import COCO_BACKENDS, CocoEvaluator, STAT_NAMES
from datasets.synthetic import ensure_synthetic


def evaluate(coco_gt, predictions, backend, iou_types=("bbox",), capsys=None):
    """(stats by IoU type, printed summary lines) of one backend on image_id -> prediction dicts."""
    evaluator = CocoEvaluator(coco_gt, iou_types, backend=backend)
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    if capsys is not None:
        capsys.readouterr()
    evaluator.summarize()
    printed = capsys.readouterr().out.splitlines() if capsys is not None else []
    return evaluator.stats_by_type, printed


def assert_backends_agree(coco_gt, predictions, capsys, iou_types=("bbox",)):
    (ref, ref_lines), (fast, fast_lines) = [evaluate(coco_gt, predictions, b, iou_types, capsys)
                                            for b in ("pycocotools", "faster_coco_eval")]
    assert set(COCO_BACKENDS) == {"pycocotools", "faster_coco_eval"}
    for iou_type in iou_types:
        assert len(ref[iou_type]) == len(STAT_NAMES)
        # the same algorithm on the same inputs; only the last bit may differ: the C++ accumulation computes
        # precision tp / (tp + fp + eps) in another operation order (seen: 2.2e-16 on one precision entry)
        np.testing.assert_allclose(fast[iou_type], ref[iou_type], rtol=0, atol=1e-12, err_msg=iou_type)
    assert fast_lines == ref_lines
    assert sum(line.startswith(" Average") for line in ref_lines) == len(STAT_NAMES) * len(iou_types)
    return ref


def _jitter_predictions(coco, rng, extra=5, drop=0.2, tie_every=0, jitter=0.05):
    """Per image: each gt box jittered (some dropped, some with a wrong class), plus random false positives;
    random scores, or every ``tie_every``-th score equal to the one before (ties in the ranking)."""
    categories = sorted(coco.getCatIds())
    predictions = {}
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        width, height = info["width"], info["height"]
        boxes, labels = [], []
        for ann in coco.imgToAnns[image_id]:
            if rng.random() < drop:
                continue
            x, y, w, h = ann["bbox"]
            dx, dy = rng.normal(0, jitter * w), rng.normal(0, jitter * h)
            sw, sh = np.exp(rng.normal(0, jitter, size=2))
            boxes.append([x + dx, y + dy, x + dx + w * sw, y + dy + h * sh])
            labels.append(ann["category_id"] if rng.random() < 0.85 else int(rng.choice(categories)))
        for _ in range(int(rng.integers(0, extra + 1))):
            x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
            boxes.append([x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height)])
            labels.append(int(rng.choice(categories)))
        scores = rng.uniform(0.05, 1.0, size=len(boxes))
        if tie_every:
            scores[tie_every::tie_every] = scores[tie_every - 1:-1:tie_every][:len(scores[tie_every::tie_every])]
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                 "scores": torch.tensor(scores, dtype=torch.float32),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return predictions


def test_backends_agree_on_the_synthetic_set(tmp_path, capsys):
    root = ensure_synthetic(tmp_path, seed=5, train_size=2, val_size=64, image_size=128)
    coco = CocoDetection(root / "val2017", root / "annotations" / "instances_val2017.json").coco
    predictions = _jitter_predictions(coco, np.random.default_rng(0))
    stats = assert_backends_agree(coco, predictions, capsys)["bbox"]
    assert 0.1 < stats[0] < 0.95 and stats[1] > stats[0]  # neither trivial nor perfect


def _random_gt(rng, num_images=40):
    """A COCO dict with category ids with gaps, empty images, crowd regions and objects of all three sizes."""
    categories = [{"id": cid, "name": f"c{cid}"} for cid in (1, 3, 7, 8)]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(120, 400)), int(rng.integers(120, 400))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        if image_id % 7 == 0:
            continue  # an image without objects
        for _ in range(int(rng.integers(1, 9))):
            side = float(rng.choice([12.0, 50.0, 110.0])) * rng.uniform(0.8, 1.2)  # small, medium, large
            w, h = min(side * rng.uniform(0.6, 1.4), width - 1), min(side * rng.uniform(0.6, 1.4), height - 1)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            crowd = int(rng.random() < 0.12)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice([1, 3, 7, 8])), "bbox": [x, y, w, h],
                                "area": w * h * (1.0 if crowd else rng.uniform(0.5, 1.0)), "iscrowd": crowd})
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco(dataset):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_on_random_detections_with_crowds_and_empty_images(seed, capsys):
    rng = np.random.default_rng(seed)
    gt = _random_gt(rng)
    coco = _coco(gt)
    assert any(a["iscrowd"] for a in gt["annotations"]) and any(not coco.imgToAnns[i] for i in coco.getImgIds())
    predictions = _jitter_predictions(coco, rng, extra=12, tie_every=4)
    # images with no detections at all, and an image evaluated twice (the later update wins)
    for image_id in list(predictions)[::9]:
        predictions[image_id] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                 "labels": torch.zeros(0, dtype=torch.int64)}
    stats = assert_backends_agree(coco, predictions, capsys)["bbox"]
    assert all(v > 0 for v in stats), "every area range should hold objects and matches"
    # only part of the set (a partial validation pass): still the same numbers
    part = {i: p for i, p in predictions.items() if i % 3}
    assert_backends_agree(coco, part, capsys)


@pytest.mark.quick
def test_backends_agree_when_nothing_matches(capsys):
    coco = _coco(_random_gt(np.random.default_rng(3), num_images=6))
    nothing = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
               for i in coco.getImgIds()}
    stats = assert_backends_agree(coco, nothing, capsys)["bbox"]
    assert stats[:3] == [0.0, 0.0, 0.0]
    for backend in COCO_BACKENDS:  # no image at all: zeros, with one line saying so
        stats, lines = evaluate(coco, {}, backend, capsys=capsys)
        assert stats["bbox"] == [0.0] * 12 and lines == ["IoU metric: bbox", "no images were evaluated; all metrics are 0"]


def _polygon_mask(polygon, width, height):
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in np.reshape(polygon, (-1, 2))], fill=1)
    return np.asarray(image, dtype=np.uint8)


@pytest.mark.quick
def test_backends_agree_on_masks(capsys):
    """segm: polygon ground truth (and a crowd RLE), predicted masks as (K, 1, H, W) probabilities."""
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(4)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, 13):
        width, height = int(rng.integers(60, 120)), int(rng.integers(60, 120))
        images.append({"id": image_id, "width": width, "height": height})
        masks, labels = [], []
        for k in range(int(rng.integers(0, 4))):
            cx, cy, r = rng.uniform(20, width - 20), rng.uniform(20, height - 20), rng.uniform(6, 18)
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=6))
            polygon = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).ravel().tolist()
            gt_mask = _polygon_mask(polygon, width, height)
            crowd = int(k == 2)
            segmentation = [polygon]
            if crowd:
                segmentation = mask_util.encode(np.asfortranarray(gt_mask))
                segmentation["counts"] = segmentation["counts"].decode("ascii")
            x0, y0 = np.reshape(polygon, (-1, 2)).min(0)
            x1, y1 = np.reshape(polygon, (-1, 2)).max(0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1 + k % 2,
                                "segmentation": segmentation, "area": float(gt_mask.sum()),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": crowd})
            shifted = np.roll(gt_mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
            masks.append(shifted * rng.uniform(0.6, 1.0))
            labels.append(1 + k % 2)
        masks.append(rng.uniform(0, 1, size=(height, width)) * (rng.uniform(size=(height, width)) > 0.7))
        labels.append(1)
        masks = torch.tensor(np.stack(masks), dtype=torch.float32)[:, None]  # (K, 1, H, W)
        boxes = torch.tensor([[0, 0, width / 2, height / 2]] * len(labels), dtype=torch.float32)
        predictions[image_id] = {"masks": masks, "boxes": boxes, "labels": torch.tensor(labels),
                                 "scores": torch.tensor(rng.uniform(0.1, 1, size=len(labels)), dtype=torch.float32)}
    coco = _coco({"images": images, "annotations": annotations,
                  "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})
    stats = assert_backends_agree(coco, predictions, capsys, iou_types=("bbox", "segm"))
    assert stats["segm"][1] > 0.3 and stats["segm"] != stats["bbox"]


def test_unknown_backend_or_iou_type_is_an_error():
    coco = _coco(_random_gt(np.random.default_rng(5), num_images=2))
    with pytest.raises(ValueError, match="backend must be one of"):
        CocoEvaluator(coco, backend="detectron2")
    with pytest.raises(ValueError, match="iou_types"):
        CocoEvaluator(coco, ("keypoints",))


# ------------------------------------------------------------------ engine.evaluate: backend and time breakdown

EVAL_LINE = re.compile(r"^evaluation time \d+:\d\d:\d\d for (\d+) images \(([\d.]+) images/s\): data [\d.]+ s, "
                       r"model [\d.]+ s, loss [\d.]+ s, post-processing [\d.]+ s, gathering [\d.]+ s, "
                       r"COCO scoring [\d.]+ s \((\w+)\)$", re.M)


def test_evaluate_reports_where_the_time_goes_with_either_backend(tmp_path, capsys, single_thread):
    import engine
    from conftest import make_args
    from datasets import build_dataset, get_coco_api_from_dataset
    from models import build_model
    from util.misc import collate_fn

    args = make_args(dynamic_scale="type2", num_classes=None, synthetic_root=str(tmp_path),
                     synthetic_train_size=2, synthetic_val_size=6, synthetic_image_size=64)
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    dataset = build_dataset("val", args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    results = {}
    for backend in COCO_BACKENDS:
        stats, coco_stats = engine.evaluate(model, criterion, postprocessors, loader,
                                            get_coco_api_from_dataset(dataset), torch.device("cpu"),
                                            coco_backend=backend)
        out = capsys.readouterr().out
        (match,) = EVAL_LINE.finditer(out)
        assert match.group(1) == "6" and match.group(3) == backend
        phases = [stats[f"time_{p}"] for p in engine.EVAL_PHASES]
        assert all(t >= 0 for t in phases) and stats["time_model"] > 0 and stats["time_scoring"] > 0
        # the phases are disjoint parts of the total (the rest is printing and loop overhead)
        assert sum(phases) <= stats["time_total"] + 1e-6
        assert float(match.group(2)) == pytest.approx(6 / stats["time_total"], rel=0.06, abs=0.06)
        assert stats["coco_eval_bbox"] == coco_stats
        results[backend] = coco_stats
    np.testing.assert_allclose(results["faster_coco_eval"], results["pycocotools"], rtol=0, atol=1e-12)


def test_main_eval_uses_the_coco_backend_flag(tmp_path):
    import json

    from tests.cli import run_main

    argv = ["--eval", "--backbone", "resnet18", "--backbone_weights", "none",
            "--hidden_dim", "32", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4",
            "--num_queries", "10", "--batch_size", "2", "--synthetic_train_size", "2", "--synthetic_val_size", "4",
            "--synthetic_image_size", "64", "--synthetic_root", str(tmp_path / "data"), "--device", "cpu",
            "--num_workers", "0", "--output_dir", str(tmp_path / "run"), "--eval_untrained", "--coco_backend",
            "pycocotools"]
    proc = run_main(argv)
    assert proc.returncode == 0, proc.stderr
    (match,) = EVAL_LINE.finditer(proc.stdout)
    assert match.group(1) == "4" and match.group(3) == "pycocotools"
    assert re.search(r"^  coco_backend +pycocotools$", proc.stdout, re.M)  # the block of non-default flags
    stats = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {f"time_{p}" for p in ("data", "model", "loss", "postprocess", "gather", "scoring", "total")} <= set(stats)
    bad = run_main(argv[:-1] + ["lvis"])
    assert bad.returncode == 2 and "argument --coco_backend: invalid choice: 'lvis'" in bad.stderr
