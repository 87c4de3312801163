"""The seeded table of docs/multiscale-smca.md is what compare.py computes from the archived runs.

The archive (experiments/results/synthetic_multiscale/, each run's config.json, log.txt and TensorBoard events)
is the evidence behind the table; this test recomputes every cell from it with compare.py's own grouping and
statistics, so a table edited by hand, or a run added to the archive without updating the table, fails here.
"""
import re
from pathlib import Path

import pytest

from experiments.compare import group_csv_rows, resolve_metric
from experiments.runs import group_runs, load_runs
from tests import md_tables

pytestmark = pytest.mark.quick

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "experiments" / "results" / "synthetic_multiscale"
PAGE = REPO / "docs" / "multiscale-smca.md"
HEADER = "| run | design | seeds |"


def docs_table() -> tuple[list[str], list[list[str]]]:
    return md_tables.table(PAGE.read_text().splitlines(), HEADER)


def csv_column(doc_column: str) -> tuple[str, str]:
    """'best AP_S' -> ('APs', 'best APs'); 'epoch of best AP' -> ('AP', 'epoch of best')."""
    match = re.fullmatch(r"(best|last|epoch of best) (\w+)", doc_column)
    assert match, f"unknown column {doc_column!r} in {PAGE.name}"
    kind, metric = match.group(1), resolve_metric(match.group(2).replace("_", ""))  # AP_S -> APs
    return metric, "epoch of best" if kind == "epoch of best" else f"{kind} {metric}"


@pytest.fixture(scope="module")
def computed():
    groups = group_runs(load_runs([str(ARCHIVE)]))
    tables = {}
    header, _ = docs_table()
    for metric in {csv_column(column)[0] for column in header[3:]}:
        header, rows = group_csv_rows(groups, metric)
        tables[metric] = {row[0]: dict(zip(header, row)) for row in rows}
    return tables


def test_every_archived_group_is_in_the_table_once(computed):
    _, rows = docs_table()
    names = [row[0] for row in rows]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(computed["AP"])


def test_every_cell_is_compare_py_mean_and_std_of_the_archive(computed):
    header, rows = docs_table()
    numeric = [(i, column) for i, column in enumerate(header) if column not in ("run", "design", "seeds")]
    assert len(numeric) == 7
    for row in rows:
        run = row[0]
        assert row[header.index("seeds")] == computed["AP"][run]["seeds"], run
        for i, column in numeric:
            metric, key = csv_column(column)
            mean, std = row[i].split(" ± ")
            digits = len(mean.split(".")[1])
            values = computed[metric][run]
            expected = f"{float(values[f'{key} mean']):.{digits}f} ± {float(values[f'{key} std']):.{digits}f}"
            assert row[i] == expected, f"{run}, {column}: docs {row[i]}, archive {expected}"
