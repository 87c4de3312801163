"""Datasets: synthetic generation, the COCO loader, transforms, the evaluator.

Bad input to the COCO loader: tests/test_coco_bad_input.py."""
import concurrent.futures
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, get_coco_api_from_dataset, num_classes_for
from datasets import transforms as T
from datasets.coco import CocoDetection
from datasets.coco_eval import CocoEvaluator
from datasets.synthetic import CATEGORIES, dataset_name, ensure_synthetic
from tests.synthetic_set import N_TRAIN, N_VAL, SEED, SIZE, dataset_args, ensure_small, load_json, xyxy
from tests.synthetic_set import synth  # noqa: F401 (a fixture)


def _tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- synthetic generation

def test_generation_is_deterministic_and_named_by_parameters(tmp_path):
    a, b = ensure_small(tmp_path / "a"), ensure_small(tmp_path / "b")
    assert a.name == b.name == dataset_name(SEED, N_TRAIN, N_VAL, SIZE)
    for token in (f"seed{SEED}", f"train{N_TRAIN}", f"val{N_VAL}", f"px{SIZE}"):
        assert token in a.name
    digest = _tree_digest(a)
    assert digest == _tree_digest(b)
    assert len([k for k in digest if k.endswith(".jpg")]) == N_TRAIN + N_VAL
    # Only the finished folder is left behind (no temporary folders).
    assert [p.name for p in (tmp_path / "a").iterdir()] == [a.name]
    other = ensure_synthetic(tmp_path / "a", seed=SEED + 1, train_size=N_TRAIN, val_size=N_VAL,
                             image_size=SIZE)
    assert other != a
    assert load_json(other / "annotations/instances_train2017.json") != \
        load_json(a / "annotations/instances_train2017.json")


def test_generation_content_is_coco_without_info(synth):
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        data = load_json(synth / f"annotations/instances_{split}2017.json")
        assert "info" not in data
        assert [c["id"] for c in data["categories"]] == [c[0] for c in CATEGORIES]
        assert min(c["id"] for c in data["categories"]) == 1
        assert len(data["images"]) == n
        per_image = {}
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["category_id"] in {c[0] for c in CATEGORIES}
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            assert 0.2 * SIZE - 1 <= max(w, h) and min(w, h) <= 0.5 * SIZE + 1
            per_image.setdefault(ann["image_id"], []).append(ann["bbox"])
        for img in data["images"]:
            assert (img["width"], img["height"]) == (SIZE, SIZE)
            assert Image.open(synth / f"{split}2017" / img["file_name"]).size == (SIZE, SIZE)
            boxes = per_image.get(img["id"], [])
            assert 1 <= len(boxes) <= 3
            for i in range(len(boxes)):          # objects never overlap
                for j in range(i + 1, len(boxes)):
                    a, b = xyxy(boxes[i]), xyxy(boxes[j])
                    assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])


def test_generation_object_pixels_have_category_colour(synth):
    """The box centre of a square/circle lies inside the shape: its colour is the category's."""
    data = load_json(synth / "annotations/instances_train2017.json")
    colours = {cid: np.array(rgb) for cid, _, rgb in CATEGORIES}
    files = {img["id"]: img["file_name"] for img in data["images"]}
    checked = 0
    for ann in data["annotations"]:
        if ann["category_id"] not in (1, 2):
            continue
        x, y, w, h = ann["bbox"]
        pixels = np.asarray(Image.open(synth / "train2017" / files[ann["image_id"]]), dtype=float)
        centre = pixels[int(y + h / 2), int(x + w / 2)]
        assert np.abs(centre - colours[ann["category_id"]]).max() < 40
        checked += 1
    assert checked > 0


def _ensure_in(root):
    return str(ensure_small(Path(root)))


def test_concurrent_generation_yields_one_complete_copy(tmp_path):
    with concurrent.futures.ProcessPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(_ensure_in, [tmp_path] * 3))
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [Path(paths[0]).name]
    assert _tree_digest(Path(paths[0])) == _tree_digest(ensure_small(tmp_path / "fresh"))


def test_interrupted_generation_is_redone(tmp_path):
    name = dataset_name(SEED, N_TRAIN, N_VAL, SIZE)
    partial = tmp_path / f".{name}.tmp-otherhost-123-deadbeef"
    (partial / "train2017").mkdir(parents=True)
    (partial / "train2017" / "000001.jpg").write_bytes(b"half")
    out = ensure_small(tmp_path)
    assert out == tmp_path / name
    assert len(list((out / "val2017").glob("*.jpg"))) == N_VAL
    assert _tree_digest(out) == _tree_digest(ensure_small(tmp_path / "fresh"))


# ---------------------------------------------------------------- loader + transforms

