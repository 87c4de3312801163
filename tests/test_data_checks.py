"""The annotation check (datasets/check.py, docs/data-checks.md) on COCO-format files, one test per fault: the run
stops before the model is built with one line per finding, or repairs the file the same way for training and for
the evaluation ground truth (perfect predictions then score AP 1.000 through the real evaluator)."""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import CocoEvaluator
from datasets.synthetic import ensure_synthetic
from datasets.synthetic_panoptic import ensure_synthetic_panoptic

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4", "--num_queries", "6", "--batch_size", "2",
        "--device", "cpu", "--num_workers", "0", "--fixed_size", "64"]
SIZE = 64


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), seed=3, train_size=4, val_size=16, image_size=SIZE)


@pytest.fixture
def val(synth, tmp_path):
    """(image folder, annotation file, its content) of a private copy of the validation split."""
    shutil.copytree(synth / "val2017", tmp_path / "pics")
    ann = tmp_path / "val.json"
    shutil.copy(synth / "annotations/instances_val2017.json", ann)
    return tmp_path / "pics", ann, json.loads(ann.read_text())


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def _run_eval(capsys, pics, ann, *flags):
    """main.py --eval of the untrained tiny model on the split: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    code = main.cli([*TINY, "--eval", "--eval_untrained", "--val_images", str(pics), "--val_ann", str(ann), *flags])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _refused(capsys, pics, ann, *flags, lines: int = 1):
    """The run exits 2 before any model is built, with one line per finding; returns the line (or lines)."""
    code, out, err = _run_eval(capsys, pics, ann, *flags)
    assert code == 2 and "number of params" not in out, (code, err)
    assert len(err) == lines and all(line.startswith(f"error: {ann}: ") for line in err), err
    return err[0] if lines == 1 else err


def _args(pics, ann):
    return argparse.Namespace(dataset_file="coco", coco_path=None, num_classes=5, masks=False, eval=True,
                              skip_bad_images=False, train_images=None, train_ann=None, val_images=str(pics),
                              val_ann=str(ann), fixed_size=None, mosaic=0)


def perfect_ap(pics, ann) -> float:
    """AP of predictions equal to the training targets, scored by the real evaluator against the evaluation ground
    truth of the same run's validation set."""
    dataset = build_dataset("val", _args(pics, ann))
    evaluator = CocoEvaluator(get_coco_api_from_dataset(dataset))
    for image_id in dataset.ids:
        target = dataset._target(image_id)  # absolute xyxy, what training teaches
        evaluator.update({image_id: {"boxes": target["boxes"], "labels": target["labels"],
                                     "scores": torch.ones(len(target["labels"]))}})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator.stats[0]


@pytest.mark.quick
def test_category_missing_from_categories_is_refused(val, capsys):
    pics, ann, data = val
    data["categories"] = [c for c in data["categories"] if c["id"] != 4]  # its annotations stay
    _write(ann, data)
    line = _refused(capsys, pics, ann)
    used = [a["id"] for a in data["annotations"] if a["category_id"] == 4]
    assert f"category ids used by annotations but not in 'categories' (category 4: annotations {used[0]}, " in line
    assert "add them to 'categories'" in line


def test_duplicate_image_id_is_refused(val, capsys):
    pics, ann, data = val
    second = data["images"][1]["id"]
    data["images"][1]["id"] = data["images"][0]["id"]
    _write(ann, data)
    ids, orphans = _refused(capsys, pics, ann, lines=2)
    assert f"1 image ids listed more than once ({data['images'][0]['id']}); give each image its own id" in ids
    # the boxes of the image whose id was taken now belong to no image
    stranded = ", ".join(str(a["id"]) for a in data["annotations"] if a["image_id"] == second)
    assert f"annotations whose image_id is not in 'images' ({stranded}); add the images or remove" in orphans


def test_negative_width_box_is_dropped_from_training_and_evaluation(val, capsys):
    pics, ann, data = val
    bad = data["annotations"][3]
    bad["bbox"][2] = -5.0
    _write(ann, data)
    assert perfect_ap(pics, ann) == 1.0
    err = capsys.readouterr().err
    assert (f"warning: {ann}: 1 boxes with w <= 0 or h <= 0 once clipped to their image, dropped ({bad['id']}); "
            f"dropped from training and from the evaluation ground truth alike") in err


def test_duplicate_annotation_id_is_renumbered_for_both(val, capsys):
    pics, ann, data = val
    first, other = data["annotations"][0], data["annotations"][5]
    assert first["image_id"] != other["image_id"]
    other["id"] = first["id"]
    _write(ann, data)
    assert perfect_ap(pics, ann) == 1.0
    new_id = max(a["id"] for a in data["annotations"]) + 1
    assert f"1 annotation ids repeated or missing, renumbered ({first['id']} -> {new_id})" in capsys.readouterr().err


def test_bad_iscrowd_is_refused(val, capsys):
    pics, ann, data = val
    data["annotations"][2]["iscrowd"] = 2
    _write(ann, data)
    line = _refused(capsys, pics, ann)
    assert f"1 annotations with iscrowd other than 0 or 1 ({data['annotations'][2]['id']})" in line


