"""Every fault is one clear line and loses nothing, through the real CLI: diverged (NaN) weights, a full disk at
save time, invalid numbers, empty or unannotated splits, --eval without trained weights."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import options
from tests.cli import REPO, env, run_main
from tests.conftest import TINY_CLI
from tests.test_run_folder import copy_run, logged_epochs


# ------------------------------------------------------------------------------ non-finite model outputs

@pytest.mark.parametrize("weights, outputs", [("bbox_embed.", "pred_boxes, aux_outputs[0].pred_boxes"),
                                              ("class_embed.", "pred_logits, aux_outputs[0].pred_logits")],
                         ids=["boxes", "logits"])
def test_nan_weights_take_the_nonfinite_path(finished_tiny_run, tmp_path, weights, outputs):
    folder, argv = copy_run(finished_tiny_run, tmp_path)
    state = torch.load(folder / "checkpoint.pth", weights_only=True)
    for name, tensor in state["model"].items():
        if name.startswith(weights):
            tensor.fill_(float("nan"))  # diverged weights, as a blown-up run would have saved them
    torch.save(state, folder / "checkpoint.pth")
    (folder / "finished.json").unlink()
    poisoned = (folder / "checkpoint.pth").read_bytes()
    argv = [*argv, "--resume", "auto", "--epochs", "2"]

    result = run_main(argv)
    assert result.returncode == 2
    assert result.stderr == (f"error: non-finite model output ({outputs}) at epoch 1, iteration 0; stopped, the last "
                             f"checkpoint is untouched (--skip_nonfinite N skips such batches)\n")
    assert (folder / "checkpoint.pth").read_bytes() == poisoned

    result = run_main([*argv, "--skip_nonfinite", "5"])
    assert result.returncode == 2
    for i in (0, 1):
        assert (f"skipping batch: non-finite model output ({outputs}) at epoch 1, iteration {i}; {i + 1} skipped so "
                f"far") in result.stdout
    # evaluation cannot skip (it would score garbage): one line, nothing saved for the epoch
    assert result.stderr == (f"error: non-finite model output ({outputs}) in evaluation batch 0: the weights or "
                             f"activations have diverged; nothing was saved for this epoch (resume from an earlier "
                             f"checkpoint, e.g. with a lower --lr)\n")
    assert (folder / "checkpoint.pth").read_bytes() == poisoned
    assert logged_epochs(folder) == [0]


# ------------------------------------------------------------------------------ full disk at save time

@pytest.fixture
def small_tmpfs(tmp_path, finished_tiny_run):
    """A tmpfs of a given size in checkpoints of the tiny run: ``small_tmpfs(2.5)``."""
    size = (finished_tiny_run[0] / "checkpoint.pth").stat().st_size
    mounts = []

    def mount(checkpoints: float) -> Path:
        folder = tmp_path / f"tmpfs{len(mounts)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * checkpoints) // 1024}k", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); "
                        f"test_full_file_size_limit covers the same code path")
        mounts.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounts:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_disk_full_at_save_is_one_line_and_keeps_the_previous_checkpoint(small_tmpfs, cli_synthetic_root):
    """Room for two checkpoints and a half: the run starts (twice a checkpoint is free), epoch 0 writes
    checkpoint.pth and its copy checkpoint0000.pth (--save_every 1), and epoch 1's save finds the disk full."""
    out = small_tmpfs(2.5) / "run"
    result = run_main([*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "2", "--save_every", "1",
                       "--output_dir", out])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (f"error: could not write checkpoint {out / 'checkpoint.pth'} (No space left on device); "
                             f"the previous checkpoint.pth, if any, is unchanged: free space or choose another "
                             f"--output_dir, then resume with --resume auto\n")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0  # the previous one, whole
    assert logged_epochs(out) == [0]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the failed temporary file is gone