def test_build_dataset_synthetic_items_match_contract_and_json(synth):
    args = dataset_args(synthetic_root=str(synth.parent))
    assert num_classes_for(args) == max(c[0] for c in CATEGORIES) + 1
    ds = build_dataset("val", args)
    data = load_json(synth / "annotations/instances_val2017.json")
    anns = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    assert len(ds) == N_VAL
    mean, std = torch.tensor(T.IMAGENET_MEAN)[:, None, None], torch.tensor(T.IMAGENET_STD)[:, None, None]
    for i in range(len(ds)):
        img, target = ds[i]
        image_id = int(target["image_id"])
        assert img.dtype == torch.float32 and img.shape == (3, SIZE, SIZE)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["image_id"].shape == (1,)
        assert target["orig_size"].tolist() == [SIZE, SIZE]
        assert target["size"].tolist() == list(img.shape[-2:])
        expected = anns[image_id]
        n = len(expected)
        assert target["boxes"].shape == (n, 4) and target["labels"].shape == (n,)
        assert target["area"].shape == (n,) and target["iscrowd"].tolist() == [0] * n
        assert target["labels"].tolist() == [a["category_id"] for a in expected]
        boxes = target["boxes"]
        assert boxes.min() >= 0 and boxes.max() <= 1
        # Normalised cxcywh back to absolute xywh equals the json exactly.
        cx, cy, w, h = (boxes * SIZE).unbind(-1)
        xywh = torch.stack([cx - w / 2, cy - h / 2, w, h], dim=-1)
        torch.testing.assert_close(xywh, torch.tensor([a["bbox"] for a in expected]),
                                   atol=1e-4, rtol=0)
        # Undoing the normalisation gives the decoded JPEG.
        file_name = next(im["file_name"] for im in data["images"] if im["id"] == image_id)
        raw = torch.from_numpy(np.array(Image.open(synth / "val2017" / file_name))).permute(2, 0, 1)
        torch.testing.assert_close(img * std + mean, raw.float() / 255, atol=1e-5, rtol=0)


def test_val_resize_keeps_normalised_boxes_and_sets_size(synth):
    ds = CocoDetection(synth / "val2017", synth / "annotations/instances_val2017.json",
                       transforms=T.make_coco_transforms("val", scales=[96], max_size=1000))
    plain = CocoDetection(synth / "val2017", synth / "annotations/instances_val2017.json",
                          transforms=T.make_coco_transforms("val", scales=[SIZE], max_size=1000))
    img, target = ds[0]
    assert img.shape == (3, 96, 96) and target["size"].tolist() == [96, 96]
    assert target["orig_size"].tolist() == [SIZE, SIZE]
    torch.testing.assert_close(target["boxes"], plain[0][1]["boxes"], atol=1e-6, rtol=0)
    torch.testing.assert_close(target["area"], plain[0][1]["area"] * (96 / SIZE) ** 2)


def _sample(w=50, h=30):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
    target = {
        "boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0], [30.5, 0.0, 50.0, 10.0], [10.0, 12.0, 44.0, 29.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([100.0, 200.0, 300.0]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "size": torch.tensor([h, w]),
    }
    return img, target


@pytest.mark.quick
def test_horizontal_flip_maps_boxes_and_pixels_exactly():
    img, target = _sample()
    w = img.size[0]
    flipped, ft = T.RandomHorizontalFlip(p=1.0)(img, target)
    expected = [[w - x2, y1, w - x1, y2] for x1, y1, x2, y2 in target["boxes"].tolist()]
    assert ft["boxes"].tolist() == expected
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    assert ft["labels"].tolist() == [1, 2, 3]
    same, st = T.RandomHorizontalFlip(p=0.0)(img, target)
    assert same is img and st["boxes"] is target["boxes"]


def test_crop_clips_boxes_and_drops_degenerate_ones_with_their_fields():
    img, target = _sample()
    out, ct = T.crop(img, target, top=5, left=8, height=20, width=22)
    assert out.size == (22, 20) and ct["size"].tolist() == [20, 22]
    # Plain computation: shift, clip to [0,22]x[0,20], keep boxes with positive extent.
    expected_boxes, expected_labels = [], []
    for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        b = [min(max(x1 - 8, 0), 22), min(max(y1 - 5, 0), 20), min(max(x2 - 8, 0), 22),
             min(max(y2 - 5, 0), 20)]
        if b[2] > b[0] and b[3] > b[1]:
            expected_boxes.append(b)
            expected_labels.append(label)
    assert expected_labels == [1, 3]          # the box at x >= 30.5 leaves the crop entirely
    assert ct["boxes"].tolist() == expected_boxes
    assert ct["labels"].tolist() == expected_labels
    assert ct["area"].tolist() == [(b[2] - b[0]) * (b[3] - b[1]) for b in expected_boxes]
    assert ct["iscrowd"].shape == (2,)
    assert np.array_equal(np.asarray(out), np.asarray(img)[5:25, 8:30])