def test_missing_image_file_is_refused_even_with_skip_bad_images(val, capsys):
    pics, ann, data = val
    (pics / data["images"][2]["file_name"]).unlink()
    line = _refused(capsys, pics, ann, "--skip_bad_images")
    assert f"1 image files not found ({data['images'][2]['id']}: {pics / data['images'][2]['file_name']}); " \
           f"restore them under {pics}" in line


def test_duplicate_file_name_is_refused(val, capsys):
    pics, ann, data = val
    data["images"][3]["file_name"] = data["images"][0]["file_name"]
    _write(ann, data)
    line = _refused(capsys, pics, ann)
    ids = f"{data['images'][0]['id']}, {data['images'][3]['id']}"
    assert f"1 file names listed more than once or missing ({data['images'][0]['file_name']} (images {ids}))" in line


def test_wrong_declared_size(val, capsys):
    """Not positive: the run refuses it. Different from the image: the command reads each header and says so."""
    pics, ann, data = val
    data["images"][1]["width"] = 0
    _write(ann, data)
    line = _refused(capsys, pics, ann)
    assert f"1 images without a positive width and height ({data['images'][1]['id']})" in line
    data["images"][1]["width"] = SIZE + 16
    _write(ann, data)
    from datasets import check

    capsys.readouterr()
    assert check.main([str(ann), "--images", str(pics)]) == 1
    out = capsys.readouterr().out
    path = pics / data["images"][1]["file_name"]
    assert (f"  declared sizes match the images: error: 1 images whose size differs from the declared width/height "
            f"({data['images'][1]['id']}: {path} is {SIZE}x{SIZE}, declared {SIZE + 16}x{SIZE})") in out


@pytest.fixture
def panoptic(tmp_path):
    """A private synthetic panoptic set in DETR's layout (usable as --coco_path and --coco_panoptic_path)."""
    return ensure_synthetic_panoptic(tmp_path / "synthetic", seed=4, train_size=2, val_size=4, image_size=SIZE)


def _panoptic_eval(capsys, root):
    capsys.readouterr()
    code = main.cli([*TINY, "--eval", "--eval_untrained", "--masks", "--dataset_file", "coco_panoptic",
                     "--coco_path", str(root), "--coco_panoptic_path", str(root)])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_missing_segmentation_with_masks_is_refused(panoptic, capsys):
    instances = panoptic / "annotations/instances_val2017.json"
    data = json.loads(instances.read_text())
    del data["annotations"][1]["segmentation"]
    _write(instances, data)
    code, out, err = _panoptic_eval(capsys, panoptic)
    assert code == 2 and "number of params" not in out and len(err) == 1
    assert err[0] == (f"error: {instances}: 1 annotations without a segmentation ({data['annotations'][1]['id']}); "
                      f"--masks scores masks against this file: add polygons or RLE masks, or drop --masks")


def test_panoptic_json_faults_are_one_line_each(panoptic, capsys):
    pan = panoptic / "annotations/panoptic_val2017.json"
    data = json.loads(pan.read_text())
    first = data["annotations"][0]
    first["segments_info"][1]["category_id"] = 42
    first["segments_info"][2]["id"] = first["segments_info"][0]["id"]
    (panoptic / "panoptic_val2017" / data["annotations"][1]["file_name"]).unlink()
    _write(pan, data)
    code, out, err = _panoptic_eval(capsys, panoptic)
    assert code == 2 and "number of params" not in out and len(err) == 3, err
    image = first["image_id"]
    assert err[0].startswith(f"error: {pan}: 1 segment PNGs repeated or missing ({panoptic}/panoptic_val2017/")
    assert err[1].startswith(f"error: {pan}: 1 segments whose category is not in 'categories' (image {image} "
                             f"segment {first['segments_info'][1]['id']}: category 42)")
    assert err[2].startswith(f"error: {pan}: 1 segment ids listed twice within an image (image {image} segment "
                             f"{first['segments_info'][0]['id']})")


@pytest.mark.quick
def test_command_summary_exit_codes_and_help_without_torch(val):
    pics, ann, data = val

    def command(*argv):
        return subprocess.run([sys.executable, "-m", "datasets.check", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    result = command(ann, "--images", pics)
    assert result.returncode == 0 and "  image files exist: ok" in result.stdout
    assert result.stdout.strip().endswith("0 error(s), 0 repair(s); a run can use this file")
    data["images"][1]["id"] = data["images"][0]["id"]
    data["annotations"][0]["bbox"][3] = 0.0
    _write(ann, data)
    result = command(ann)
    assert result.returncode == 1
    assert "  image ids unique: error: 1 image ids listed more than once (1); " in result.stdout
    assert (f"  boxes w > 0 and h > 0 after clipping: repaired: 1 boxes with w <= 0 or h <= 0 once clipped to their "
            f"image, dropped ({data['annotations'][0]['id']}); ") in result.stdout
    assert result.stdout.strip().endswith("2 error(s), 1 repair(s); a run refuses this file until the errors are fixed")
    probe = ("import runpy, sys; sys.argv = ['check', '--help']\ntry: runpy.run_module('datasets.check', "
             "run_name='__main__')\nexcept SystemExit: pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "usage: python -m datasets.check" in result.stdout and "torch imported: False" in result.stdout