def test_disk_without_room_for_two_checkpoints_is_refused_before_the_first_epoch(small_tmpfs, cli_synthetic_root):
    """A real small file system (no monkeypatching): one checkpoint and a half fit, the run asks for two."""
    out = small_tmpfs(1.5) / "run"
    result = run_main([*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "2", "--output_dir", out])
    assert result.returncode == 2 and "start training" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output_dir {out}: its file system has ")
    assert "less than twice a checkpoint (about " in lines[0] and lines[0].endswith("choose another --output_dir")
    assert not out.exists() or not any(out.glob("*.pth"))


SAVE_OVER_LIMIT = """
import resource, signal, sys
import torch
from rundir import checkpoint
from util.errors import UserError
checkpoint.atomic_save({"w": torch.ones(8)}, sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
try:
    checkpoint.atomic_save({"w": torch.zeros(2**20)}, sys.argv[1])
except UserError as e:
    print(e)
"""


@pytest.mark.quick
def test_full_file_size_limit(tmp_path):
    """The same failure without a mount: the kernel refuses writes past RLIMIT_FSIZE (as a quota would)."""
    path = tmp_path / "checkpoint.pth"
    result = subprocess.run([sys.executable, "-c", SAVE_OVER_LIMIT, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env())
    assert result.stdout == (f"could not write checkpoint {path} (File too large); the previous checkpoint.pth, if "
                             f"any, is unchanged: free space or choose another --output_dir, then resume with "
                             f"--resume auto\n"), result.stderr
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(8))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


# ------------------------------------------------------------------------------ invalid numbers at parse time

def test_nan_learning_rate_fails_at_parse_time():
    result = run_main(["--lr", "nan", "--output_dir", "/nonexistent/never/created"])
    assert result.returncode == 2
    assert result.stderr == ("error: argument --lr: must be a finite number >= 0, got 'nan' "
                             "(python main.py --help lists the flags)\n")


@pytest.mark.parametrize("flag, value, wanted", [
    ("--lr", "-1e-4", ">= 0"), ("--lr_backbone", "inf", ">= 0"), ("--weight_decay", "-0.1", ">= 0"),
    ("--clip_max_norm", "nan", ">= 0"), ("--dropout", "1", "in [0, 1)"), ("--smooth", "0", "> 0"),
    ("--smooth", "-2", "> 0"),
    ("--focal_alpha", "1.5", "in [0, 1]"), ("--focal_gamma", "-2", ">= 0"), ("--set_cost_bbox", "-inf", ">= 0"),
    ("--giou_loss_coef", "nan", ">= 0"), ("--eos_coef", "-0.1", ">= 0"), ("--owner_timeout", "0", "> 0"),
])
@pytest.mark.quick
def test_invalid_numbers_fail_at_parse_time(flag, value, wanted, capsys):
    with pytest.raises(SystemExit):
        options.get_args_parser().parse_args([f"{flag}={value}"])  # "=": argparse reads "-1e-4" as a flag
    assert f"error: argument {flag}: must be a finite number {wanted}, got '{value}'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ unusable splits, untrained --eval

@pytest.mark.parametrize("split, field, message", [
    ("train", "images", "the train set is empty: {ann} lists no images; check --coco_path / the split"),
    ("val", "images", "the val set is empty: {ann} lists no images; check --coco_path / the split"),
    ("val", "annotations", "the val set has no annotations: {ann} lists 4 images and no boxes, so COCO evaluation "
                           "would report -1 for every metric; use a split with annotations"),
])
def test_unusable_split_fails_before_training_naming_its_file(tmp_path, cli_synthetic_root, split, field, message):
    from datasets.synthetic import ensure_synthetic
    coco = tmp_path / "coco"
    shutil.copytree(ensure_synthetic(cli_synthetic_root, seed=42, train_size=8, val_size=4, image_size=64), coco)
    ann = coco / "annotations" / f"instances_{split}2017.json"
    data = json.loads(ann.read_text())
    data[field] = []
    ann.write_text(json.dumps(data))
    out = tmp_path / "run"
    result = run_main([*TINY_CLI, "--dataset_file", "coco", "--coco_path", coco, "--num_classes", "5", "--epochs", "1",
                       "--output_dir", out])
    assert result.returncode == 2
    assert result.stderr == f"error: {message.format(ann=ann)}\n"
    assert list(out.iterdir()) == []  # nothing written: no config, no events, no lease


