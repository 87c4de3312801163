"""experiments/compare.py on sweeps written with RunLogger (real event files), run as the user runs it: the per-run
table, groups of seeds with mean ± std against a plain reference, flags of a resumed run, the default --out."""
import csv
import json
import math
import os

import pytest
from PIL import Image

from experiments.compare import compare_table, default_out
from experiments.runs import group_runs, load_runs
from tests import md_tables
from tests.cli import run_script
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


def write_run(run_dir, config, aps, times, with_hparams=True, config_json=None):
    """A run as main.py leaves it: config.json and events; epochs logged only when aps is non-empty.
    ``config_json`` replaces what config.json holds (main.py rewrites it at a resumed start)."""
    os.makedirs(run_dir, exist_ok=True)
    config = {**config, "output_dir": run_dir}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**config, **(config_json or {})}, f)
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


def truncate_events(run_dir):
    (events,) = [p for p in run_dir.iterdir() if p.name.startswith("events")]
    with open(events, "r+b") as f:
        f.truncate(events.stat().st_size - 3)  # torn last record of a killed job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for name, (flags, aps, times) in RUNS.items():
        write_run(str(root / name), {**BASE_CONFIG, **flags}, aps, times)
    # died in its first epoch before writing hparams: flags from config.json, nothing else
    write_run(str(root / "died"), {**BASE_CONFIG, "dynamic_scale": "type1"}, [], [], with_hparams=False)
    truncate_events(root / "died")
    return root


def hms(seconds):
    seconds = round(seconds)
    return f"{seconds // 3600}:{(seconds // 60) % 60:02d}:{seconds % 60:02d}"


def expected_rows():
    """Plain reference: best = first maximum, epochs are 1-based (epochs done), time is H:MM:SS."""
    rows = []
    for name in sorted([*RUNS, "died"]):
        if name == "died":
            rows.append([name, "type1", "False", "-", "-", "-", "0", "-"])
            continue
        flags, aps, times = RUNS[name]
        best_i = 0
        for i, ap in enumerate(aps):
            if ap > aps[best_i]:
                best_i = i
        config = {**BASE_CONFIG, **flags}
        rows.append([name, config["dynamic_scale"], str(config["query_mixture"]), f"{aps[best_i]:.4f}",
                     str(best_i + 1), f"{aps[-1]:.4f}", str(len(aps)), hms(sum(times))])
    return rows


EXPECTED_HEADER = ["run", "dynamic_scale", "query_mixture", "best AP", "epoch of best", "last AP", "epochs done",
                   "time"]


def run_compare(*args):
    return run_script("experiments.compare", args)


def parse_markdown(stdout):
    return md_tables.table(stdout.splitlines())


def colours(path):
    with Image.open(path) as image:
        assert image.width > 300 and image.height > 200
        return {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}


def near(colours_found, rgb, tolerance=12):
    return any(all(abs(a - b) <= tolerance for a, b in zip(c, rgb)) for c in colours_found)


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours
C0_BAND = tuple(round(255 + 0.2 * (c - 255)) for c in C0)  # C0 at alpha 0.2 on white


def band_pixels(path):
    """Pixels of C0's band colour: tens of thousands for a band, a few hundred from anti-aliased line edges."""
    with Image.open(path) as image:
        return sum(n for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)
                   if all(abs(a - b) <= 4 for a, b in zip(rgb, C0_BAND)))


def test_per_run_table_csv_and_plot(sweep, tmp_path):
    out = tmp_path / "out"
    result = run_compare(str(sweep), "--metric", "AP", "--out", str(out), "--all_columns")
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
    assert not (out / "compare_groups.csv").exists()
    found = colours(out / "compare_AP.png")
    assert len(found) > 10 and near(found, C0) and near(found, C1)
    assert band_pixels(out / "compare_AP.png") < 300, "single runs have no band"


@pytest.mark.quick
def test_importable_api_and_single_run_dir(sweep):
    runs = load_runs([str(sweep / "type2")])
    assert [r.name for r in runs] == ["type2"]
    assert runs[0].config["dynamic_scale"] == "type2" and runs[0].config["epochs"] == 3
    assert [v for _, v in runs[0].metric("AP")] == pytest.approx([0.20, 0.25, 0.40])
    header, rows = compare_table(runs, "ap")
    # A single run has no differing flags.
    assert header == ["run", "best AP", "epoch of best", "last AP", "epochs done", "time"]
    assert rows == [["type2", "0.4000", "3", "0.4000", "3", "1:03:51"]]


