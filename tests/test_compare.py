"""experiments/compare.py on a tiny sweep written with RunLogger, run as the user runs it."""
import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from experiments.compare import compare_table, load_runs
from util.tb import COCO_METRIC_NAMES, RunLogger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = {
    "lr": 1e-4,
    "batch_size": 2,
    "epochs": 3,
    "dynamic_scale": "none",
    "query_mixture": False,
    "head_mixture": False,
    "smooth": 8.0,
    "num_classes": None,
    "resume": "",
    "seed": 42,
}
# name -> (flags that differ from BASE_CONFIG, AP per epoch, seconds per epoch)
RUNS = {
    "baseline": ({}, [0.10, 0.30, 0.20], [100.0, 200.0, 300.0]),
    "type2": ({"dynamic_scale": "type2"}, [0.20, 0.25, 0.40], [110.0, 120.0, 3601.25]),
    "type2_qmix": ({"dynamic_scale": "type2", "query_mixture": True}, [0.05, 0.05, 0.01], [50.0, 50.0, 50.0]),
}


def write_run(run_dir, config, aps, times, with_hparams=True):
    """A run as main.py leaves it: config.json and events; epochs logged only when aps is non-empty."""
    os.makedirs(run_dir, exist_ok=True)
    config = {**config, "output_dir": run_dir}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    logger = RunLogger(run_dir)
    if with_hparams:
        logger.log_hparams(config, {})
    for it in range(4):
        logger.log_iter(it, 2 * (it + 1), {"loss": 1.0 / (it + 1)})
    for epoch, (ap, seconds) in enumerate(zip(aps, times)):
        # Only AP varies; the other 11 stats are filler so coco/ has every tag.
        logger.log_epoch(epoch, {"loss": 1.0}, [ap] + [0.5] * (len(COCO_METRIC_NAMES) - 1), seconds)
    if with_hparams and aps:
        logger.log_hparams(config, {"AP": aps[-1]})
    logger.close()


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for name, (flags, aps, times) in RUNS.items():
        write_run(str(root / name), {**BASE_CONFIG, **flags}, aps, times)
    # Same flags as baseline, died in its first epoch before writing hparams: flags come from config.json.
    write_run(str(root / "baseline_rerun"), BASE_CONFIG, [], [], with_hparams=False)
    (events,) = [p for p in (root / "baseline_rerun").iterdir() if p.name.startswith("events")]
    with open(events, "r+b") as f:
        f.truncate(events.stat().st_size - 3)  # torn last record of a killed job
    return root


def expected_rows():
    """Plain reference: best = first maximum, epochs are 1-based (epochs done), time is H:MM:SS."""
    rows = []
    for name in sorted([*RUNS, "baseline_rerun"]):
        if name == "baseline_rerun":
            rows.append([name, "none", "False", "-", "-", "-", "0", "-"])
            continue
        flags, aps, times = RUNS[name]
        best_i = 0
        for i, ap in enumerate(aps):
            if ap > aps[best_i]:
                best_i = i
        seconds = round(sum(times))
        hms = f"{seconds // 3600}:{(seconds // 60) % 60:02d}:{seconds % 60:02d}"
        config = {**BASE_CONFIG, **flags}
        rows.append([name, config["dynamic_scale"], str(config["query_mixture"]), f"{aps[best_i]:.4f}",
                     str(best_i + 1), f"{aps[-1]:.4f}", str(len(aps)), hms])
    return rows


EXPECTED_HEADER = ["run", "dynamic_scale", "query_mixture", "best AP", "epoch of best", "last AP", "epochs", "time"]


def run_compare(*args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "compare.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def parse_markdown(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(cells[1]) <= {"-" * len(c) for c in cells[1]}, "second line is the header rule"
    return cells[0], cells[2:]


def test_table_csv_and_plot(sweep, tmp_path):
    out = tmp_path / "out"
    result = run_compare(str(sweep), "--metric", "AP", "--out", str(out))
    assert result.returncode == 0, result.stderr

    header, rows = parse_markdown(result.stdout)
    assert header == EXPECTED_HEADER
    assert rows == expected_rows()
    # Sanity of the reference itself on the hand-checked cases.
    assert rows[0][3:] == ["0.3000", "2", "0.2000", "3", "0:10:00"]
    assert rows[3][3:] == ["0.0500", "1", "0.0100", "3", "0:02:30"]
    assert rows[2][7] == "1:03:51"

    with open(out / "compare.csv", newline="") as f:
        csv_rows = list(csv.reader(f))
    assert csv_rows[0] == EXPECTED_HEADER
    assert csv_rows[1:] == expected_rows()

    with Image.open(out / "compare_AP.png") as image:
        assert image.width > 300 and image.height > 200
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 10, "plot is (nearly) a single colour"


def test_importable_api_and_single_run_dir(sweep):
    runs = load_runs([str(sweep / "type2")])
    assert [r.name for r in runs] == ["type2"]
    assert runs[0].config["dynamic_scale"] == "type2" and runs[0].config["epochs"] == 3
    assert [v for _, v in runs[0].metric("AP")] == pytest.approx([0.20, 0.25, 0.40])
    header, rows = compare_table(runs, "ap")
    # A single run has no differing flags.
    assert header == ["run", "best AP", "epoch of best", "last AP", "epochs", "time"]
    assert rows == [["type2", "0.4000", "3", "0.4000", "3", "1:03:51"]]


def test_other_metric_and_default_out(sweep):
    result = run_compare(str(sweep), "--metric", "AP50")
    assert result.returncode == 0, result.stderr
    header, rows = parse_markdown(result.stdout)
    assert header[3:6] == ["best AP50", "epoch of best", "last AP50"]
    assert {tuple(r[3:6]) for r in rows if r[0] != "baseline_rerun"} == {("0.5000", "1", "0.5000")}
    assert (sweep / "compare.csv").exists() and (sweep / "compare_AP50.png").exists()


def test_no_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = run_compare(str(tmp_path / "empty"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no run folder (with events.out.tfevents.* files) found under: {tmp_path / 'empty'}"]
    assert result.stdout == ""


def test_unknown_metric_is_a_clear_error(sweep):
    result = run_compare(str(sweep), "--metric", "mAP")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: --metric mAP: unknown metric")
