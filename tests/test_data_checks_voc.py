"""The annotation check on Pascal VOC sets (datasets/voc.py converts them to COCO form, checked as a COCO file is):
every unknown class and every missing image is listed, not only the first; a box outside its image is dropped from
training and from the evaluation ground truth alike."""
import pytest
import torch

import main
from datasets.coco_eval import CocoEvaluator
from datasets.voc import VocDetection
from tests.test_voc import write_devkit

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4", "--num_queries", "6", "--batch_size", "2",
        "--device", "cpu", "--num_workers", "0", "--fixed_size", "64"]
# VOC corners (1-based, inclusive): (name, (xmin, ymin, xmax, ymax), difficult, truncated)
IMAGES = {
    "a": (48, 32, [("dog", (1, 1, 10, 10), 0, 0)]),
    "b": (48, 32, [("dog", (5, 5, 20, 20), 0, 0), ("cat", (25, 3, 40, 30), 0, 0)]),
    "c": (48, 32, [("cat", (2, 2, 30, 12), 0, 0), ("dog", (60, 5, 70, 20), 0, 0)]),  # the dog lies right of it
}


@pytest.fixture
def devkit(tmp_path):
    return write_devkit(tmp_path / "VOCdevkit", "2007", {"trainval": ["a"], "test": ["b", "c"]}, IMAGES)


def _eval(capsys, devkit):
    capsys.readouterr()
    code = main.cli([*TINY, "--eval", "--eval_untrained", "--dataset_file", "voc", "--voc_path", str(devkit),
                     "--voc_val", "2007-test", "--voc_classes", "cat,dog"])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_every_unknown_class_name_is_listed_in_one_line(devkit, capsys):
    for stem in ("b", "c"):
        xml = devkit / f"VOC2007/Annotations/{stem}.xml"
        xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>dgo</name>"))
    code, out, err = _eval(capsys, devkit)
    assert code == 2 and "number of params" not in out and len(err) == 1
    annotations = devkit / "VOC2007/Annotations"
    assert err[0] == (f"error: {devkit}/VOC2007/ImageSets/Main/test.txt: 2 objects of an unknown class "
                      f"({annotations}/b.xml: 'dgo', {annotations}/c.xml: 'dgo'); known: cat, dog; set the list "
                      f"with --voc_classes")


def test_every_missing_image_is_listed_in_one_line(devkit, capsys):
    images = devkit / "VOC2007/JPEGImages"
    for stem in ("b", "c"):
        (images / f"{stem}.jpg").unlink()
    code, out, err = _eval(capsys, devkit)
    assert code == 2 and "number of params" not in out and len(err) == 1
    assert err[0] == (f"error: {devkit}/VOC2007/ImageSets/Main/test.txt: 2 listed images without a JPEGImages file "
                      f"(b: {images}/b.jpg, c: {images}/c.jpg); restore the images or remove them from the image "
                      f"set files")


@pytest.mark.quick
def test_box_outside_the_image_is_dropped_from_training_and_evaluation(devkit, capsys):
    capsys.readouterr()
    dataset = VocDetection(devkit, [("2007", "test")], ("cat", "dog"), num_classes=3)
    assert (f"warning: {devkit}/VOC2007/ImageSets/Main/test.txt: 1 boxes with w <= 0 or h <= 0 once clipped to "
            f"their image, dropped ({devkit}/VOC2007/Annotations/c.xml); dropped from training and from the "
            f"evaluation ground truth alike") in capsys.readouterr().err
    evaluator = CocoEvaluator(dataset.coco)
    for image_id in dataset.ids:
        target = dataset._target(image_id)  # what training teaches
        evaluator.update({image_id: {"boxes": target["boxes"], "labels": target["labels"],
                                     "scores": torch.ones(len(target["labels"]))}})
    evaluator.accumulate()
    assert evaluator.stats[0] == 1.0 and len(dataset.coco.dataset["annotations"]) == 3