def test_resumed_run_shows_its_latest_flags_and_both_epoch_columns(tmp_path):
    """config.json is rewritten at every start; TensorBoard's hparams keep the first start's values."""
    root = tmp_path / "resumed"
    write_run(str(root / "short"), BASE_CONFIG, [0.1, 0.2, 0.3], [10.0] * 3)
    write_run(str(root / "longer"), BASE_CONFIG, [0.1, 0.2, 0.3, 0.35, 0.5], [10.0] * 5,
              config_json={"epochs": 5})
    result = run_compare(str(root), "--all_columns")
    assert result.returncode == 0, result.stderr
    header, rows = parse_markdown(result.stdout)
    assert header == ["run", "epochs", "best AP", "epoch of best", "last AP", "epochs done", "time"]
    assert rows == [["longer", "5", "0.5000", "5", "0.5000", "5", "0:00:50"],
                    ["short", "3", "0.3000", "3", "0.3000", "3", "0:00:30"]]


# name -> (flags, seed, AP per epoch); a: 3 seeds, b: 2 seeds with results + 1 that died, c: a single run
SEEDED = {
    "a/seed0": ({}, 0, [0.10, 0.30, 0.25]),
    "a/seed1": ({}, 1, [0.20, 0.20, 0.35]),
    "a/seed2": ({}, 2, [0.05, 0.40, 0.30]),
    "b/seed0": ({"dynamic_scale": "type2"}, 0, [0.50, 0.60, 0.55]),
    "b/seed1": ({"dynamic_scale": "type2"}, 1, [0.45, 0.70, 0.65]),
    "b/seed2": ({"dynamic_scale": "type2"}, 2, []),
    "c": ({"lr": 2e-4}, 42, [0.30, 0.10, 0.20]),
}
SECONDS = 60.0


@pytest.fixture
def seeded(tmp_path):
    root = tmp_path / "seeded"
    for name, (flags, seed, aps) in SEEDED.items():
        write_run(str(root / name), {**BASE_CONFIG, **flags, "seed": seed}, aps, [SECONDS] * len(aps))
    return root


