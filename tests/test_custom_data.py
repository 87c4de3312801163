"""Any COCO-format set and split: custom file names, split-only evaluation, num_classes from the data."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

import main
from datasets import build_dataset, num_classes_for
from datasets.synthetic import ensure_synthetic
from util.errors import UserError

# one intra-op thread: tiny models on a loaded 2-core machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4", "--num_queries", "6", "--batch_size", "2",
        "--device", "cpu", "--num_workers", "0", "--fixed_size", "64"]   # 64 px, not DETR's 800
# COCO 2017's 80 category ids (1..90 with gaps)
COCO_2017_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=2, train_size=6, val_size=4, image_size=64)


@pytest.fixture
def custom(synth, tmp_path) -> Path:
    """The synthetic set under names of its own: pics_train/ pics_val/ labels/{my_train,my_val}.json."""
    shutil.copytree(synth / "train2017", tmp_path / "pics_train")
    shutil.copytree(synth / "val2017", tmp_path / "pics_val")
    (tmp_path / "labels").mkdir()
    shutil.copy(synth / "annotations/instances_train2017.json", tmp_path / "labels/my_train.json")
    shutil.copy(synth / "annotations/instances_val2017.json", tmp_path / "labels/my_val.json")
    return tmp_path


def _args(**flags):
    return argparse.Namespace(**{"dataset_file": "coco", "coco_path": None, "num_classes": None, "masks": False,
                                 "eval": False, "train_images": None, "train_ann": None, "val_images": None,
                                 "val_ann": None, **flags})


def _write_categories(path: Path, ids, annotation_ids=()):
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": [0, 0, 2, 2], "area": 4,
                         "iscrowd": 0} for k, c in enumerate(annotation_ids)],
        "categories": [{"id": i, "name": f"c{i}"} for i in ids]}))


@pytest.mark.quick
def test_num_classes_is_largest_category_id_plus_one_and_printed(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "four.json"
    _write_categories(ann, [3, 7], annotation_ids=[3])
    assert num_classes_for(_args(train_images=tmp_path / "imgs", train_ann=ann)) == 8
    assert f"num_classes 8: largest category id 7 in {ann}, plus 1" in capsys.readouterr().out
    # an annotation's id beyond the category list is an error of the file (docs/data-checks.md), not a class
    _write_categories(ann, [1, 2], annotation_ids=[5])
    with pytest.raises(UserError, match=r"category ids used by annotations but not in 'categories' \(category 5"):
        num_classes_for(_args(train_images=tmp_path / "imgs", train_ann=ann))
    # COCO 2017 stays DETR's 91
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    _write_categories(coco / "annotations/instances_train2017.json", COCO_2017_IDS)
    assert num_classes_for(_args(coco_path=coco)) == 91
    # under --eval the evaluated split decides: no training files are needed
    _write_categories(ann, [1, 2, 5], annotation_ids=[5])
    assert num_classes_for(_args(eval=True, val_images=tmp_path / "imgs", val_ann=ann)) == 6
    assert num_classes_for(_args(num_classes=3, val_images=tmp_path / "imgs", val_ann=ann)) == 3


def test_ids_beyond_an_explicit_num_classes_are_one_line_naming_the_file(custom, capsys):
    argv = [*TINY, "--train_images", str(custom / "pics_train"), "--train_ann", str(custom / "labels/my_train.json"),
            "--val_images", str(custom / "pics_val"), "--val_ann", str(custom / "labels/my_val.json"),
            "--num_classes", "3", "--epochs", "1", "--output_dir", str(custom / "run")]
    capsys.readouterr()
    assert main.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(custom / "labels/my_val.json") in err
    assert "--num_classes is 3" in err and "--num_classes 5" in err


def test_missing_parts_name_the_flags(custom):
    with pytest.raises(UserError, match="--coco_path is required .* unless --val_images and --val_ann"):
        build_dataset("val", _args(val_ann=custom / "labels/my_val.json", num_classes=5))
    with pytest.raises(UserError, match=f"annotation file {custom}/nope.json not found"):
        build_dataset("val", _args(val_images=custom / "pics_val", val_ann=custom / "nope.json", num_classes=5))


@pytest.mark.parametrize("argv, message", [
    (["--dataset_file", "synthetic", "--val_ann", "x.json"], "--val_ann names part of a COCO-format set"),
    (["--coco_path", "c", "--voc_path", "v"], "--voc_path and --coco_path name two datasets"),
    (["--voc_classes", "a,b"], "--voc_classes needs --dataset_file voc"),
    (["--dataset_file", "coco", "--synthetic_format", "voc"], "--synthetic_format voc needs --dataset_file synthetic"),
    (["--mosaic", "1.5"], "argument --mosaic: must be a finite number in [0, 1], got '1.5'"),
    (["--fixed_size", "800y1333"], "expected N or HxW"),
])
@pytest.mark.quick
def test_dataset_flag_combinations_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.cli([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_custom_names_train_and_split_only_eval(custom, synth, capsys):
    """Training from custom file names only; then --eval scores exactly the split the val pair names."""
    run = custom / "run"
    capsys.readouterr()
    assert main.cli([*TINY, "--train_images", str(custom / "pics_train"),
                     "--train_ann", str(custom / "labels/my_train.json"), "--val_images", str(custom / "pics_val"),
                     "--val_ann", str(custom / "labels/my_val.json"), "--epochs", "1", "--max_iters_per_epoch", "1",
                     "--output_dir", str(run)]) == 0
    assert f"num_classes 5: largest category id 4 in {custom}/labels/my_train.json" in capsys.readouterr().out
    shutil.rmtree(custom / "pics_train")     # evaluation needs no training files

    def evaluate(name, *flags):
        out = custom / name
        assert main.cli(["--eval", "--resume", str(run / "checkpoint.pth"), "--batch_size", "2", "--device", "cpu",
                         "--num_workers", "0", "--fixed_size", "64", "--output_dir", str(out), *flags]) == 0
        stats = json.loads((out / "eval.json").read_text())
        return {k: v for k, v in stats.items() if not k.startswith("time_")}  # wall-clock times differ per run

    standard = evaluate("standard", "--coco_path", str(synth))   # val2017/ + instances_val2017.json
    named = evaluate("named", "--val_images", str(custom / "pics_val"), "--val_ann", str(custom / "labels/my_val.json"))
    assert named == standard
    # override only the annotation file: two of the four images, read from --coco_path's val2017/
    data = json.loads((custom / "labels/my_val.json").read_text())
    keep = {image["id"] for image in data["images"][:2]}
    data["images"] = [image for image in data["images"] if image["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    (custom / "labels/test_split.json").write_text(json.dumps(data))
    capsys.readouterr()
    split = evaluate("split", "--coco_path", str(synth), "--val_ann", str(custom / "labels/test_split.json"))
    assert split != standard and "Test: [0/1]" in capsys.readouterr().out   # 2 images, batch 2
