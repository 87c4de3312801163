"""main.py with --masks end to end: DETR's two-stage recipe on the synthetic panoptic set (boxes, then the mask head
on the frozen detector), PQ and mask AP in the console, log.txt, TensorBoard and compare.py, and DETR's panoptic
commands failing in one line without --coco_panoptic_path."""
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from tests.cli import run_main, run_script

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--backbone_norm", "batch", "--hidden_dim", "32",
        "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "6",
        "--dropout", "0", "--batch_size", "2", "--device", "cpu", "--num_workers", "0", "--log_every", "1"]
DETR_PANOPTIC = {  # DETR's README: checkpoint -> the flags its command adds
    "detr-r50-panoptic-00ce5173.pth": [],
    "detr-r50-dc5-panoptic-da08f1b1.pth": ["--dilation"],
    "detr-r101-panoptic-40021d53.pth": ["--backbone", "resnet101"],
}


def run_cli(argv, env=None):
    return run_main(argv, **(env or {}))


@pytest.mark.parametrize("checkpoint", list(DETR_PANOPTIC))
def test_detr_panoptic_command_without_coco_panoptic_path_is_one_clear_line(tmp_path, checkpoint):
    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    result = run_cli(["--no_aux_loss", "--eval", "--batch_size", "1", "--resume",
                      f"https://dl.fbaipublicfiles.com/detr/{checkpoint}", "--masks", "--dataset_file",
                      "coco_panoptic", "--coco_path", str(coco), *DETR_PANOPTIC[checkpoint]],
                     env={"TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dataset_file coco_panoptic needs --coco_panoptic_path")
    assert not (tmp_path / "torch").exists()  # stopped before any download


@pytest.mark.quick
def test_missing_panoptic_json_and_pngs_are_named(tmp_path):
    root = tmp_path / "panoptic"
    (root / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    common = ["--eval", "--eval_untrained", "--masks", "--dataset_file", "coco_panoptic",
              "--coco_path", str(tmp_path / "coco"), "--coco_panoptic_path", str(root), *TINY]
    result = run_cli(common)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"panoptic annotation file {root}/annotations/panoptic_val2017.json not found" in result.stderr
    empty = {"images": [], "annotations": [], "categories": []}
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(empty))
    result = run_cli(common)
    assert result.returncode == 2 and f"panoptic PNG folder {root}/panoptic_val2017 not found" in result.stderr


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """DETR's recipe at toy scale: boxes on the synthetic panoptic set, then --masks --frozen_weights."""
    base = tmp_path_factory.mktemp("panoptic_recipe")
    data = ["--synthetic_root", str(base / "data"), "--synthetic_train_size", "4", "--synthetic_val_size", "2",
            "--synthetic_image_size", "64"]
    boxes = run_cli([*TINY, *data, "--dataset_file", "synthetic_panoptic", "--epochs", "1",
                     "--output_dir", str(base / "boxes")])
    assert boxes.returncode == 0, boxes.stderr[-3000:]
    # the demo's head (scripts/demo_panoptic.sh): the box checkpoint's config says --mask_attention detr, which a
    # frozen detector does not fix
    masks = run_cli([*TINY, *data, "--masks", "--frozen_weights", str(base / "boxes" / "checkpoint.pth"),
                     "--mask_attention", "scaled", "--epochs", "1", "--output_dir", str(base / "masks")])
    assert masks.returncode == 0, masks.stderr[-3000:]
    return base, boxes, masks


def test_frozen_weights_train_only_the_mask_head(two_stage):
    base, boxes, masks = two_stage
    assert "masks: mask head only, detector frozen from" in masks.stdout
    box_model = torch.load(base / "boxes" / "checkpoint.pth", weights_only=True)["model"]
    segm = torch.load(base / "masks" / "checkpoint.pth", weights_only=True)
    assert segm["config"]["masks"] and segm["config"]["dataset_file"] == "synthetic_panoptic"
    assert segm["config"]["mask_attention"] == "scaled"
    panoptic_json = json.loads(next((base / "data").glob("panoptic-*/annotations/panoptic_val2017.json")).read_text())
    stuff = sorted(c["id"] for c in panoptic_json["categories"] if not c["isthing"])
    assert stuff and segm["stuff_ids"] == stuff  # for predict.py's panoptic pictures
    detector = {k.removeprefix("detr."): v for k, v in segm["model"].items() if k.startswith("detr.")}
    assert detector.keys() == box_model.keys()
    changed = [k for k in detector if not torch.equal(detector[k], box_model[k])]
    assert not changed, changed[:5]  # parameters and BatchNorm statistics, after two training steps
    heads = {k for k in segm["model"] if not k.startswith("detr.")}
    assert heads and all(k.startswith(("mask_head.", "bbox_attention.")) for k in heads)


def test_panoptic_metrics_reach_console_log_tensorboard_and_compare(two_stage):
    base, _, masks = two_stage
    out = masks.stdout
    assert "IoU metric: segm" in out and "IoU metric: bbox" in out
    assert "          |    PQ     SQ     RQ     N" in out and "\nThings    |" in out and "\nStuff     |" in out
    line = json.loads((base / "masks" / "log.txt").read_text().splitlines()[-1])
    for key in ("test_PQ_all", "test_PQ_th", "test_PQ_st"):
        assert set(line[key]) == {"pq", "sq", "rq", "n"} and 0 <= line[key]["pq"] <= 1
    assert line["test_PQ_all"]["n"] >= line["test_PQ_th"]["n"] + 1  # stuff classes are counted too
    assert len(line["test_coco_eval_masks"]) == 12 and "train_loss_mask" in line and "train_loss_dice" in line
    acc = event_accumulator.EventAccumulator(str(base / "masks"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"panoptic/PQ", "panoptic/SQ_th", "panoptic/RQ_st", "segm/AP", "coco/AP"} <= tags
    assert acc.Scalars("panoptic/PQ")[-1].value == pytest.approx(line["test_PQ_all"]["pq"])
    result = run_script("experiments.compare", [base / "masks", "--metric", "pq", "--out", base])
    assert result.returncode == 0, result.stderr
    assert "best PQ" in result.stdout and (base / "compare_PQ.png").is_file()


def test_a_short_run_that_memorises_two_images_reaches_pq_above_zero(tmp_path, capsys):
    """PQ > 0 from real training steps and the real evaluation (engine.train_one_epoch and engine.evaluate on the
    synthetic panoptic files), on two images shown without augmentation so that 150 steps can fit them.

    DETR's head as published (--mask_attention detr): it sees each query only through its attention map, one
    softmax over heads x cells (values near 1 / (heads * cells)), so a real run's masks separate only after many
    steps (docs/panoptic.md; --mask_attention scaled is the demo's cure)."""
    import datasets
    import engine
    import main
    from models import build_model
    import run_setup
    from util.misc import collate_fn

    torch.manual_seed(0)
    argv = ["--masks", "--synthetic_root", str(tmp_path), "--synthetic_train_size", "2", "--synthetic_val_size", "2",
            "--synthetic_image_size", "64", "--backbone", "resnet18", "--backbone_weights", "none",
            "--backbone_norm", "batch", "--hidden_dim", "128", "--nheads", "4", "--dim_feedforward", "64",
            "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "6", "--dropout", "0", "--lr", "1e-3",
            "--lr_backbone", "1e-3", "--device", "cpu"]
    args = main.get_args_parser().parse_args(argv)
    run_setup.resolve_args(args)
    model, criterion, postprocessors = build_model(args, stuff_ids=datasets.stuff_ids(args))
    images = datasets.build_dataset("val", args)  # DETR's evaluation transform: the same pixels every step
    steps = torch.utils.data.DataLoader(torch.utils.data.Subset(images, [0, 1] * 150), batch_size=2,
                                        collate_fn=collate_fn)
    optimizer = torch.optim.AdamW(main._param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    engine.train_one_epoch(model, criterion, steps, optimizer, torch.device("cpu"), epoch=0,
                           max_norm=args.clip_max_norm, log_every=100)
    loader = torch.utils.data.DataLoader(images, batch_size=2, collate_fn=collate_fn)
    stats, _ = engine.evaluate(model, criterion, postprocessors, loader, datasets.get_coco_api_from_dataset(images),
                               torch.device("cpu"))
    assert stats["PQ_all"]["pq"] > 0, stats["PQ_all"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("All       |"))
    assert float(row.split("|")[1].split()[0]) == pytest.approx(100 * stats["PQ_all"]["pq"], abs=0.05)


def test_eval_of_a_masks_checkpoint_takes_masks_from_it(two_stage):
    """--eval --resume of a --masks run without the flag: --masks comes from the checkpoint and the synthetic set
    becomes its panoptic version; eval.json holds the same PQ as the training run's last log line."""
    base, _, _ = two_stage
    last = json.loads((base / "masks" / "log.txt").read_text().splitlines()[-1])
    result = run_cli(["--eval", "--resume", str(base / "masks" / "checkpoint.pth"), "--synthetic_root",
                      str(base / "data"), "--synthetic_train_size", "4", "--synthetic_val_size", "2",
                      "--synthetic_image_size", "64", "--batch_size", "2", "--device", "cpu", "--num_workers", "0",
                      "--output_dir", str(base / "eval")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking --masks from the checkpoint" in result.stdout
    assert "taking --mask_attention scaled from the checkpoint" in result.stdout
    evaluated = json.loads((base / "eval" / "eval.json").read_text())
    assert evaluated["PQ_all"] == pytest.approx(last["test_PQ_all"])
    assert evaluated["coco_eval_masks"] == pytest.approx(last["test_coco_eval_masks"], abs=1e-9)
