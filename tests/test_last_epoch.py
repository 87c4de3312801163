"""The last epoch of a run is always evaluated (also when a resume with a lower --epochs ends the run), and the
results of --eval on a run folder (eval.json) reach experiments/compare.py, marked as such."""
import json
import shutil

import pytest

import main
from experiments import compare
from experiments.runs import load_runs
from tests import md_tables
from tests.conftest import TINY_CLI
from util.tb import COCO_METRIC_NAMES


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, cli_synthetic_root):
    """A 2-epoch run that keeps checkpoint0000.pth: epoch 0 trained, not evaluated (--eval_every 100)."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    argv = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "2", "--save_every", "1",
            "--output_dir", str(out)]
    assert main.cli(argv) == 0
    return out, argv


@pytest.mark.quick
def test_a_resume_that_ends_the_run_evaluates_its_last_epoch(two_epochs, tmp_path, cli_synthetic_root, capsys):
    source, _ = two_epochs
    out = tmp_path / "short"
    argv = [*TINY_CLI, "--synthetic_root", cli_synthetic_root, "--epochs", "1", "--output_dir", str(out),
            "--resume", str(source / "checkpoint0000.pth")]
    capsys.readouterr()
    assert main.cli(argv) == 0
    stdout = capsys.readouterr().out
    assert "epoch 0 is the last and was not evaluated: evaluating it" in stdout
    assert "Epoch: [" not in stdout  # nothing trained
    line = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert line["epoch"] == 0 and len(line["test_coco_eval_bbox"]) == len(COCO_METRIC_NAMES)
    finished = json.loads((out / "finished.json").read_text())
    assert finished["metrics"]["AP"] == line["test_coco_eval_bbox"][0]
    (run,) = load_runs([str(out)])
    assert run.summary("AP") == (line["test_coco_eval_bbox"][0], 1, line["test_coco_eval_bbox"][0])


def test_eval_of_a_run_folder_shows_in_compare_marked_as_eval_json(two_epochs, tmp_path, capsys):
    source, argv = two_epochs
    out = tmp_path / "run"
    shutil.copytree(source, out)
    argv = [str(out) if a == str(source) else a for a in argv]
    assert main.cli([*argv, "--eval", "--resume", "auto"]) == 0
    ap = json.loads((out / "eval.json").read_text())["coco_eval_bbox"][0]
    capsys.readouterr()
    compare.main([str(out), "--out", str(tmp_path / "cmp")])
    header, rows = md_tables.table(capsys.readouterr().out.splitlines())
    assert dict(zip(header, rows[0]))["AP (eval.json)"] == f"{ap:.4f}"
