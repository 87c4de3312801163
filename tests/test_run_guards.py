"""Guards before the first epoch and on loading: free space for checkpoints (estimated from the model and the
optimizer), the --finetune_from hint for a DETR layout without SMCA modules, and the line of a weights-only start.

The full disk is simulated in-process: shutil.disk_usage is monkeypatched to report little free space (nothing is
filled)."""
import collections
import os
import shutil

import pytest
import torch
from torch import nn

import main
from models import build_model
import run_setup
from tests.conftest import TINY_CLI, make_args
from rundir import checkpoint as ckpt
from rundir import checkpoint_space
from rundir import model_weights
from rundir import run_config
from util.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_checkpoint_size_estimate_matches_a_saved_adamw_checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(300, 400), nn.BatchNorm1d(400), nn.Linear(400, 5))
    model[2].weight.requires_grad_(False)  # frozen: in the model state, without optimizer state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    estimate = checkpoint_space.checkpoint_bytes(model, optimizer_states=2)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert estimate == state + 2 * trainable
    ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pth")
    assert 0.97 < estimate / os.path.getsize(tmp_path / "c.pth") <= 1.0  # the rest is pickle framing


@pytest.mark.quick
def test_too_little_free_space_stops_before_the_first_epoch(tmp_path, monkeypatch, capsys):
    free = {"bytes": 10 * 2**20}
    real = shutil.disk_usage

    def fake_disk_usage(path):
        usage = real(path)
        return collections.namedtuple("usage", "total used free")(usage.total, usage.used, free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage)
    out_dir = tmp_path / "run"
    argv = [*TINY_CLI, "--synthetic_root", str(tmp_path / "synthetic"), "--epochs", "1", "--output_dir", str(out_dir)]
    capsys.readouterr()
    assert main.cli(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert "start training" not in captured.out and not (out_dir / "checkpoint.pth").exists()
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {out_dir}: its file system has 10.0 MiB free, "
                                               f"less than twice a checkpoint (about ")
    assert err[0].endswith("MiB: model and optimizer state); free space or choose another --output_dir")
    size_mib = float(err[0].split("(about ")[1].split(" MiB")[0])
    # the tiny model: resnet18 (about 11.2M parameters) and the transformer, AdamW's two states per trainable one
    assert 100 < size_mib < 200
    free["bytes"] = int(2.05 * size_mib * 2**20)
    assert main.cli([*argv, "--max_iters_per_epoch", "1"]) == 0 and (out_dir / "checkpoint.pth").exists()
    assert "start training" in capsys.readouterr().out


def test_detr_layout_into_an_smca_model_names_finetune_from():
    detr = build_model(make_args(dynamic_scale="none"))[0]
    smca = build_model(make_args(dynamic_scale="type2"))[0]
    with pytest.raises(UserError) as info:
        model_weights.load_model_weights(smca, detr.state_dict())
    message = str(info.value)
    assert "the checkpoint does not fit the model (" in message and ", 0 unexpected, 0 with another shape)" in message
    assert message.endswith("likely fix: the checkpoint has no SMCA modules (a DETR checkpoint, or one trained with "
                            "--dynamic_scale none); to start the SMCA model from its weights, pass it as "
                            "--finetune_from PATH (the SMCA modules keep their fresh initialisation) instead of "
                            "--resume")
    # any other mismatch keeps the flag hints
    state = detr.state_dict()
    state["query_embed.weight"] = torch.zeros(3, state["query_embed.weight"].shape[1])
    with pytest.raises(UserError, match="likely fix: check --num_queries"):
        model_weights.load_model_weights(smca, state)


def test_weights_only_file_starts_at_epoch_zero_and_says_so(tmp_path, capsys):
    argv = [*TINY_CLI, "--synthetic_root", str(tmp_path / "synthetic"), "--epochs", "1", "--max_iters_per_epoch", "1"]
    args = main.get_args_parser().parse_args(argv)
    run_setup.resolve_args(args)
    model = build_model(args)[0]
    weights = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "config": run_config.config_to_dict(args)}, weights)
    capsys.readouterr()
    assert main.cli([*argv, "--resume", str(weights), "--output_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert (f"loaded weights only: epoch 0, fresh optimizer and schedule ({weights} holds no optimizer state)"
            in out.splitlines())
    assert "Epoch: [0]" in out
