"""End-to-end: training lowers the loss, train+eval writes the run files, resume is exact, bad input fails cleanly."""
import json

import pytest
import torch

import main
from models import build_model
from models.criterion import weighted
import run_setup
from tests.cli import run_main
from util.misc import collate_fn

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "2", "--nheads", "4", "--num_queries", "10", "--batch_size", "2",
        "--synthetic_train_size", "8", "--synthetic_val_size", "4", "--synthetic_image_size", "64",
        "--device", "cpu", "--num_workers", "0", "--log_every", "1"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def run_cli(argv):
    """main.py's command line, in this interpreter (exit codes and stderr are part of the contract)."""
    return run_main(argv)


def tiny_args(synthetic_root, *extra):
    args = main.get_args_parser().parse_args([*TINY, "--synthetic_root", synthetic_root, *extra])
    run_setup.resolve_args(args)
    return args


VARIANTS = [[], ["--dynamic_scale", "type1"], ["--dynamic_scale", "type2"], ["--dynamic_scale", "type3"],
            ["--dynamic_scale", "type4"], ["--dynamic_scale", "type2", "--head_mixture"],
            ["--dynamic_scale", "type2", "--query_mixture"]]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "detr")
def test_few_iterations_lower_the_loss(synthetic_root, variant):
    import datasets
    args = tiny_args(synthetic_root, "--dropout", "0", *variant)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    dataset = datasets.build_dataset("val", args)  # deterministic transform: the same batch every step
    samples, targets = collate_fn([dataset[i] for i in range(2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss_dict = criterion(model(samples), list(targets))
        loss = sum(weighted(loss_dict, criterion.weight_dict).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("run")
    result = run_cli([*TINY, "--synthetic_root", synthetic_root, "--output_dir", str(out), "--epochs", "2",
                      "--max_iters_per_epoch", "2", "--dynamic_scale", "type2", "--query_mixture"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_train_eval_writes_run_files(trained_run):
    out, result = trained_run
    for name in ("checkpoint.pth", "log.txt", "config.json", "finished.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert len(lines[-1]["test_coco_eval_bbox"]) == 12
    assert all(-1.0 <= x <= 1.0 for x in lines[-1]["test_coco_eval_bbox"])
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    assert "cls_loss focal" in result.stdout and "dynamic_scale type2" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["cls_loss"] == "focal" and config["dynamic_scale"] == "type2" and config["query_mixture"]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["config"] == config


def test_resume_eval_reproduces_ap(trained_run, synthetic_root):
    out, _ = trained_run
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    # architecture flags come from the checkpoint; the user passes none of them
    result = run_cli(["--eval", "--resume", str(out / "checkpoint.pth"), "--synthetic_root", synthetic_root,
                      "--synthetic_train_size", "8", "--synthetic_val_size", "4", "--synthetic_image_size", "64",
                      "--batch_size", "2", "--device", "cpu", "--num_workers", "0", "--output_dir", str(out / "eval")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking --dynamic_scale type2 from the checkpoint" in result.stdout
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["coco_eval_bbox"] == pytest.approx(last["test_coco_eval_bbox"], abs=1e-6)


def test_explicit_flag_conflicting_with_checkpoint_is_an_error(trained_run, synthetic_root):
    out, _ = trained_run
    result = run_cli(["--eval", "--resume", str(out / "checkpoint.pth"), "--dynamic_scale", "type3",
                      "--synthetic_root", synthetic_root, "--device", "cpu"])
    assert result.returncode == 2
    assert "type3" in result.stderr and "type2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.quick
def test_resume_from_unreachable_url_is_a_clear_error(tmp_path):
    result = run_main(["--eval", "--resume", "https://127.0.0.1:9/detr-r50.pth", "--device", "cpu"],
                      TORCH_HOME=str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download https://127.0.0.1:9/detr-r50.pth")


def test_missing_coco_path_is_one_clear_line(tmp_path):
    result = run_cli(["--dataset_file", "coco", "--device", "cpu", "--backbone_weights", "none"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--coco_path" in result.stderr
    missing = tmp_path / "coco"
    (missing / "train2017").mkdir(parents=True)
    (missing / "val2017").mkdir()
    result = run_cli(["--dataset_file", "coco", "--coco_path", str(missing), "--device", "cpu",
                      "--backbone_weights", "none", "--num_classes", "91"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # every path is checked before anything is loaded, the training split's first
    assert f"annotation file {missing}/annotations/instances_train2017.json not found" in result.stderr


def test_invalid_flag_combination_fails_at_parse_time():
    result = run_cli(["--query_mixture"])
    assert result.returncode == 2
    assert "--query_mixture" in result.stderr and "--dynamic_scale" in result.stderr
    result = run_cli(["--dynamic_scale", "type2", "--smooth", "0"])
    assert result.returncode == 2 and "--smooth" in result.stderr


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_is_exact(tmp_path, synthetic_root):
    """3 epochs straight == 1 epoch, then resume for 2 more: bitwise equal weights (CPU)."""
    common = [*TINY, "--synthetic_root", synthetic_root, "--max_iters_per_epoch", "2", "--dynamic_scale", "type3",
              "--eval_every", "100", "--lr_drop", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main.cli([*common, "--epochs", "3", "--output_dir", str(straight)]) == 0
    assert main.cli([*common, "--epochs", "1", "--output_dir", str(split)]) == 0
    assert main.cli([*common, "--epochs", "3", "--output_dir", str(split), "--resume", "auto"]) == 0
    a, b = _weights(straight / "checkpoint.pth"), _weights(split / "checkpoint.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the lr drop after epoch 2 happened in both (StepLR state resumed)
    sa = torch.load(straight / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    sb = torch.load(split / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert sa == sb
    assert (split / "checkpoint0001.pth").is_file()  # kept before the lr drop


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(tmp_path, synthetic_root, monkeypatch):
    out = tmp_path / "run"
    common = [*TINY, "--synthetic_root", synthetic_root, "--max_iters_per_epoch", "2", "--eval_every", "100",
              "--output_dir", str(out)]
    assert main.cli([*common, "--epochs", "1"]) == 0
    before = (out / "checkpoint.pth").read_bytes()

    from models.criterion import SetCriterion
    original = SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    assert main.cli([*common, "--epochs", "2", "--resume", "auto"]) == 2
    assert (out / "checkpoint.pth").read_bytes() == before
    assert main.cli([*common, "--epochs", "2", "--resume", "auto", "--skip_nonfinite", "5"]) == 0
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert last["epoch"] == 1 and last["nonfinite_skipped"] == 2


def test_event_files_hold_what_the_engine_logged(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = trained_run
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train_by_images/loss", "train/lr_group0", "train/lr_group1", "train/grad_norm",
            "coco/AP", "coco/AP50", "coco/ARl", "epoch/time", "epoch/train_loss",
            "smca/layer0/scale_mean", "smca/layer1/offset_norm"} <= tags
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    ap = [e.value for e in acc.Scalars("coco/AP")]
    assert [e.step for e in acc.Scalars("coco/AP")] == [1, 2]
    assert ap == pytest.approx([line["test_coco_eval_bbox"][0] for line in log], abs=1e-6)
    train_loss = [e.value for e in acc.Scalars("epoch/train_loss")]
    assert train_loss == pytest.approx([line["train_loss"] for line in log], rel=1e-5)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # 2 epochs x 2 iterations
    images = [e.step for e in acc.Scalars("train_by_images/loss")]
    assert images == [2 * s for s in steps]  # batch 2, one process
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = acc.summary_metadata["_hparams_/session_start_info"].plugin_data  # in the run folder itself
    assert start.plugin_name == "hparams"
    values = plugin_data_pb2.HParamsPluginData.FromString(start.content).session_start_info.hparams
    assert values["dynamic_scale"].string_value == "type2" and values["cls_loss"].string_value == "focal"
    assert values["num_queries"].number_value == 10 and values["query_mixture"].bool_value is True
    assert not [p for p in out.iterdir() if p.is_dir() and p.name != "eval"]  # no stray timestamped sub-run


def test_resumed_run_continues_the_same_curves_and_log(tmp_path, synthetic_root):
    """2 epochs, then resume to 3: every epoch's COCO point and every iteration exactly once in the events;
    a log line lost between the checkpoint and log.txt (a kill at that moment) comes back from the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    common = [*TINY, "--synthetic_root", synthetic_root, "--max_iters_per_epoch", "2", "--output_dir", str(out)]
    assert main.cli([*common, "--epochs", "2"]) == 0
    log = out / "log.txt"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:-1]))  # the kill
    assert main.cli([*common, "--epochs", "3", "--resume", "auto"]) == 0
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1, 2]
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [e.step for e in acc.Scalars("coco/AP")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_imagenet_weights_offline_is_a_clear_error(tmp_path, synthetic_root):
    """DETR's default backbone weights come from torchvision's URL; offline the message names the way out.
    (Where the download works, the run simply starts; the check is on the message, not on the network.)"""
    result = run_main(["--backbone", "resnet18", "--device", "cpu", "--synthetic_root", synthetic_root,
                       "--synthetic_train_size", "8", "--synthetic_val_size", "4", "--synthetic_image_size", "64",
                       "--epochs", "1", "--max_iters_per_epoch", "1", "--output_dir", str(tmp_path / "run")],
                      TORCH_HOME=str(tmp_path / "torch"))
    if result.returncode == 0:
        pytest.skip("the ImageNet weights could be downloaded here")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "could not download the ImageNet weights for resnet18" in result.stderr
    assert "--backbone_weights none" in result.stderr and "--backbone_weights PATH" in result.stderr
