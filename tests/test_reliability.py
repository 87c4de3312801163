"""Failure modes through the real CLI: preemption, unwritable output, unsafe/official/DC5 checkpoints,
fine-tuning, hyper-parameter overrides on resume, corrupt images."""
import argparse
import json
import os
import re
import signal

import pytest
import torch

import main
from models import build_model
import run_setup
from rundir.preemption import REQUEUE_EXIT_CODE
from tests.cli import Watched, run_main

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--enc_layers", "1", "--dec_layers", "1", "--nheads", "4", "--num_queries", "10", "--batch_size", "2",
        "--synthetic_val_size", "4", "--synthetic_image_size", "64", "--device", "cpu", "--num_workers", "0"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def run_cli(argv):
    return run_main(argv)


def test_preemption_signal_saves_and_resume_continues(tmp_path, synthetic_root):
    out = tmp_path / "run"
    argv = [*TINY, "--synthetic_root", synthetic_root, "--synthetic_train_size", "40", "--epochs", "2",
            "--output_dir", str(out), "--log_every", "1", "--eval_every", "100", "--resume", "auto"]
    proc = Watched.main(argv)
    try:
        # the signal arrives mid-epoch, after a step is logged: waiting for that line, not for a time
        proc.wait_for(lambda line: line.startswith("Epoch: [0] [ 3/20]"))
        proc.proc.send_signal(signal.SIGUSR1)
        code = proc.finish()
    finally:
        proc.kill()
    output = proc.output
    assert code == REQUEUE_EXIT_CODE, output[-3000:]
    assert "SIGUSR1: saved checkpoint at epoch 0" in output
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 0 and 4 <= state["iteration"] < 20
    assert not (out / "finished.json").exists()

    resumed = run_cli(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 0, iteration {state['iteration']}" in resumed.stdout
    # the preempted epoch continues at the next batch, not from scratch
    assert f"Epoch: [0] [{state['iteration']:2d}/20]" in resumed.stdout
    assert "Epoch: [0] [ 0/20]" not in resumed.stdout
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    assert (out / "finished.json").exists()


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli(["--output_dir", str(blocker / "run"), "--device", "cpu"])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --output_dir {blocker / 'run'} is not writable")
    assert "Traceback" not in result.stderr


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.quick
def test_malicious_checkpoint_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "payload": _Payload(marker)}, path)
    result = run_cli(["--eval", "--resume", str(path), "--device", "cpu"])
    assert result.returncode == 2
    assert "--trust_checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def _official_like(tmp_path, name, synthetic_root, dilation=False):
    """A file shaped like DETR's published checkpoints: {'model': state_dict, 'args': Namespace} and no config."""
    argv = [*TINY, "--synthetic_root", synthetic_root, "--num_classes", "5"]
    if dilation:  # DC5 needs bottleneck blocks
        argv += ["--backbone", "resnet50", "--dilation"]
    args = main.get_args_parser().parse_args(argv)
    run_setup.resolve_args(args)
    model, _, _ = build_model(args)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4, backbone="resnet18")}, path)
    return path


def test_dc5_checkpoint_without_dilation_is_an_error(tmp_path, synthetic_root):
    path = _official_like(tmp_path, "detr-r18-dc5-tiny.pth", synthetic_root, dilation=True)
    common = ["--eval", "--resume", str(path), "--nheads", "4", "--synthetic_root", synthetic_root,
              "--synthetic_val_size", "4", "--synthetic_image_size", "64", "--device", "cpu", "--num_workers", "0"]
    result = run_cli(common)
    assert result.returncode == 2 and "--dilation" in result.stderr and "DC5" in result.stderr
    result = run_cli([*common, "--dilation", "--batch_size", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DC5 models lose several AP with more than one image per GPU" in result.stdout
    # the inferred architecture is in the block of non-default flags; resnet50, the default depth, has no line
    assert re.search(r"^  dilation +True$", result.stdout, re.M)
    assert re.search(r"^  num_queries +10$", result.stdout, re.M) and not re.search(r"^  backbone ", result.stdout, re.M)


def test_official_checkpoint_loads_strictly_with_inferred_architecture(tmp_path, synthetic_root):
    path = _official_like(tmp_path, "detr-r18-tiny.pth", synthetic_root)
    result = run_cli(["--eval", "--resume", str(path), "--nheads", "4", "--synthetic_root", synthetic_root,
                      "--synthetic_val_size", "4", "--synthetic_image_size", "64", "--device", "cpu",
                      "--num_workers", "0", "--batch_size", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Average Precision" in result.stdout
    result = run_cli(["--eval", "--resume", str(path), "--nheads", "4", "--backbone", "resnet50",
                      "--synthetic_root", synthetic_root, "--device", "cpu"])
    assert result.returncode == 2 and "resnet50" in result.stderr and "resnet18" in result.stderr


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("short")
    argv = [*TINY, "--synthetic_root", synthetic_root, "--synthetic_train_size", "8", "--epochs", "1",
            "--max_iters_per_epoch", "2", "--eval_every", "100", "--output_dir", str(out)]
    assert main.cli(argv) == 0
    return out, argv


def test_explicit_hyperparameters_override_resumed_state(tmp_path, short_run):
    out, argv = short_run
    target = tmp_path / "resumed"
    target.mkdir()
    (target / "checkpoint.pth").write_bytes((out / "checkpoint.pth").read_bytes())
    argv = [a if a != str(out) else str(target) for a in argv]
    result = run_cli([*argv, "--resume", "auto", "--epochs", "2", "--lr", "5e-5", "--lr_drop", "7"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "override on resume: lr 5e-05" in result.stdout and "override on resume: lr_drop 7" in result.stdout
    state = torch.load(target / "checkpoint.pth", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-5)
    assert state["lr_scheduler"]["step_size"] == 7 and state["epoch"] == 1


def test_finetune_from_reinitialises_mismatched_heads(tmp_path, short_run, synthetic_root):
    out, argv = short_run
    result = run_cli([*[a for a in argv if a != str(out)][:-1], "--output_dir", str(tmp_path / "ft"),
                      "--finetune_from", str(out / "checkpoint.pth"), "--num_classes", "9"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_embed.weight" in result.stdout and "class_embed.bias" in result.stdout
    state = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    assert state["model"]["class_embed.weight"].shape[0] == 10 and state["epoch"] == 0


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, synthetic_root):
    import shutil
    from datasets.synthetic import ensure_synthetic
    source = ensure_synthetic(root=synthetic_root, seed=42, train_size=8, val_size=4, image_size=64)
    coco = tmp_path / "coco"
    shutil.copytree(source, coco)
    bad = sorted((coco / "train2017").iterdir())[0]
    bad.write_bytes(b"not a jpeg")
    argv = [*TINY, "--dataset_file", "coco", "--coco_path", str(coco), "--num_classes", "5", "--epochs", "1",
            "--max_iters_per_epoch", "2",
            "--eval_every", "100"]
    result = run_cli(argv)
    assert result.returncode == 2 and bad.name in result.stderr and "--skip_bad_images" in result.stderr
    assert result.stderr.count("\n") == 1
    result = run_cli([*argv, "--skip_bad_images"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert bad.name in result.stderr
