"""Panoptic data and post-processing: the synthetic panoptic set in COCO panoptic format, CocoPanoptic targets from
the segment PNGs, masks through DETR's transforms, errors naming the missing file, and DETR's PostProcessSegm /
PostProcessPanoptic rules on hand-made outputs."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util

import datasets
import main
from datasets import transforms as T
from datasets.coco_panoptic import build_coco_panoptic, rgb2id
from datasets.synthetic_panoptic import ID_STRIDE, MAX_THING_ID, STUFF, ensure_synthetic_panoptic
from models.postprocess_segm import PostProcessPanoptic, PostProcessSegm
import run_setup
from util.errors import UserError

SIZES = dict(train_size=6, val_size=3, image_size=64)
STUFF_IDS = {5, 6, 7}


@pytest.fixture(scope="module")
def panoptic_root(tmp_path_factory):
    return ensure_synthetic_panoptic(tmp_path_factory.mktemp("panoptic"), seed=5, **SIZES)


def test_synthetic_panoptic_is_real_coco_panoptic(panoptic_root):
    panoptic = json.loads((panoptic_root / "annotations" / "panoptic_val2017.json").read_text())
    instances = json.loads((panoptic_root / "annotations" / "instances_val2017.json").read_text())
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert {c for c, v in categories.items() if v["isthing"]} == set(range(1, MAX_THING_ID + 1))
    assert {c for c, v in categories.items() if not v["isthing"]} == {cat_id for cat_id, _, _ in STUFF}
    assert len(panoptic["annotations"]) == SIZES["val_size"]
    rle_by_image = {}
    for ann in instances["annotations"]:
        rle_by_image.setdefault(ann["image_id"], []).append(ann)
    void_pixels = 0
    for ann in panoptic["annotations"]:
        ids = rgb2id(np.asarray(Image.open(panoptic_root / "panoptic_val2017" / ann["file_name"])))
        assert ids.shape == (64, 64)
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed  # every labelled pixel belongs to a listed segment
        void_pixels += int((ids == 0).sum())
        kinds = {categories[s["category_id"]]["isthing"] for s in ann["segments_info"]}
        assert kinds == {0, 1}  # stuff and things in every image
        for s in ann["segments_info"]:
            mask = ids == s["id"]
            assert s["area"] == mask.sum() and s["id"] // ID_STRIDE == s["category_id"]
            rows, cols = np.nonzero(mask)
            assert s["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        things = [s for s in ann["segments_info"] if categories[s["category_id"]]["isthing"]]
        rles = rle_by_image[ann["image_id"]]
        assert [r["category_id"] for r in rles] == [s["category_id"] for s in things]
        for rle, s in zip(rles, things):
            assert np.array_equal(mask_util.decode(rle["segmentation"]).astype(bool), ids == s["id"])
    assert void_pixels > 0  # the seams between stuff regions are VOID


def test_synthetic_panoptic_is_deterministic_and_cached(tmp_path, panoptic_root):
    again = ensure_synthetic_panoptic(tmp_path, seed=5, **SIZES)
    for path in sorted(p for p in panoptic_root.rglob("*") if p.is_file()):
        assert (again / path.relative_to(panoptic_root)).read_bytes() == path.read_bytes(), path
    assert ensure_synthetic_panoptic(tmp_path, seed=5, **SIZES) == again  # second call: the cached folder
    other = ensure_synthetic_panoptic(tmp_path, seed=6, **SIZES)
    assert (other / "panoptic_val2017" / "000001.png").read_bytes() != \
        (again / "panoptic_val2017" / "000001.png").read_bytes()


def test_dataset_targets_come_from_the_segment_pngs(panoptic_root):
    dataset = build_coco_panoptic("val", panoptic_root, panoptic_root, None, num_classes=8, return_masks=True)
    image, target = dataset[1]
    ann = dataset.panoptic["annotations"][1]
    ids = rgb2id(np.asarray(Image.open(panoptic_root / "panoptic_val2017" / ann["file_name"])))
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (len(ann["segments_info"]), 64, 64)
    for mask, label, box, s in zip(target["masks"], target["labels"], target["boxes"], ann["segments_info"]):
        assert torch.equal(mask, torch.from_numpy(ids == s["id"])) and label == s["category_id"]
        x, y, w, h = s["bbox"]
        # DETR's masks_to_boxes: the last pixel's index, not its far edge
        assert box.tolist() == [x, y, x + w - 1, y + h - 1]
    assert target["area"].tolist() == [s["area"] for s in ann["segments_info"]]
    # box and mask AP are scored against the instances file (things only)
    assert {a["category_id"] for a in dataset.coco.dataset["annotations"]} <= set(range(1, MAX_THING_ID + 1))
    boxes_only = build_coco_panoptic("train", panoptic_root, panoptic_root, None, 8, return_masks=False)
    assert "masks" not in boxes_only[0][1] and len(boxes_only[0][1]["boxes"])


def test_build_dataset_with_masks_uses_the_panoptic_set(tmp_path):
    args = main.get_args_parser().parse_args(
        ["--masks", "--synthetic_root", str(tmp_path), "--synthetic_train_size", "4", "--synthetic_val_size", "2",
         "--synthetic_image_size", "64", "--device", "cpu"])
    run_setup.resolve_args(args)
    assert args.dataset_file == "synthetic_panoptic" and args.num_classes == 8
    assert datasets.stuff_ids(args) == {cat_id for cat_id, _, _ in STUFF}  # from the panoptic JSON's 'isthing'
    dataset = datasets.build_dataset("train", args)
    image, target = dataset[0]
    assert target["masks"].shape[-2:] == image.shape[-2:] and len(target["masks"]) == len(target["labels"])
    assert list(tmp_path.iterdir())[0].name.startswith("panoptic-v1-")


# --- masks through DETR's transforms ------------------------------------------------------------------------

def _target():
    masks = torch.zeros(3, 40, 60, dtype=torch.bool)
    masks[0, 2:10, 5:20] = True
    masks[1, 20:38, 30:58] = True
    masks[2, 0:4, 50:60] = True
    boxes = torch.tensor([[5.0, 2.0, 19.0, 9.0], [30.0, 20.0, 57.0, 37.0], [50.0, 0.0, 59.0, 3.0]])
    return {"boxes": boxes, "masks": masks, "labels": torch.tensor([1, 2, 5]), "area": masks.flatten(1).sum(1).float(),
            "iscrowd": torch.zeros(3, dtype=torch.int64), "size": torch.tensor([40, 60])}


@pytest.mark.quick
def test_masks_follow_flip_resize_and_crop():
    image = Image.new("RGB", (60, 40))
    target = _target()
    _, flipped = T.hflip(image, target)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    resized_image, resized = T.resize(image, target, 80)  # 40 x 60 -> 80 x 120
    assert resized_image.size == (120, 80) and resized["masks"].shape == (3, 80, 120)
    reference = F.interpolate(target["masks"][:, None].float(), size=(80, 120), mode="nearest")[:, 0] > 0.5
    assert torch.equal(resized["masks"], reference)
    # the box math is unchanged by the masks: the same as without them
    plain = {k: v for k, v in target.items() if k != "masks"}
    assert torch.equal(T.resize(image, plain, 80)[1]["boxes"], resized["boxes"])
    _, cropped = T.crop(image, target, 0, 25, 30, 30)  # rows 0-29, cols 25-54: the first segment is outside
    assert cropped["labels"].tolist() == [2, 5] and cropped["masks"].shape == (2, 30, 30)
    assert torch.equal(cropped["masks"], target["masks"][1:, :30, 25:55])
    _, cropped = T.crop(image, target, 5, 0, 10, 28)  # only the first segment's box stays non-empty
    assert cropped["labels"].tolist() == [1] and cropped["masks"].shape == (1, 10, 28)
    assert torch.equal(cropped["masks"][0], target["masks"][0, 5:15, :28])


def test_crop_past_the_image_pads_masks_as_the_image():
    image = Image.new("RGB", (60, 40))
    cropped_image, cropped = T.CenterCrop((50, 70))(image, _target())
    assert cropped_image.size == (70, 50) and cropped["masks"].shape[-2:] == (50, 70)
    assert cropped["masks"].sum() == _target()["masks"].sum()


# --- errors name the file -----------------------------------------------------------------------------------

def test_missing_panoptic_pieces_are_named(tmp_path, panoptic_root):
    with pytest.raises(UserError, match="--coco_panoptic_path"):
        datasets.check_paths(main.get_args_parser().parse_args(
            ["--dataset_file", "coco_panoptic", "--coco_path", str(panoptic_root)]), ("val",))
    root = tmp_path / "copy"
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(UserError, match=str(root / "annotations" / "panoptic_val2017.json")):
        build_coco_panoptic("val", panoptic_root, root, None, 8, True)
    (root / "annotations" / "panoptic_val2017.json").write_text("{not json")
    (root / "panoptic_val2017").mkdir()
    with pytest.raises(UserError, match="cannot read panoptic annotation file"):
        build_coco_panoptic("val", panoptic_root, root, None, 8, True)
    (root / "annotations" / "panoptic_val2017.json").write_bytes(
        (panoptic_root / "annotations" / "panoptic_val2017.json").read_bytes())
    dataset = build_coco_panoptic("val", panoptic_root, root, None, 8, True)
    with pytest.raises(UserError, match=str(root / "panoptic_val2017" / "000001.png")):
        dataset[0]
    (tmp_path / "val2017").mkdir()
    with pytest.raises(UserError, match=str(tmp_path / "annotations" / "instances_val2017.json")):
        build_coco_panoptic("val", tmp_path, root, None, 8, True)


# --- post-processing ----------------------------------------------------------------------------------------

def test_segm_masks_are_cut_from_the_canvas_then_resized_to_the_original():
    # image 0 is 8 x 8 of a 16 x 12 canvas (stride 4: 4 x 3 logits), originally 4 x 4
    pred_masks = torch.full((2, 2, 4, 3), -10.0)
    pred_masks[0, 1, :3, :3] = 10.0  # query 1 of image 0 covers its whole image (and a cell beyond)
    results = [{"queries": torch.tensor([1, 0])}, {"queries": torch.tensor([], dtype=torch.int64)}]
    out = PostProcessSegm()(results, {"pred_masks": pred_masks}, torch.tensor([[4, 4], [6, 6]]),
                            torch.tensor([[8, 8], [16, 12]]), canvas_size=(16, 12))
    assert out[0]["masks"].shape == (2, 1, 4, 4) and out[0]["masks"].dtype == torch.uint8
    assert out[0]["masks"][0].all() and not out[0]["masks"][1].any()
    assert out[1]["masks"].shape == (0, 1, 6, 6)


def _outputs(logits, masks):
    return {"pred_logits": torch.tensor(logits, dtype=torch.float32)[None], "pred_masks": masks[None]}


def _column_masks(queries, size=8):
    """Mask logits where query k owns the columns listed for it."""
    masks = torch.full((len(queries), size, size), -5.0)
    for k, columns in enumerate(queries):
        masks[k, :, columns] = 5.0
    return masks


def test_panoptic_keeps_confident_queries_and_merges_stuff():
    # classes: 1 (thing), 6 and 7 (stuff), no-object = column 8
    big = 10.0
    logits = np.full((5, 9), -big)
    logits[0, 1] = big       # thing, confident
    logits[1, 6] = big       # stuff 6
    logits[2, 6] = big       # stuff 6 again: merged into query 1
    logits[3] = 0.0
    logits[3, 7] = 2.0       # stuff 7 but not confident (softmax e^2 / (e^2 + 8) = 0.48 < 0.85)
    logits[4, 8] = big       # no object
    masks = _column_masks([[0, 1], [2, 3, 4], [5, 6], [7], [7]])
    masks[1, :, 5:7] = 0.0  # query 1 is second best where its duplicate wins
    result, = PostProcessPanoptic(STUFF_IDS)(_outputs(logits, masks), torch.tensor([[8, 8]]))
    segments, info = result["segments"], result["segments_info"]
    # DETR's passes: query 2's pixels merge into query 1 (same stuff class), leaving query 2 without area; it is
    # dropped as small and the map recomputed without it, where query 1 is the best of the rest on its columns.
    # Queries 3 (not confident) and 4 (no object) make no segment; column 7 goes to the first of the tied -5s.
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(1, 1, True), (2, 6, False)]
    assert segments[:, :2].eq(1).all() and segments[:, 2:7].eq(2).all() and segments[:, 7].eq(1).all()
    assert [s["area"] for s in info] == [24, 40]


def test_panoptic_drops_small_segments_and_recomputes():
    big = 10.0
    logits = np.full((3, 9), -big)
    logits[:, 1] = big
    masks = _column_masks([[0, 1, 2], [3], [4, 5, 6, 7]])
    masks[1, 4:, 3] = -5.0  # query 1 owns 4 pixels: dropped (<= 4), its pixels go to the next best
    masks[0, :, 3] = 1.0
    result, = PostProcessPanoptic(STUFF_IDS)(_outputs(logits, masks), torch.tensor([[8, 8]]))
    assert [s["area"] for s in result["segments_info"]] == [32, 32]
    assert result["segments"][:, :4].eq(1).all() and result["segments"][:, 4:].eq(2).all()


def test_panoptic_output_size_uses_nearest_resizing_and_empty_is_void():
    big = 10.0
    logits = np.full((2, 9), -big)
    logits[0, 1] = logits[1, 6] = big
    masks = _column_masks([[0, 1, 2, 3], [4, 5, 6, 7]])
    result, = PostProcessPanoptic(STUFF_IDS)(_outputs(logits, masks), torch.tensor([[8, 8]]),
                                                 torch.tensor([[16, 4]]))
    assert result["segments"].shape == (16, 4)
    assert result["segments"][:, :2].eq(1).all() and result["segments"][:, 2:].eq(2).all()
    logits[:, 8] = 2 * big  # nothing confident: every pixel VOID, no segment
    result, = PostProcessPanoptic(STUFF_IDS)(_outputs(logits, masks), torch.tensor([[8, 8]]))
    assert result["segments_info"] == [] and result["segments"].eq(0).all()


def test_focal_panoptic_rule_is_the_best_real_class_sigmoid():
    logits = np.full((3, 9), -6.0)
    logits[0, 2] = 0.5   # sigmoid 0.62 > 0.5: kept as class 2
    logits[1, 6] = -0.5  # sigmoid 0.38: dropped
    logits[2, 8] = 6.0   # the no-object column never makes a segment under focal
    masks = _column_masks([[0, 1, 2, 3], [4, 5], [6, 7]])
    result, = PostProcessPanoptic(STUFF_IDS, cls_loss="focal")(_outputs(logits, masks), torch.tensor([[8, 8]]))
    assert [(s["category_id"], s["area"]) for s in result["segments_info"]] == [(2, 64)]
    strict, = PostProcessPanoptic(STUFF_IDS, threshold=0.7, cls_loss="focal")(
        _outputs(logits, masks), torch.tensor([[8, 8]]))
    assert strict["segments_info"] == []
