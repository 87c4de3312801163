"""experiments/compare.py's default table: the run name, the flags that differ (paths left out), seeds and n, the
metric columns; --all_columns adds the rest (the CSVs always hold every column)."""
import csv

import pytest

from experiments import compare
from tests import md_tables
from tests.test_compare import BASE_CONFIG, write_run


def table(stdout):
    header, rows = md_tables.table(stdout.splitlines())
    return [header, *rows]


@pytest.fixture
def mixed(tmp_path):
    """Two ablations of two seeds each, trained on different data folders (a path flag that differs)."""
    root = tmp_path / "mixed"
    runs = (("a/seed0", "none", 0, "/data/x", 0.1), ("a/seed1", "none", 1, "/data/x", 0.3),
            ("b/seed0", "type2", 0, "/data/y", 0.5), ("b/seed1", "type2", 1, "/data/y", 0.7))
    for name, scale, seed, data, ap in runs:
        write_run(str(root / name), {**BASE_CONFIG, "dynamic_scale": scale, "seed": seed, "coco_path": data},
                  [ap / 2, ap], [60.0, 60.0])
    return root


@pytest.mark.quick
def test_default_table_is_names_differing_flags_seeds_n_and_metrics(mixed, tmp_path, capsys):
    compare.main([str(mixed), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert table(out) == [["run", "dynamic_scale", "seeds", "n", "best AP", "epoch of best", "last AP"],
                          ["a", "none", "0 1", "2", "0.2000 ± 0.1414", "2.0 ± 0.0", "0.2000 ± 0.1414"],
                          ["b", "type2", "0 1", "2", "0.6000 ± 0.1414", "2.0 ± 0.0", "0.6000 ± 0.1414"]]
    assert "not shown: coco_path, epochs done, time (--all_columns, or the CSVs)" in out.splitlines()
    with open(tmp_path / "out" / "compare_groups.csv", newline="") as f:
        assert "coco_path" in next(csv.reader(f))


def test_all_columns_adds_paths_epochs_and_time(mixed, tmp_path, capsys):
    compare.main([str(mixed), "--out", str(tmp_path / "out"), "--all_columns", "--per_run"])
    header, *rows = table(capsys.readouterr().out)
    assert header == ["run", "coco_path", "dynamic_scale", "seed", "best AP", "epoch of best", "last AP",
                      "epochs done", "time"]
    assert [row[:4] for row in rows] == [["a/seed0", "/data/x", "none", "0"], ["a/seed1", "/data/x", "none", "1"],
                                         ["b/seed0", "/data/y", "type2", "0"], ["b/seed1", "/data/y", "type2", "1"]]
