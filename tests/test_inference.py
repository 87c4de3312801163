"""The Python API without argparse (build_detr, build_postprocessor, load_detector), class names from datasets into
checkpoints and back, image-only eval transforms, and main.py --eval --save_detections."""
import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets
import flag_checks
import main
from conftest import TINY_TRAIN_FLAGS
from datasets.class_names import COCO_CLASS_NAMES
from datasets.coco import CocoDetection
from datasets.transforms import make_coco_transforms, scaled_coco_transform_params
from inference import load_detector
from tests.cli import run_main
from models import build_detr, build_model, build_postprocessor, detr_kwargs
from util.errors import UserError
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
SHAPES = {1: "square", 2: "circle", 3: "triangle", 4: "diamond"}


def val_folder(synthetic_root: Path) -> Path:
    (folder,) = Path(synthetic_root).glob("shapes-*/val2017")
    return folder


@pytest.mark.parametrize("flags", [{}, {"dynamic_scale": "type3", "head_mixture": True},
                                   {"position_embedding": "learned", "pre_norm": True, "cls_loss": "focal"}],
                         ids=["detr", "type3-head_mixture", "learned-pre_norm-focal"])
def test_build_detr_is_what_build_model_builds(tiny_args, flags):
    """build_model(args) is a translation of the flags: the same seed gives the same weights both ways."""
    args = tiny_args(**flags)
    torch.manual_seed(0)
    from_args = build_model(args)[0].state_dict()
    torch.manual_seed(0)
    direct = build_detr(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                        dim_feedforward=48, num_queries=6, num_classes=9, **flags).state_dict()
    assert from_args.keys() == direct.keys()
    assert all(torch.equal(v, direct[k]) for k, v in from_args.items())
    assert detr_kwargs(vars(args))["cls_loss"] == args.cls_loss


def test_the_api_needs_no_argparse():
    """A notebook: build, run on two images of different sizes, post-process to absolute boxes."""
    torch.manual_seed(0)
    model = build_detr(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                       dim_feedforward=32, num_queries=5, num_classes=3, dynamic_scale="type2").eval()
    postprocessor = build_postprocessor("focal")
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    with torch.no_grad():
        outputs = model(images)
    results = postprocessor(outputs, torch.tensor([[64, 80], [48, 64]]))
    assert outputs["pred_logits"].shape == (2, 5, 4) and outputs["pred_boxes"].shape == (2, 5, 4)
    for r in results:
        assert len(r["scores"]) > 0 and r["boxes"].shape == (len(r["scores"]), 4) and r["labels"].max() < 3
    assert results[0]["boxes"][:, 0::2].max() <= 80 and results[1]["boxes"][:, 1::2].max() <= 48
    with pytest.raises(ValueError, match="cls_loss"):
        build_postprocessor("auto")