def test_resize_shorter_side_and_max_size_cap():
    img, target = _sample(w=100, h=50)
    out, rt = T.resize(img, target, size=40, max_size=1000)
    assert out.size == (80, 40) and rt["size"].tolist() == [40, 80]
    torch.testing.assert_close(rt["boxes"], target["boxes"] * 0.8)
    out, rt = T.resize(img, target, size=40, max_size=60)    # 80 > 60: longer side capped
    assert out.size == (60, 30) and rt["size"].tolist() == [30, 60]
    torch.testing.assert_close(rt["boxes"], target["boxes"] * 0.6)


def test_normalize_converts_xyxy_to_normalised_cxcywh():
    img, target = _sample()
    tensor, nt = T.Compose([T.ToTensor(), T.Normalize()])(img, target)
    expected = [[(x1 + x2) / 2 / 50, (y1 + y2) / 2 / 30, (x2 - x1) / 50, (y2 - y1) / 30]
                for x1, y1, x2, y2 in target["boxes"].tolist()]
    torch.testing.assert_close(nt["boxes"], torch.tensor(expected))


def test_train_transform_invariants(synth):
    params = T.scaled_coco_transform_params(SIZE)
    assert params["scales"][-1] == SIZE and params["max_size"] == round(1333 * SIZE / 800)
    assert params["crop_range"][0] < params["crop_range"][1] <= SIZE
    ds = CocoDetection(synth / "train2017", synth / "annotations/instances_train2017.json",
                       transforms=T.make_coco_transforms("train", **params))
    torch.manual_seed(0)
    sizes = set()
    for rep in range(3):
        for i in range(len(ds)):
            img, target = ds[i]
            h, w = img.shape[-2:]
            sizes.add((h, w))
            assert target["size"].tolist() == [h, w]
            assert max(h, w) <= params["max_size"] and min(h, w) in params["scales"]
            n = target["boxes"].shape[0]
            assert target["labels"].shape == (n,) and target["area"].shape == (n,)
            if n:
                assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
                assert (target["boxes"][:, 2:] > 0).all()
    assert len(sizes) > 3                      # the scales really vary


@pytest.mark.quick
def test_coco_transforms_use_detr_numbers():
    train = T.make_coco_transforms("train")
    select = train.transforms[1]
    assert select.a.sizes == list(range(480, 801, 32)) and select.a.max_size == 1333
    assert select.b.transforms[0].sizes == [400, 500, 600]
    assert (select.b.transforms[1].min_size, select.b.transforms[1].max_size) == (384, 600)
    val = T.make_coco_transforms("val")
    assert val.transforms[0].sizes == [800] and val.transforms[0].max_size == 1333


# ---------------------------------------------------------------- evaluator

def _gt_predictions(coco):
    res = {}
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        res[image_id] = {
            "boxes": torch.tensor([xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
        }
    return res


def test_evaluator_ground_truth_scores_one_without_info_key(synth, capsys):
    ann_file = synth / "annotations/instances_val2017.json"
    before = ann_file.read_bytes()
    ds = CocoDetection(synth / "val2017", ann_file)
    coco = get_coco_api_from_dataset(torch.utils.data.Subset(ds, [0, 1]))
    assert "info" not in coco.dataset
    evaluator = CocoEvaluator(coco)
    preds = _gt_predictions(coco)
    evaluator.update(preds)
    evaluator.update(preds)                    # a repeated image must not count twice
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    capsys.readouterr()
    stats = evaluator.summarize()
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if line.startswith(" Average")]) == 12
    assert not any("Loading" in line or "DONE" in line for line in printed)
    assert isinstance(stats, list) and len(stats) == 12 and all(type(v) is float for v in stats)
    assert stats[0] == 1.0 and stats[1] == 1.0 and stats[2] == 1.0
    assert evaluator.stats == stats
    assert "info" not in coco.dataset and ann_file.read_bytes() == before


def test_evaluator_scores_a_missed_object_below_one(synth):
    coco = CocoDetection(synth / "val2017", synth / "annotations/instances_val2017.json").coco
    preds = _gt_predictions(coco)
    image_id = next(i for i, p in preds.items() if len(p["labels"]) > 0)
    preds[image_id]["labels"][0] = 1 + preds[image_id]["labels"][0] % len(CATEGORIES)  # wrong class
    evaluator = CocoEvaluator(coco)
    evaluator.update(preds)
    evaluator.accumulate()
    assert 0 < evaluator.stats[1] < 1.0


def test_evaluator_empty_predictions_give_zeros(synth):
    coco = CocoDetection(synth / "val2017", synth / "annotations/instances_val2017.json").coco
    evaluator = CocoEvaluator(coco)
    evaluator.update({i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                          "labels": torch.zeros(0, dtype=torch.int64)} for i in coco.getImgIds()})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = evaluator.summarize()
    assert stats[:3] == [0.0, 0.0, 0.0] and stats[8] == 0.0
    nothing = CocoEvaluator(coco)
    nothing.synchronize_between_processes()
    nothing.accumulate()
    assert nothing.summarize() == [0.0] * 12

