"""A run folder written before run management moved from util/ to rundir/ still loads, reports its status and
resumes (tests/fixtures/run_before_rundir/README.md says how the fixture was made)."""
import json
import lzma
import shutil
from pathlib import Path

import pytest

from rundir.checkpoint import load_checkpoint
from rundir.run_folder import STATUS_FINISHED, STATUS_GO, status
from tests.cli import run_in_process, run_main
from tests.conftest import TINY_CLI

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_before_rundir"
# the flags the fixture's run was started with, besides TINY_CLI, --synthetic_root, --epochs and --output_dir
FIXTURE_FLAGS = ["--dynamic_scale", "type2", "--head_mixture", "--query_mixture", "--lr_backbone", "0"]


def unpack(folder: Path) -> Path:
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("README.md", "*.xz"))
    (folder / "checkpoint.pth").write_bytes(lzma.decompress((FIXTURE / "checkpoint.pth.xz").read_bytes()))
    return folder


@pytest.mark.quick
def test_old_checkpoint_loads_without_trusting_it(tmp_path):
    """weights_only loading refuses any pickled class, so the file cannot depend on the project's module paths."""
    folder = unpack(tmp_path / "run")
    checkpoint = load_checkpoint(str(folder / "checkpoint.pth"))
    config = checkpoint["config"]
    assert (checkpoint["epoch"], config["dynamic_scale"], config["epochs"]) == (0, "type2", 1)
    assert config == json.loads((folder / "config.json").read_text())
    assert set(checkpoint["rng"]) == {"python", "numpy", "torch"}


@pytest.mark.quick
def test_old_run_folder_status(tmp_path):
    import slurm.status

    folder = unpack(tmp_path / "run")
    assert status(folder, 1) == (STATUS_FINISHED, f"{folder} finished 1 epoch (finished.json)")
    code, line = status(folder, 2)
    assert (code, line) == (STATUS_GO, f"{folder} is free (finished 1 epoch; --epochs 2 extends it)")
    result = run_in_process(slurm.status.cli, ["slurm/status.py", "--", *TINY_CLI, "--output_dir", str(folder),
                                               "--epochs", "1"])
    assert result.returncode == STATUS_FINISHED, result.stderr


def test_old_run_resumes(tmp_path):
    folder = unpack(tmp_path / "run")
    result = run_main([*TINY_CLI, *FIXTURE_FLAGS, "--synthetic_root", tmp_path / "synthetic", "--epochs", "2",
                       "--output_dir", folder, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {folder / 'checkpoint.pth'} at epoch 1" in result.stdout
    assert json.loads((folder / "finished.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()] == [0, 1]
