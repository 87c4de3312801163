"""What a new user meets first, each as one line: the launchers without Slurm, an attention figure with no
detection, a run without --output_dir; and a resumed finished run leaves no empty events file behind."""
import shutil
from pathlib import Path

import pytest

import main
import predict
from slurm import submit, sweep
from tests.conftest import TINY_CLI

REPO = Path(__file__).resolve().parents[1]
NO_SLURM = "error: no Slurm here: sbatch and srun not found on PATH; "


@pytest.fixture
def no_slurm_on_path(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.quick
def test_sweep_without_slurm_is_one_line(no_slurm_on_path, tmp_path, capsys):
    smoke = REPO / "experiments" / "synthetic_smoke.sweep"
    assert sweep.main([str(smoke), "--root", str(tmp_path / "runs"), "--ngpus", "0"]) == 2
    assert capsys.readouterr().err == (NO_SLURM + "--dry_run prints each run's main.py command, to run here or "
                                       "with srun/sbatch on a Slurm login node\n")


def test_submit_without_slurm_is_one_line(no_slurm_on_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        submit.submit(["--output_dir", str(tmp_path / "run"), "--ngpus", "0", "--device", "cpu"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (NO_SLURM + "run python main.py with the same flags here, or submit from a "
                                       "Slurm login node (sbatch slurm/train.sbatch, or srun)\n")


def test_attention_without_a_detection_says_so(tiny_checkpoint, tmp_path, capsys):
    path, synthetic_root = tiny_checkpoint
    image = sorted(Path(synthetic_root).glob("shapes-*/val2017/*.jpg"))[0]
    assert predict.cli([str(image), "--resume", str(path), "--output_dir", str(tmp_path), "--attention",
                        "--threshold", "1", "--device", "cpu"]) == 0
    assert f"{image.name}: no attention figure, no detection scores at least --threshold 1; a lower --threshold " \
           f"draws the top ones" in capsys.readouterr().out.splitlines()
    assert not list(tmp_path.glob("*_attention.png"))


def test_no_output_dir_warns_once(cli_synthetic_root, capsys):
    assert main.cli([*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "output_dir" in line] == [
        "no --output_dir: nothing of this run will be saved"]


def test_resuming_a_finished_run_without_training_writes_no_events_file(finished_tiny_run, tmp_path):
    source, argv = finished_tiny_run
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    (folder / "finished.json").unlink()  # killed after the last checkpoint, before finished.json
    events = sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    assert main.cli([str(folder) if a == str(source) else a for a in argv] + ["--resume", "auto"]) == 0
    assert (folder / "finished.json").exists()
    assert sorted(p.name for p in folder.glob("events.out.tfevents.*")) == events
