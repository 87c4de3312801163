"""The seeded tables of the docs are what compare.py computes from the archived runs.

Each archive (experiments/results/<sweep>/, every run's config.json, log.txt and TensorBoard events) is the evidence
behind one docs table; this test recomputes every cell from it with compare.py's own grouping and statistics, so a
table edited by hand, or a run added to the archive without updating the table, fails here.
"""
import re
from pathlib import Path

import pytest

from experiments.compare import group_csv_rows, resolve_metric
from experiments.runs import group_runs, load_runs
from tests import md_tables

pytestmark = pytest.mark.quick

REPO = Path(__file__).resolve().parents[1]
LABELS = ("run", "design", "seeds")  # a table's first columns; every other column is a mean ± std
HEADER = "| " + " | ".join(LABELS) + " |"
# archive -> the docs page whose table (the one under HEADER) it backs
TABLES = {"synthetic_multiscale": "multiscale-smca.md", "synthetic_convergence": "comparing-runs.md"}
NUMERIC_COLUMNS = 7


def docs_table(page: Path) -> tuple[list[str], list[list[str]]]:
    return md_tables.table(page.read_text().splitlines(), HEADER)


def csv_column(doc_column: str) -> tuple[str, str]:
    """'best AP_S' -> ('APs', 'best APs'); 'epoch of best AP' -> ('AP', 'epoch of best')."""
    match = re.fullmatch(r"(best|last|epoch of best) (\w+)", doc_column)
    assert match, f"unknown column {doc_column!r}"
    kind, metric = match.group(1), resolve_metric(match.group(2).replace("_", ""))  # AP_S -> APs
    return metric, "epoch of best" if kind == "epoch of best" else f"{kind} {metric}"


@pytest.fixture(scope="module", params=sorted(TABLES))
def archived(request):
    """(docs page, its table's header and rows, {metric: {run: compare_groups.csv row}}) for one archive."""
    page = REPO / "docs" / TABLES[request.param]
    header, rows = docs_table(page)
    groups = group_runs(load_runs([str(REPO / "experiments" / "results" / request.param)]))
    tables = {}
    for metric in {csv_column(column)[0] for column in header if column not in LABELS}:
        csv_header, csv_rows = group_csv_rows(groups, metric)
        tables[metric] = {row[0]: dict(zip(csv_header, row)) for row in csv_rows}
    return page, header, rows, tables


def test_every_archived_group_is_in_the_table_once(archived):
    page, _, rows, computed = archived
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)), page.name
    assert sorted(names) == sorted(computed["AP"]), page.name


def test_every_cell_is_compare_py_mean_and_std_of_the_archive(archived):
    page, header, rows, computed = archived
    numeric = [(i, column) for i, column in enumerate(header) if column not in LABELS]
    assert len(numeric) == NUMERIC_COLUMNS, page.name
    for row in rows:
        run = row[0]
        assert row[header.index("seeds")] == computed["AP"][run]["seeds"], (page.name, run)
        for i, column in numeric:
            metric, key = csv_column(column)
            mean, std = row[i].split(" ± ")
            digits = len(mean.split(".")[1])
            values = computed[metric][run]
            expected = f"{float(values[f'{key} mean']):.{digits}f} ± {float(values[f'{key} std']):.{digits}f}"
            assert row[i] == expected, f"{page.name}, {run}, {column}: docs {row[i]}, archive {expected}"