def test_coco_detection_has_class_names_from_the_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    ann = {"images": [], "annotations": [],
           "categories": [{"id": 3, "name": "zebra crossing"}, {"id": 7, "name": "bollard"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    assert CocoDetection(tmp_path / "images", tmp_path / "ann.json").class_names == {3: "zebra crossing",
                                                                                     7: "bollard"}


def test_class_names_round_trip_through_a_checkpoint(tiny_checkpoint, tmp_path):
    path, synthetic_root = tiny_checkpoint
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    ann = json.loads((val_folder(synthetic_root).parent / "annotations" / "instances_val2017.json").read_text())
    assert checkpoint["class_names"] == {c["id"]: c["name"] for c in ann["categories"]} == SHAPES
    assert load_detector(str(path)).class_names == SHAPES

    custom = {**checkpoint, "class_names": {1: "cat", 2: "dog", 4: "hamster"}}
    torch.save(custom, tmp_path / "custom.pth")
    assert load_detector(str(tmp_path / "custom.pth")).class_names == {1: "cat", 2: "dog", 4: "hamster"}

    # a checkpoint of this fork from before names were stored: the synthetic set's names are known
    older = {k: v for k, v in checkpoint.items() if k != "class_names"}
    torch.save(older, tmp_path / "older.pth")
    assert load_detector(str(tmp_path / "older.pth")).class_names == SHAPES


def test_load_detector_builds_the_stored_architecture(tiny_checkpoint):
    path, _ = tiny_checkpoint
    detector = load_detector(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in detector.model.state_dict().items())
    assert not detector.model.training
    assert detector.cls_loss == "focal" and type(detector.postprocessor).__name__ == "PostProcessFocal"
    assert detector.config["synthetic_image_size"] == 64 and detector.config["head_mixture"] is True
    with pytest.raises(UserError, match="--nheads 8 conflicts with the checkpoint's 4"):
        load_detector(str(path), nheads=8)


def official_like_checkpoint(path: Path, num_classes: int = 91) -> dict:
    """A checkpoint laid out as DETR's published files: weights and a pickled Namespace, no config, no names."""
    torch.manual_seed(1)
    model = build_detr(backbone="resnet18", hidden_dim=32, enc_layers=1, dec_layers=2, dim_feedforward=40,
                       num_queries=7, num_classes=num_classes)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    return model.state_dict()


def test_official_checkpoint_architecture_from_weights_and_coco_names(tmp_path):
    weights = official_like_checkpoint(tmp_path / "detr-tiny.pth")
    detector = load_detector(str(tmp_path / "detr-tiny.pth"))
    assert all(torch.equal(v, weights[k]) for k, v in detector.model.state_dict().items())
    c = detector.config
    assert (c["backbone"], c["hidden_dim"], c["num_queries"], c["enc_layers"], c["dim_feedforward"]) == \
           ("resnet18", 32, 7, 1, 40)
    assert c["cls_loss"] == "ce" and c["dynamic_scale"] == "none"
    assert detector.class_names == COCO_CLASS_NAMES
    # COCO's validation transform: shorter side 800
    assert detector.transform(Image.new("RGB", (150, 100))).shape == (3, 800, 1200)

    official_like_checkpoint(tmp_path / "other.pth", num_classes=5)
    assert load_detector(str(tmp_path / "other.pth")).class_names is None  # ids only: names cannot be known


def test_segmentation_checkpoint_gives_boxes_and_coco_panoptic_stuff(tmp_path):
    """DETR's panoptic files (the detector under 'detr.', the mask head beside it, no configuration): the whole
    model loads, its box outputs go through the box post-processor as a detector's, and the panoptic
    post-processor takes COCO panoptic's stuff classes (ids 92-200)."""
    torch.manual_seed(2)
    segm = build_detr(backbone="resnet18", hidden_dim=32, enc_layers=1, dec_layers=2, dim_feedforward=40,
                      num_queries=7, num_classes=250, masks=True).eval()
    torch.save({"model": segm.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "detr-panoptic.pth")
    detector = load_detector(str(tmp_path / "detr-panoptic.pth"))
    assert detector.config["masks"] is True and detector.config["num_classes"] == 250
    assert detector.panoptic.stuff_ids == frozenset(range(92, 201))
    assert all(torch.equal(v, segm.state_dict()[k]) for k, v in detector.model.state_dict().items())
    image = Image.new("RGB", (96, 64), (120, 40, 200))
    with torch.no_grad():
        want = segm(nested_tensor_from_tensor_list([detector.transform(image)]))
    (got,) = detector([image])
    (direct,) = detector.postprocessor(want, torch.tensor([[64, 96]]))
    for key in ("scores", "labels", "boxes"):
        torch.testing.assert_close(got[key], direct[key])


@pytest.mark.quick
def test_load_detector_errors_are_one_line(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    torch.save({"optimizer": {}}, tmp_path / "no_model.pth")
    for name, expected in (("missing.pth", "does not exist"), ("notes.pth", "could not load checkpoint"),
                           ("no_model.pth", "holds no model weights")):
        with pytest.raises(UserError, match=expected) as info:
            load_detector(str(tmp_path / name))
        assert "\n" not in str(info.value)


@pytest.mark.quick
def test_eval_transform_takes_an_image_alone(tmp_path):
    image = Image.new("RGB", (96, 64), (120, 30, 200))
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1])}
    paired = make_coco_transforms("val", **scaled_coco_transform_params(64))
    alone = datasets.eval_transform({"dataset_file": "synthetic", "synthetic_image_size": 64})(image)
    assert torch.equal(alone, paired(image, target)[0])
    assert alone.shape == (3, 64, 96)


def val_dataset(synthetic_root) -> CocoDetection:
    folder = val_folder(synthetic_root)
    return CocoDetection(folder, folder.parent / "annotations" / "instances_val2017.json",
                         transforms=make_coco_transforms("val", **scaled_coco_transform_params(64)))


def direct_results(detector, dataset, indices):
    """The model and its post-processor run on the dataset's own (image, target) items."""
    items = [dataset[i] for i in indices]
    samples = nested_tensor_from_tensor_list([image for image, _ in items])
    with torch.no_grad():
        outputs = detector.model(samples)
    return detector.postprocessor(outputs, torch.stack([target["orig_size"] for _, target in items]))


def test_detector_call_equals_model_and_postprocessor(tiny_checkpoint):
    path, synthetic_root = tiny_checkpoint
    detector = load_detector(str(path))
    images = [Image.open(p).convert("RGB") for p in sorted(val_folder(synthetic_root).glob("*.jpg"))[:2]]
    for got, want in zip(detector(images), direct_results(detector, val_dataset(synthetic_root), [0, 1])):
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(got[key], want[key])


def test_eval_save_detections_writes_the_coco_results_that_were_scored(tiny_checkpoint, tmp_path):
    path, synthetic_root = tiny_checkpoint
    out = tmp_path / "eval"
    result = run_main([*TINY_TRAIN_FLAGS, "--synthetic_root", str(synthetic_root), "--resume", str(path), "--eval",
                       "--save_detections", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    dataset = val_dataset(synthetic_root)
    expected = direct_results(load_detector(str(path)), dataset, range(len(dataset)))
    for image_id, want in zip(dataset.ids, expected):
        got = [d for d in detections if d["image_id"] == image_id]
        x, y, w, h = torch.tensor([d["bbox"] for d in got], dtype=torch.float64).unbind(-1)
        # xyxy -> xywh -> xyxy in float64 leaves float32 rounding: float32's tolerance
        torch.testing.assert_close(torch.stack([x, y, x + w, y + h], -1).float(), want["boxes"])
        torch.testing.assert_close(torch.tensor([d["score"] for d in got]), want["scores"])
        assert [d["category_id"] for d in got] == want["labels"].tolist()
    # scoring the file with pycocotools' own loadRes gives the AP the evaluation reported
    gt = COCO(str(val_folder(synthetic_root).parent / "annotations" / "instances_val2017.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.dataset.setdefault("info", {})  # the synthetic set has none; loadRes copies it
        coco_eval = COCOeval(gt, gt.loadRes(str(out / "detections.json")), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    reported = json.loads((out / "eval.json").read_text())["coco_eval_bbox"]
    assert coco_eval.stats.tolist() == pytest.approx(reported, abs=1e-9)


def test_save_detections_needs_eval_and_output_dir():
    for argv in (["--save_detections", "--output_dir", "x"], ["--save_detections", "--eval", "--resume", "x.pth"]):
        args = main.get_args_parser().parse_args(argv)
        with pytest.raises(UserError, match="--save_detections .* needs --eval and --output_dir"):
            flag_checks.check_args(args)