def reference_stats(values):
    """Plain mean and sample standard deviation (n - 1)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def expected_group(names):
    """(best, epoch of best, last) reference stats over the named runs that logged AP."""
    logged = [SEEDED[n][2] for n in names if SEEDED[n][2]]
    best = [max(aps) for aps in logged]
    epoch = [float(aps.index(max(aps)) + 1) for aps in logged]
    last = [aps[-1] for aps in logged]
    return len(logged), reference_stats(best), reference_stats(epoch), reference_stats(last)


def cell(stats, digits):
    mean, std = stats
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_seed_groups_mean_std_n_against_a_plain_reference(seeded, tmp_path):
    result = run_compare(str(seeded), "--metric", "AP", "--band", "minmax", "--all_columns")
    assert result.returncode == 0, result.stderr
    header, rows = parse_markdown(result.stdout)
    assert header == ["run", "dynamic_scale", "lr", "seeds", "n", "best AP", "epoch of best", "last AP",
                      "epochs done", "time"]
    groups = {"a": ["a/seed0", "a/seed1", "a/seed2"], "b": ["b/seed0", "b/seed1", "b/seed2"], "c": ["c"]}
    expected = []
    for name, members in groups.items():
        n, best, epoch, last = expected_group(members)
        flags, seeds = SEEDED[members[0]][0], [str(SEEDED[m][1]) for m in members]
        epochs = [len(SEEDED[m][2]) for m in members]
        done = str(epochs[0]) if len(set(epochs)) == 1 else f"{min(epochs)}-{max(epochs)}"
        times = [SECONDS * len(SEEDED[m][2]) for m in members if SEEDED[m][2]]
        expected.append([name, flags.get("dynamic_scale", "none"), str(flags.get("lr", 1e-4)), " ".join(seeds),
                         str(n), cell(best, 4), cell(epoch, 1), cell(last, 4), done, hms(sum(times) / len(times))])
    assert rows == expected
    # hand-checked: a's best values 0.30, 0.35, 0.40 -> mean 0.35, std 0.05; its epochs of best 2, 3, 2
    assert rows[0][5:8] == ["0.3500 ± 0.0500", "2.3 ± 0.6", "0.3000 ± 0.0500"]
    assert rows[1][4:9] == ["2", "0.6500 ± 0.0707", "2.0 ± 0.0", "0.6000 ± 0.0707", "0-3"]
    assert rows[2][4:6] == ["1", "0.3000"]  # one run: no ±

    with open(seeded / "compare_groups.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["a", "b", "c"]
    for row, members in zip(table, groups.values()):
        n, best, epoch, last = expected_group(members)
        assert int(row["n"]) == n
        for column, (mean, std) in (("best AP", best), ("epoch of best", epoch), ("last AP", last)):
            # event files store float32 values
            assert float(row[f"{column} mean"]) == pytest.approx(mean, rel=1e-6)
            assert (row[f"{column} std"] == "") if std is None else float(row[f"{column} std"]) == pytest.approx(std)
    assert float(table[0]["best AP min"]) == pytest.approx(0.30) and float(table[0]["best AP max"]) == pytest.approx(0.40)

    with open(seeded / "compare.csv", newline="") as f:
        per_run = list(csv.DictReader(f))
    assert [(r["run"], r["group"], r["seed"]) for r in per_run] == [
        (name, name.split("/")[0], str(seed)) for name, (_, seed, _) in SEEDED.items()]
    found = colours(seeded / "compare_AP.png")
    with_band = band_pixels(seeded / "compare_AP.png")
    assert near(found, C0) and with_band > 5000, "group a: mean line and its band"

    per_run = run_compare(str(seeded), "--per_run", "--out", str(tmp_path / "o"), "--band", "none")
    header, rows = parse_markdown(per_run.stdout)
    assert header[:4] == ["run", "dynamic_scale", "lr", "seed"] and [r[0] for r in rows] == list(SEEDED)
    assert band_pixels(tmp_path / "o" / "compare_AP.png") < with_band / 20


def test_groups_from_flags_not_names_and_repeated_seeds_are_noted(tmp_path):
    root = tmp_path / "manual"
    write_run(str(root / "run_x"), BASE_CONFIG, [0.2], [1.0])
    write_run(str(root / "run_y"), {**BASE_CONFIG, "seed": 7}, [0.4], [1.0])
    write_run(str(root / "run_z"), BASE_CONFIG, [0.6], [1.0])
    groups = group_runs(load_runs([str(root)]))
    assert [(g.name, [r.name for r in g.runs]) for g in groups] == [
        ("run_x + run_y + run_z", ["run_x", "run_y", "run_z"])]
    result = run_compare(str(root), "--all_columns")
    header, rows = parse_markdown(result.stdout)
    assert rows == [["run_x + run_y + run_z", "42 7 42", "3", "0.4000 ± 0.2000", "1.0 ± 0.0", "0.4000 ± 0.2000",
                     "1", "0:00:01"]]
    assert "note: run_x + run_y + run_z: seed 42 in more than one run (run_x, run_y, run_z)" in result.stdout


def test_default_out_is_never_a_run_folder(seeded, sweep):
    runs = load_runs([str(seeded)])
    assert default_out([str(seeded)], runs) == str(seeded)
    one = load_runs([str(seeded / "c")])
    assert default_out([str(seeded / "c")], one) == str(seeded)
    both = [str(seeded / "a" / "seed0"), str(seeded / "b" / "seed1")]
    assert default_out(both, load_runs(both)) == str(seeded)
    assert default_out([str(seeded / "a")], load_runs([str(seeded / "a")])) == str(seeded / "a")

    result = run_compare(str(sweep / "type2"), "--metric", "AP50")
    assert result.returncode == 0, result.stderr
    assert (sweep / "compare.csv").exists() and (sweep / "compare_AP50.png").exists()
    assert not any(p.name.startswith("compare") for p in (sweep / "type2").iterdir())


def test_other_metric(sweep):
    result = run_compare(str(sweep), "--metric", "AP50")
    assert result.returncode == 0, result.stderr
    header, rows = parse_markdown(result.stdout)
    assert header[3:6] == ["best AP50", "epoch of best", "last AP50"]
    assert {tuple(r[3:6]) for r in rows if r[0] != "died"} == {("0.5000", "1", "0.5000")}


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
