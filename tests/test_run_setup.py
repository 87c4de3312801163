"""run_setup.resolve_run: the one pass from main.py's flags (and a checkpoint's stored config) to a run's
configuration."""
import pytest
import torch

import run_setup
from rundir import run_config
from tests.conftest import TINY_CLI
from util.errors import UserError

FLAGS = [*TINY_CLI, "--num_classes", "9"]  # no dataset is read


def resolve(*argv):
    args, explicit = run_setup.parse_command_line([*FLAGS, *argv])
    return run_setup.resolve_run(args, explicit)


@pytest.mark.quick
def test_a_resumed_run_takes_the_checkpoints_architecture_and_the_defaults_that_follow(tmp_path, capsys):
    stored = resolve("--dynamic_scale", "type2", "--smooth", "4").config
    assert (stored["cls_loss"], stored["cls_loss_coef"]) == ("focal", 2.0)  # auto: focal with a spatial prior
    torch.save({"model": {}, "config": stored}, tmp_path / "checkpoint.pth")
    capsys.readouterr()

    run = resolve("--output_dir", str(tmp_path), "--resume", "auto", "--lr", "3e-4")
    path = str(tmp_path / "checkpoint.pth")
    assert (run.resume_path, run.checkpoint["config"], run.frozen) == (path, stored, None)
    args = run.args
    assert (args.dynamic_scale, args.smooth, args.cls_loss, args.cls_loss_coef, args.set_cost_class) == (
        "type2", 4.0, "focal", 2.0, 2.0)
    assert run.config == run_config.config_to_dict(args) and run.config["lr"] == 3e-4
    assert {"lr", "resume", "output_dir", "num_classes"} <= run.explicit and "dynamic_scale" not in run.explicit
    assert capsys.readouterr().out.splitlines() == [
        "taking --dynamic_scale type2 from the checkpoint", "taking --smooth 4.0 from the checkpoint",
        "taking --cls_loss focal from the checkpoint"]
    assert run.summary.splitlines()[-1].startswith("ablation: dynamic_scale type2, smooth 4")


def test_a_flag_written_against_the_checkpoint_is_refused_naming_it(tmp_path):
    torch.save({"model": {}, "config": resolve("--dynamic_scale", "type2").config}, tmp_path / "checkpoint.pth")
    with pytest.raises(UserError, match=r"--dynamic_scale type1 conflicts with the checkpoint's 'type2' \(.*checkpoint"
                                        r"\.pth\); drop the flag or pass --dynamic_scale type2"):
        resolve("--output_dir", str(tmp_path), "--resume", "auto", "--dynamic_scale", "type1")


def test_resume_auto_in_a_new_folder_starts_fresh_and_an_eval_there_is_refused(tmp_path):
    run = resolve("--output_dir", str(tmp_path), "--resume", "auto")
    assert (run.resume_path, run.checkpoint) == ("", None)
    assert (run.args.cls_loss, run.args.cls_loss_coef) == ("ce", 1.0)
    with pytest.raises(UserError, match=r"--eval --resume auto: no checkpoint\.pth in .* to evaluate"):
        resolve("--output_dir", str(tmp_path), "--resume", "auto", "--eval")
