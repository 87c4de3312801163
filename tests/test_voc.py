"""Pascal VOC: XML reading, the devkit's AP (both definitions) against hand-computed cases, the synthetic
VOC layout, bad input, and a synthetic VOC train + eval through main.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from datasets.coco import CocoDetection
from datasets.synthetic import CATEGORIES, ensure_synthetic
from datasets.voc import VOC_CLASSES, VocDetection, class_list, load_voc, parse_voc_xml
from datasets.voc_eval import VocEvaluator, class_recall_precision, voc_ap
from util.errors import UserError

# one intra-op thread: tiny models on a loaded 2-core machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "2", "--nheads", "4", "--num_queries", "10", "--batch_size", "2",
        "--device", "cpu", "--num_workers", "0", "--log_every", "1"]


def _xml(stem, width, height, objects, size=True) -> str:
    """A VOC annotation written by hand; objects: (name, (xmin, ymin, xmax, ymax), difficult, truncated),
    None for a flag leaves its tag out."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult, truncated in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose>")
        if truncated is not None:
            parts.append(f"<truncated>{truncated}</truncated>")
        if difficult is not None:
            parts.append(f"<difficult>{difficult}</difficult>")
        parts.append(f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
                     f"</object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_devkit(root: Path, year: str, sets: dict, images: dict) -> Path:
    """VOCdevkit/VOC<year> with ``images`` {stem: (width, height, objects)} and ImageSets ``sets``
    {name: [stems]}; images are random pixels of the given size."""
    year_dir = root / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (year_dir / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, (width, height, objects) in images.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            year_dir / "JPEGImages" / f"{stem}.jpg")
        (year_dir / "Annotations" / f"{stem}.xml").write_text(_xml(stem, width, height, objects))
    for name, stems in sets.items():
        (year_dir / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


# the AP scenario, one class ('dog'); boxes as VOC corners (1-based, inclusive)
# image a: G1, G2 and a difficult D; image b: G3, G4
SCENARIO = {
    "a": (60, 20, [("dog", (1, 1, 10, 10), 0, 0), ("dog", (21, 1, 30, 10), 0, None),
                   ("dog", (41, 1, 50, 10), 1, 1)]),
    "b": (60, 20, [("dog", (1, 1, 10, 10), 0, 1), ("dog", (21, 1, 30, 10), None, 0)]),
}
# detections (image, score, continuous xyxy) and what the devkit's rules make of each
DETECTIONS = [
    ("a", 0.95, (0, 0, 10, 10)),    # G1 exactly: TP
    ("a", 0.90, (41, 0, 51, 10)),   # IoU 9/11 with the difficult D: ignored
    ("a", 0.85, (1, 0, 11, 10)),    # IoU 9/11 with G1, already taken: FP (duplicate)
    ("b", 0.80, (0, 0, 10, 10)),    # G3: TP
    ("a", 0.70, (20, 0, 30, 10)),   # G2: TP
    ("b", 0.60, (26, 0, 36, 10)),   # IoU 4/16 with G4, below 0.5: FP; G4 is never found
]
# TP, FP, TP, TP, FP over 4 non-difficult boxes: recall .25 .25 .5 .75 .75, precision 1 .5 2/3 .75 .6
# 11-point: t = 0, .1, .2 -> 1; t = .3 ... .7 -> .75; t = .8 ... 1 -> 0: (3 + 5 * .75) / 11
# area: precision made non-increasing 1, .75, .75, .75; .25 * 1 + .25 * .75 + .25 * .75 + .25 * 0
EXPECTED_11POINT = (3 + 5 * 0.75) / 11
EXPECTED_AREA = 0.625


# ---------------------------------------------------------------- XML

def test_parse_voc_xml_corners_difficult_truncated(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(_xml("x", 500, 375, [("dog", (48, 240, 195, 371), 0, 1), ("person", (8, 12, 352, 498), 1, 0),
                                         ("cat", ("10.5", 20, 30, 40), None, None)]))
    record = parse_voc_xml(path, VOC_CLASSES)
    assert (record.width, record.height) == (500, 375)
    assert [(o.name, o.box, o.difficult, o.truncated) for o in record.objects] == [
        ("dog", (47.0, 239.0, 195.0, 371.0), False, True),     # 1-based inclusive -> continuous: x1 - 1
        ("person", (7.0, 11.0, 352.0, 498.0), True, False),
        ("cat", (9.5, 19.0, 30.0, 40.0), False, False),        # missing tags: not difficult, not truncated
    ]
    path.write_text(_xml("x", 0, 0, [], size=False))
    assert parse_voc_xml(path, VOC_CLASSES).width is None


def test_voc_dataset_targets_and_ground_truth(tmp_path):
    root = write_devkit(tmp_path / "VOCdevkit", "2007", {"trainval": ["a", "b"]}, SCENARIO)
    ds = VocDetection(root, [("2007", "trainval")], ("cat", "dog"))
    assert ds.class_names == {1: "cat", 2: "dog"}
    assert ds.ids == [1, 2] and ds.coco.imgs[1]["file_name"] == "VOC2007/JPEGImages/a.jpg"
    img, target = ds[0]                       # no transforms: absolute xyxy, the difficult D left out
    assert img.size == (60, 20)
    assert target["boxes"].tolist() == [[0, 0, 10, 10], [20, 0, 30, 10]]
    assert target["labels"].tolist() == [2, 2]
    keep = VocDetection(root, [("2007", "trainval")], ("cat", "dog"), keep_difficult=True)
    assert keep[0][1]["boxes"].tolist() == [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    # the evaluated ground truth keeps D, marked difficult and crowd (COCO's 'ignore')
    d = [a for a in ds.coco.dataset["annotations"] if a["difficult"]]
    assert len(d) == 1 and d[0]["iscrowd"] == 1 and d[0]["bbox"] == [40, 0, 10, 10] and d[0]["truncated"] == 1
    assert [a["iscrowd"] for a in keep.coco.dataset["annotations"]] == [0] * 5


def test_size_missing_from_the_xml_comes_from_the_image(tmp_path):
    root = write_devkit(tmp_path / "VOCdevkit", "2007", {"test": ["a"]}, {"a": (37, 21, [])})
    (root / "VOC2007/Annotations/a.xml").write_text(_xml("a", 0, 0, [("dog", (2, 2, 9, 9), 0, 0)], size=False))
    coco = load_voc(root, [("2007", "test")], VOC_CLASSES)
    assert (coco.imgs[1]["width"], coco.imgs[1]["height"]) == (37, 21)


# ---------------------------------------------------------------- AP

def test_voc_ap_hand_computed_scenario(tmp_path):
    root = write_devkit(tmp_path / "VOCdevkit", "2007", {"test": ["a", "b"]}, SCENARIO)
    coco = load_voc(root, [("2007", "test")], ("cat", "dog"))
    image_id = {Path(im["file_name"]).stem: im["id"] for im in coco.dataset["images"]}
    evaluator = VocEvaluator(coco)
    for stem in ("a", "b"):
        mine = [d for d in DETECTIONS if d[0] == stem]
        evaluator.update({image_id[stem]: {"scores": torch.tensor([d[1] for d in mine]),
                                           "labels": torch.full((len(mine),), 2),
                                           "boxes": torch.tensor([d[2] for d in mine], dtype=torch.float32)}})
    aps = evaluator.average_precisions()
    assert aps[2]["objects"] == 4
    assert aps[2]["11point"] == pytest.approx(EXPECTED_11POINT, abs=1e-12)
    assert aps[2]["area"] == pytest.approx(EXPECTED_AREA, abs=1e-12)
    assert aps[1] == {"11point": -1.0, "area": -1.0, "objects": 0}   # no cat anywhere: no AP
    stats = evaluator.summarize()
    # the mean is over classes with ground truth only
    assert stats["voc_mAP50_11point"] == pytest.approx(EXPECTED_11POINT)
    assert stats["voc_mAP50_area"] == pytest.approx(EXPECTED_AREA)
    assert stats["voc_AP50_per_class"]["cat"] == {"11point": -1.0, "area": -1.0}


@pytest.mark.quick
def test_voc_ap_definitions_small_cases():
    # the devkit's 11 thresholds are 0:0.1:1, so t = 3 * 0.1 lies just above a recall of 3/10
    assert voc_ap([0.1, 0.2, 0.3], [1, 1, 1], "11point") == pytest.approx(3 / 11)
    assert voc_ap([0.1, 0.2, 0.3], [1, 1, 1], "area") == pytest.approx(0.3)
    # one detection, one box found of two: 11-point counts t = 0 .. 0.5
    assert voc_ap([0.5], [1.0], "11point") == pytest.approx(6 / 11)
    assert voc_ap([0.5], [1.0], "area") == pytest.approx(0.5)
    # precision rises later: the interpolation lifts the earlier point (area: .5 * 2/3 + .5 * 2/3)
    assert voc_ap([0.0, 0.5, 1.0], [0.0, 0.5, 2 / 3], "area") == pytest.approx(2 / 3)
    assert voc_ap([0.0, 0.5, 1.0], [0.0, 0.5, 2 / 3], "11point") == pytest.approx(2 / 3)
    assert voc_ap([], [], "area") == 0.0 and voc_ap([], [], "11point") == 0.0


@pytest.mark.quick
def test_iou_of_exactly_half_is_a_match_and_ties_keep_input_order():
    gt = {1: (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([False]))}
    # IoU 100 / 200 = 0.5 exactly: the devkit's '>=' counts it
    recall, precision, n_pos = class_recall_precision([1], [0.9], [[0.0, 0.0, 10.0, 20.0]], gt)
    assert n_pos == 1 and recall.tolist() == [1.0] and precision.tolist() == [1.0]
    # equal scores keep their input order (a stable sort): a false positive listed first stays first
    recall, precision, _ = class_recall_precision([2, 1], [0.5, 0.5], [[0, 0, 10, 10], [0, 0, 10, 10]], gt)
    assert precision.tolist() == [0.0, 0.5] and recall.tolist() == [0.0, 1.0]
    recall, precision, _ = class_recall_precision([1, 2], [0.5, 0.5], [[0, 0, 10, 10], [0, 0, 10, 10]], gt)
    assert precision.tolist() == [1.0, 0.5]


# ---------------------------------------------------------------- synthetic VOC layout

def test_synthetic_voc_layout_equals_the_coco_one(tmp_path):
    params = dict(seed=5, train_size=6, val_size=4, image_size=64)
    coco_root = ensure_synthetic(tmp_path, **params)
    voc_root = ensure_synthetic(tmp_path, fmt="voc", **params)
    assert voc_root.name == coco_root.name + "-voc"
    names = tuple(name for _, name, _ in CATEGORIES)
    for split in ("train", "val"):
        coco = CocoDetection(coco_root / f"{split}2017", coco_root / f"annotations/instances_{split}2017.json")
        voc = VocDetection(voc_root, [("shapes", split)], names)
        assert len(voc) == len(coco) == params[f"{split}_size"]
        for i in range(len(coco)):
            file_name = coco.coco.imgs[coco.ids[i]]["file_name"]
            voc_file = voc.coco.imgs[voc.ids[i]]["file_name"]
            assert (voc_root / voc_file).read_bytes() == (coco_root / f"{split}2017" / file_name).read_bytes()
            (_, a), (_, b) = coco[i], voc[i]
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


# ---------------------------------------------------------------- bad input: one line naming the file

def _cli_error(capsys, argv):
    capsys.readouterr()
    assert main.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    return err


@pytest.fixture
def devkit(tmp_path):
    return write_devkit(tmp_path / "VOCdevkit", "2007", {"trainval": ["a"], "test": ["b"]}, SCENARIO)


def _voc_argv(devkit, out):
    return [*TINY, "--dataset_file", "voc", "--voc_path", str(devkit), "--voc_train", "2007-trainval",
            "--voc_val", "2007-test", "--voc_classes", "cat,dog", "--epochs", "1", "--output_dir", str(out)]


def test_missing_xml(devkit, tmp_path, capsys):
    missing = devkit / "VOC2007/Annotations/a.xml"
    missing.unlink()
    err = _cli_error(capsys, _voc_argv(devkit, tmp_path / "out"))
    assert f"annotation file {missing} not found" in err


def test_unknown_class_name(devkit, tmp_path, capsys):
    xml = devkit / "VOC2007/Annotations/b.xml"
    xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>dgo</name>", 1))
    err = _cli_error(capsys, _voc_argv(devkit, tmp_path / "out"))
    assert str(xml) in err and "'dgo'" in err and "--voc_classes" in err
    # the default list is VOC's 20 classes
    with pytest.raises(UserError, match="1 objects of an unknown class .*b.xml: 'dgo'"):
        load_voc(devkit, [("2007", "test")], class_list(None))


def test_image_set_entry_without_image(devkit, tmp_path, capsys):
    (devkit / "VOC2007/ImageSets/Main/test.txt").write_text("b\nc\n")
    err = _cli_error(capsys, _voc_argv(devkit, tmp_path / "out"))
    assert f"{devkit}/VOC2007/ImageSets/Main/test.txt: 1 listed images without a JPEGImages file" in err
    assert f"(c: {devkit}/VOC2007/JPEGImages/c.jpg)" in err


def test_missing_image_set_file_and_bad_entries(devkit, tmp_path, capsys):
    err = _cli_error(capsys, [*_voc_argv(devkit, tmp_path / "out"), "--voc_val", "2007-val"])
    assert f"{devkit}/VOC2007/ImageSets/Main/val.txt not found" in err
    err = _cli_error(capsys, [*_voc_argv(devkit, tmp_path / "out"), "--voc_val", "test"])
    assert "--voc_val entry 'test' must be YEAR-SET" in err
    (devkit / "VOC2007/ImageSets/Main/test.txt").write_text("b\nb\n")
    err = _cli_error(capsys, _voc_argv(devkit, tmp_path / "out"))
    assert "test.txt lists VOC2007 image b, already listed" in err


# ---------------------------------------------------------------- train + eval through main.py

def test_synthetic_voc_train_and_eval_print_both_metrics(tmp_path, capsys):
    """--synthetic_format voc trains and prints the VOC table (both definitions) and the COCO summary; the
    checkpoint then evaluates the same files through --dataset_file voc, with the same numbers at 1 and 4
    images per batch (--fixed_size)."""
    synthetic = ["--synthetic_root", str(tmp_path / "synthetic"), "--synthetic_train_size", "8",
                 "--synthetic_val_size", "4", "--synthetic_image_size", "64"]
    run = tmp_path / "run"
    capsys.readouterr()
    assert main.cli([*TINY, *synthetic, "--dataset_file", "synthetic", "--synthetic_format", "voc",
                     "--fixed_size", "64", "--mosaic", "0.5", "--epochs", "1", "--max_iters_per_epoch", "2",
                     "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "num_classes 5: 4 VOC-layout classes" in out
    assert "VOC metric: AP at IoU >= 0.5, difficult objects ignored (4 images)" in out
    assert "AP50 11-point (VOC07)" in out and "AP50 area (VOC10+)" in out
    for name in ("square", "circle", "triangle", "diamond", "mean"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    last = json.loads((run / "log.txt").read_text().splitlines()[-1])
    for key in ("test_voc_mAP50_11point", "test_voc_mAP50_area"):
        assert 0.0 <= last[key] <= 1.0
    assert set(last["test_voc_AP50_per_class"]) == {"square", "circle", "triangle", "diamond"}
    assert len(last["test_coco_eval_bbox"]) == 12
    finished = json.loads((run / "finished.json").read_text())
    assert finished["metrics"]["voc_mAP50_area"] == last["test_voc_mAP50_area"]

    devkit = next((tmp_path / "synthetic").glob("*-voc"))
    results = []
    for batch_size in ("1", "4"):
        out_dir = tmp_path / f"eval{batch_size}"
        assert main.cli(["--eval", "--resume", str(run / "checkpoint.pth"), "--dataset_file", "voc",
                         "--voc_path", str(devkit), "--voc_val", "shapes-val", "--voc_classes",
                         "square,circle,triangle,diamond", "--fixed_size", "64", "--batch_size", batch_size,
                         "--device", "cpu", "--num_workers", "0", "--output_dir", str(out_dir)]) == 0
        results.append(json.loads((out_dir / "eval.json").read_text()))
    assert "VOC metric" in capsys.readouterr().out
    for key in ("voc_mAP50_11point", "voc_mAP50_area", "voc_AP50_per_class", "coco_eval_bbox"):
        assert results[0][key] == results[1][key] == last[f"test_{key}"], key