def test_eval_needs_trained_weights_unless_asked(tmp_path, cli_synthetic_root):
    result = run_main(["--eval", "--device", "cpu"])
    assert result.returncode == 2
    assert result.stderr == ("error: --eval scores trained weights but no --resume PATH was given; pass --resume "
                             "PATH|URL (or --finetune_from PATH), or --eval_untrained to score the untrained model on "
                             "purpose (python main.py --help lists the flags)\n")
    out = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    common = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--eval", "--output_dir", out]
    result = run_main([*common, "--resume", "auto"])
    assert result.returncode == 2
    assert result.stderr == (f"error: --eval --resume auto: no checkpoint.pth in {out} to evaluate; pass --resume "
                             f"PATH, or --eval_untrained to score the untrained model on purpose\n")
    result = run_main([*common, "--eval_untrained"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "eval.json").read_text())["coco_eval_bbox"]) == 12
    assert sorted(os.listdir(out)) == ["eval.json"]


# ------------------------------------------------------------------------------ non-finite on one rank only

def _nonfinite_worker(rank, port, out_dir, skip):
    from tests import test_distributed as td
    import engine
    from util import dist as udist
    from util.misc import nested_tensor_from_tensor_list

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(td.WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    args = td._args()
    udist.init_distributed_mode(args)
    try:
        model, criterion = td._model(args)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = td._batch()
        mine, their_targets = images[rank * td.PER_RANK:(rank + 1) * td.PER_RANK], targets[rank * td.PER_RANK:]
        poisoned = [image.clone() for image in mine]
        if rank == 1:
            poisoned[0].fill_(float("nan"))  # only rank 1's first batch diverges
        batches = [(nested_tensor_from_tensor_list(poisoned), tuple(their_targets[:td.PER_RANK])),
                   (nested_tensor_from_tensor_list(mine), tuple(their_targets[:td.PER_RANK]))]
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        try:
            result = engine.train_one_epoch(ddp, criterion, batches, optimizer, torch.device("cpu"), 0,
                                            skip_nonfinite=skip, log_every=1)
            outcome = {"skipped": result.skipped, "steps": result.step}
        except engine.NonFiniteLoss as e:
            outcome = {"error": str(e)}
        torch.save({"outcome": outcome, "state": model.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        udist.cleanup()


@pytest.mark.parametrize("skip", [0, 1], ids=["stop", "skip"])
def test_nonfinite_output_on_one_rank_takes_the_same_path_on_every_rank(tmp_path, skip):
    """Every rank must stop, or skip the same batch, together: otherwise the others wait in DDP forever."""
    import torch.multiprocessing as mp

    from tests.test_distributed import WORLD, _free_port
    mp.spawn(_nonfinite_worker, args=(_free_port(), str(tmp_path), skip), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    if skip:
        assert [r["outcome"] for r in ranks] == [{"skipped": 1, "steps": 1}] * WORLD
        for name, value in ranks[0]["state"].items():
            torch.testing.assert_close(ranks[1]["state"][name], value, msg=name)  # the same step on both ranks
    else:
        stopped = ("at epoch 0, iteration 0; stopped, the last checkpoint is untouched (--skip_nonfinite N skips "
                   "such batches)")
        assert ranks[0]["outcome"] == {"error": f"non-finite model output (on another rank) {stopped}"}
        assert ranks[1]["outcome"] == {"error": "non-finite model output (pred_logits, pred_boxes, "
                                                f"aux_outputs[0].pred_logits, aux_outputs[0].pred_boxes) {stopped}"}
