"""Bad input to the COCO loader: missing paths and files, unreadable annotations, corrupt images, images without
annotations, degenerate and crowd boxes, category ids beyond --num_classes, --masks. Each says which file and what
to do (util.errors.UserError)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from datasets import build_dataset, num_classes_for
from datasets.coco import CocoDetection
from datasets.synthetic import dataset_name
from tests.synthetic_set import N_TRAIN, N_VAL, SEED, SIZE, dataset_args, load_json, xyxy
from tests.synthetic_set import synth  # noqa: F401 (a fixture)
from util.errors import UserError


@pytest.fixture
def coco_root(synth, tmp_path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(synth, root)
    return root


def _edit_json(path: Path, edit) -> None:
    data = load_json(path)
    edit(data)
    path.write_text(json.dumps(data))


def _coco_args(root, **overrides):
    return dataset_args(**{"dataset_file": "coco", "coco_path": str(root), "num_classes": 5, **overrides})


@pytest.mark.quick
def test_missing_coco_path(tmp_path):
    with pytest.raises(UserError, match="--coco_path"):
        build_dataset("val", _coco_args(None))
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="--coco_path") as err:
        build_dataset("val", _coco_args(missing))
    assert str(missing) in str(err.value) and "train2017/" in str(err.value)


def test_missing_image_folder(coco_root):
    shutil.rmtree(coco_root / "val2017")
    with pytest.raises(UserError) as err:
        build_dataset("val", _coco_args(coco_root))
    assert str(coco_root / "val2017") in str(err.value)


def test_missing_annotation_file(coco_root):
    (coco_root / "annotations/instances_train2017.json").unlink()
    with pytest.raises(UserError) as err:
        build_dataset("train", _coco_args(coco_root))
    assert str(coco_root / "annotations/instances_train2017.json") in str(err.value)


def test_unreadable_annotation_file(coco_root):
    ann_file = coco_root / "annotations/instances_val2017.json"
    ann_file.write_text("{not json")
    with pytest.raises(UserError) as err:
        build_dataset("val", _coco_args(coco_root))
    assert str(ann_file) in str(err.value)


def test_corrupt_image_error_and_skip(coco_root, capsys):
    bad = coco_root / "val2017" / "000002.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = build_dataset("val", _coco_args(coco_root))
    assert ds.ids[1] == 2
    with pytest.raises(UserError) as err:
        ds[1]
    assert str(bad) in str(err.value) and "--skip_bad_images" in str(err.value)

    ds = build_dataset("val", _coco_args(coco_root, skip_bad_images=True))
    capsys.readouterr()
    _, target = ds[1]
    assert int(target["image_id"]) == ds.ids[2]      # the next index's item, deterministically
    _, target = ds[1]
    assert int(target["image_id"]) == ds.ids[2]
    assert ds.num_bad_images_skipped == 2
    warnings = capsys.readouterr().err
    assert str(bad) in warnings and "2 skips so far" in warnings
    assert int(ds[0][1]["image_id"]) == ds.ids[0]


def test_image_without_annotations_is_a_negative(coco_root):
    ann_file = coco_root / "annotations/instances_val2017.json"
    _edit_json(ann_file, lambda d: d.__setitem__(
        "annotations", [a for a in d["annotations"] if a["image_id"] != 1]))
    ds = build_dataset("val", _coco_args(coco_root))
    assert len(ds) == N_VAL
    img, target = ds[0]
    assert int(target["image_id"]) == 1
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert img.shape == (3, 800, 800)           # COCO's val transform: shorter side 800


def test_degenerate_and_crowd_boxes_dropped_and_counted(coco_root, capsys):
    ann_file = coco_root / "annotations/instances_val2017.json"

    def edit(d):
        extra = [([10.0, 10.0, 0.0, 5.0], 0),        # zero width
                 ([SIZE + 5.0, 3.0, 10.0, 10.0], 0),  # entirely right of the image
                 ([-8.0, 4.0, 20.0, 10.0], 0),        # partly outside: clipped, kept
                 ([5.0, 5.0, 20.0, 20.0], 1)]         # crowd: not a training target
        next_id = max(a["id"] for a in d["annotations"]) + 1
        for k, (bbox, crowd) in enumerate(extra):
            d["annotations"].append({"id": next_id + k, "image_id": 1, "category_id": 2, "bbox": bbox,
                                     "area": bbox[2] * bbox[3], "iscrowd": crowd})
    original = [a for a in load_json(ann_file)["annotations"] if a["image_id"] == 1]
    _edit_json(ann_file, edit)
    capsys.readouterr()
    ds = CocoDetection(coco_root / "val2017", ann_file, num_classes=5)
    assert ds.num_degenerate_dropped == 2
    err = capsys.readouterr().err
    assert f"{ann_file}: 2 boxes with w <= 0 or h <= 0 once clipped to their image, dropped" in err
    assert "dropped from training and from the evaluation ground truth alike" in err
    # the evaluation ground truth (the same parsed object) no longer holds them either
    assert [a["bbox"] for a in ds.coco.imgToAnns[1]][-2:] == [[-8.0, 4.0, 20.0, 10.0], [5.0, 5.0, 20.0, 20.0]]
    assert ds.ids[0] == 1
    _, target = ds[0]                           # no transforms: absolute xyxy boxes
    expected = [xyxy(a["bbox"]) for a in original] + [[0.0, 4.0, 12.0, 14.0]]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [a["category_id"] for a in original] + [2]
    assert target["iscrowd"].tolist() == [0] * len(expected)


def test_category_id_beyond_num_classes(coco_root):
    ann_file = coco_root / "annotations/instances_val2017.json"
    def edit(d):
        d["annotations"][0]["category_id"] = 99
        d["categories"].append({"id": 99, "name": "listed, beyond --num_classes"})
    _edit_json(ann_file, edit)
    with pytest.raises(UserError) as err:
        build_dataset("val", _coco_args(coco_root))
    message = str(err.value)
    assert str(ann_file) in message and "99" in message and "--num_classes" in message
    assert len(build_dataset("val", _coco_args(coco_root, num_classes=100))) == N_VAL


def test_masks_rejected_and_num_classes_defaults(tmp_path):
    with pytest.raises(UserError, match="--masks"):
        build_dataset("train", dataset_args(masks=True, synthetic_root=str(tmp_path)))
    with pytest.raises(UserError, match="--coco_path"):   # COCO's count is read from its annotation file
        num_classes_for(dataset_args(dataset_file="coco"))
    assert num_classes_for(dataset_args(num_classes=7)) == 7
    # The synthetic count comes from the data, generated on demand in the given root only.
    assert num_classes_for(dataset_args(synthetic_root=str(tmp_path))) == 5
    assert [p.name for p in tmp_path.iterdir()] == [dataset_name(SEED, N_TRAIN, N_VAL, SIZE)]
