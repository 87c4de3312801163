"""Compare runs from their TensorBoard events: a markdown table, CSVs, a metric-vs-epoch plot and loss plots.

    python experiments/compare.py RUN_DIR... [--metric AP] [--out DIR] [--plot metric loss]
        [--band std|minmax|none] [--x epoch|images] [--per_run]

Each RUN_DIR is a run folder (holds events.out.tfevents.*) or a sweep root (every run folder below it).

Runs whose flags differ only in --seed form a group (a sweep with 'seeds:' writes them to <name>/seed<k>).
When some group has more than one run, the printed table has one row per group:
    run | <each flag that differs between groups> | seeds | n | best <metric> | epoch of best | last <metric>
        | epochs done | time
with 'mean ± std' over the group's n runs that logged the metric (sample standard deviation, n - 1), the
range of epochs done (a run still training shows as 8-10) and the mean time per run. Without groups, one row
per run:
    run | <each flag that differs between runs> | best <metric> | epoch of best | last <metric> | epochs done | time
When a run folder holds eval.json (a later `main.py --eval --output_dir RUN`), a column '<metric> (eval.json)'
shows that evaluation, apart from the training's own numbers.
Epochs are counted as util/tb.py writes them: step = epochs done, so 'epoch of best' is 1-based.
Runs still training, or that died early, show '-' where nothing was logged yet.

The printed table leaves out what --all_columns adds: flags whose values are paths (data folders, checkpoints),
'epochs done' and 'time' (a line after the table names them; the CSVs hold every column).

Flag values come from the run's config.json, the latest start's (experiments/runs.py reads the runs).

Files, in --out (default: the sweep root given, or the folder holding the given run folders, never a run
folder): compare.csv (the per-run table, plus each run's group when there are groups), compare_groups.csv
(one row per group: n and the unrounded mean, std, min and max; when there are groups), compare_<metric>.png
(per group the mean curve with a ±std or min-max band, a plain line for a single run) and, with --plot loss,
compare_loss.png (log.txt curves: experiments/plot_logs.py).
"""
import argparse
import csv
import math
import os
import statistics
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    # Run as a script (python experiments/compare.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import plot_logs
from experiments.runs import MISSING, Group, Run, format_value, group_runs, load_runs, per_run_flags
from util.errors import UserError
from util.tb import COCO_METRIC_NAMES, METRIC_TAGS, PANOPTIC_METRIC_NAMES

PLOTS = ("metric", "loss")
# columns the printed table shows only with --all_columns (besides flags whose values are paths)
DETAIL_COLUMNS = ("epochs done", "time")


def default_out(paths: list[str], runs: list[Run]) -> str:
    """The folder the given paths share, moved up until it is not a run folder (nor inside one)."""
    run_dirs = [os.path.abspath(run.path) for run in runs]
    out = os.path.commonpath([os.path.abspath(p) for p in paths])
    while any(out == d or out.startswith(d + os.sep) for d in run_dirs) and os.path.dirname(out) != out:
        out = os.path.dirname(out)
    return out


def resolve_metric(metric: str) -> str:
    """The METRIC_TAGS name of ``metric`` (case-insensitive): a COCO bbox stat, segm_<stat> (mask AP) or PQ, SQ, RQ
    and their _th / _st versions (panoptic runs)."""
    for name in METRIC_TAGS:
        if name.lower() == metric.lower():
            return name
    raise UserError(f"--metric {metric}: unknown metric; choose one of {', '.join(METRIC_TAGS)}")


_TAG_KINDS = {"coco": "COCO bbox", "segm": "COCO mask", "panoptic": "panoptic"}


def metric_label(metric: str) -> str:
    """'COCO bbox AP', 'COCO mask AP', 'panoptic PQ'."""
    kind, name = METRIC_TAGS[metric].split("/")
    return f"{_TAG_KINDS[kind]} {name}"


def differing_flags(configs: list[dict]) -> list[str]:
    """Flags whose value is not the same in every non-empty config (a missing flag differs)."""
    configs = [c for c in configs if c]
    names = sorted(set().union(*configs) - per_run_flags()) if configs else []
    return [n for n in names if len({format_value(c.get(n, MISSING)) for c in configs}) > 1]


def path_flags(configs: list[dict]) -> set:
    """Flags with a path among their values (a data folder, a checkpoint): long, and rarely what an ablation varies."""
    return {name for config in configs for name, value in config.items()
            if isinstance(value, str) and os.sep in value}


def default_columns(header: list[str], rows: list[list[str]], hidden: set) -> tuple[list[str], list[list[str]], list]:
    """The table without the ``hidden`` columns, and the names of those it had."""
    keep = [i for i, name in enumerate(header) if name not in hidden]
    dropped = [name for name in header if name in hidden]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows], dropped


def _format_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _flag_cells(config: dict, flags: list[str]) -> list[str]:
    return [format_value(config.get(f, MISSING)) if config else MISSING for f in flags]


def compare_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the per-run comparison; rows in the order of runs."""
    metric = resolve_metric(metric)
    flags = differing_flags([run.config for run in runs])
    evaluated = any(run.evaluated for run in runs)
    header = ["run", *flags, f"best {metric}", "epoch of best", f"last {metric}",
              *([eval_column(metric)] if evaluated else []), "epochs done", "time"]
    rows = []
    for run in runs:
        summary = run.summary(metric)
        metric_cells = ([f"{summary[0]:.4f}", str(summary[1]), f"{summary[2]:.4f}"] if summary
                        else [MISSING] * 3)
        if evaluated:
            metric_cells.append(Stat([run.evaluated[metric]] if metric in run.evaluated else []).format(4))
        rows.append([run.name, *_flag_cells(run.config, flags), *metric_cells, str(run.epochs),
                     _format_time(run.total_time)])
    return header, rows


def eval_column(metric: str) -> str:
    """The column of a later ``main.py --eval --output_dir RUN`` (eval.json), apart from the training's own."""
    return f"{metric} (eval.json)"


@dataclass
class Stat:
    """Mean, sample standard deviation (None for n < 2), min and max of the values of a group."""
    values: list

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self):
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self):
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def format(self, digits: int) -> str:
        if not self.values:
            return MISSING
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def group_stats(group: Group, metric: str) -> dict:
    """'best', 'epoch', 'last': Stat over the runs that logged the metric; 'epochs' (done) and 'time' over all."""
    summaries = [s for s in (run.summary(metric) for run in group.runs) if s is not None]
    return {"best": Stat([s[0] for s in summaries]), "epoch": Stat([float(s[1]) for s in summaries]),
            "last": Stat([s[2] for s in summaries]), "epochs": Stat([float(run.epochs) for run in group.runs]),
            "time": Stat([run.total_time for run in group.runs if run.total_time is not None])}


def group_table(groups: list[Group], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the per-group comparison (mean ± std over seeds)."""
    metric = resolve_metric(metric)
    flags = differing_flags([group.config for group in groups])
    evaluated = any(run.evaluated for group in groups for run in group.runs)
    header = ["run", *flags, "seeds", "n", f"best {metric}", "epoch of best", f"last {metric}",
              *([eval_column(metric)] if evaluated else []), "epochs done", "time"]
    rows = []
    for group in groups:
        stats = group_stats(group, metric)
        low, high = (min(stats["epochs"].values), max(stats["epochs"].values))
        epochs = f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"
        eval_cell = [Stat([r.evaluated[metric] for r in group.runs if metric in r.evaluated]).format(4)]
        rows.append([group.name, *_flag_cells(group.config, flags), " ".join(map(format_value, group.seeds)),
                     str(stats["best"].n), stats["best"].format(4), stats["epoch"].format(1),
                     stats["last"].format(4), *(eval_cell if evaluated else []), epochs,
                     _format_time(stats["time"].mean)])
    return header, rows


def _number(value) -> str:
    return "" if value is None else repr(value)


def group_csv_rows(groups: list[Group], metric: str) -> tuple[list[str], list[list[str]]]:
    """compare_groups.csv: unformatted numbers, mean/std/min/max for best, epoch of best and last."""
    metric = resolve_metric(metric)
    flags = differing_flags([group.config for group in groups])
    columns = [f"best {metric}", "epoch of best", f"last {metric}"]
    header = ["run", *flags, "seeds", "n", *[f"{c} {s}" for c in columns for s in ("mean", "std", "min", "max")],
              "epochs done min", "epochs done max", "time mean"]
    rows = []
    for group in groups:
        stats = group_stats(group, metric)
        cells = []
        for key in ("best", "epoch", "last"):
            stat = stats[key]
            cells += [_number(stat.mean), _number(stat.std), _number(min(stat.values, default=None)),
                      _number(max(stat.values, default=None))]
        rows.append([group.name, *_flag_cells(group.config, flags), " ".join(map(format_value, group.seeds)),
                     str(stats["best"].n), *cells, _number(min(stats["epochs"].values)),
                     _number(max(stats["epochs"].values)), _number(stats["time"].mean)])
    return header, rows


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_csv(path: str, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot_metric(path: str, groups: list[Group], metric: str, band: str = "std") -> None:
    """Metric against epochs done: per group its mean curve with a band (runs that logged the metric; the
    epochs they all reached), a plain line for a single run. Agg canvas: no display, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = resolve_metric(metric)
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for group in groups:
        curves = [tuple(zip(*run.metric(metric))) for run in group.runs if run.metric(metric)]
        label = group.name if len(curves) < 2 else f"{group.name} (mean of {len(curves)}, band: {band})"
        # The colour cycle has 10 colours; a new line style per 10 groups keeps big sweeps apart.
        style = ("-", "--", ":", "-.")[plotted // 10 % 4]
        if curves and plot_logs.draw(ax, curves, label, f"C{plotted % 10}", band, style, "o"):
            plotted += 1
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {METRIC_TAGS[metric]} logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (epochs done)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} per epoch")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_loss(path: str, groups: list[Group], band: str = "std", x: str = "epoch") -> int:
    """log.txt curves (plot_logs.DEFAULT_FIELDS) per group; returns how many runs had a log.txt."""
    plotted, sources = [], []
    for group in groups:
        logs = [(run, os.path.join(run.path, "log.txt")) for run in group.runs]
        records = [plot_logs.read_log(log) for run, log in logs if os.path.isfile(log)]
        if records:
            plotted.append((group.name, records))
            sources.append(next(log for _, log in logs if os.path.isfile(log)))
    if not plotted:
        raise UserError("--plot loss: none of the runs has a log.txt yet (it gets a line per finished epoch)")
    plot_logs.plot_groups(path, plotted, x=x, band=band, sources=sources)
    return sum(len(records) for _, records in plotted)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare runs (TensorBoard events) in a table, CSVs and plots; "
                                                 "runs that differ only in --seed are grouped (mean ± std).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or sweep roots")
    parser.add_argument("--metric", default="AP",
                        help=f"COCO bbox metric ({', '.join(COCO_METRIC_NAMES)}), segm_<that> (mask AP) or, for "
                             f"panoptic runs, {', '.join(PANOPTIC_METRIC_NAMES)}")
    parser.add_argument("--out", default=None, help="folder for the CSVs and PNGs (default: the sweep root, or the "
                        "folder holding the given run folders)")
    parser.add_argument("--plot", nargs="+", choices=PLOTS, default=["metric"],
                        help="metric: compare_<metric>.png; loss: compare_loss.png from log.txt (default: metric)")
    parser.add_argument("--band", choices=plot_logs.BANDS, default="std",
                        help="around a group's mean curve: ±1 sample std (default), min-max, or none")
    parser.add_argument("--x", choices=plot_logs.X_AXES, default="epoch", help="x axis of --plot loss")
    parser.add_argument("--per_run", action="store_true", help="print one row per run even when runs are grouped")
    parser.add_argument("--all_columns", action="store_true",
                        help="also print flags with path values, epochs done and time")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    metric = resolve_metric(args.metric)
    runs = load_runs(args.run_dirs)
    groups = group_runs(runs)
    grouped = any(len(group.runs) > 1 for group in groups)
    out = args.out or default_out(args.run_dirs, runs)
    os.makedirs(out, exist_ok=True)
    header, rows = compare_table(runs, metric)
    written = [os.path.join(out, "compare.csv")]
    if grouped:
        group_of = {id(run): group.name for group in groups for run in group.runs}
        write_csv(written[0], [*header, "group"], [[*row, group_of[id(run)]] for row, run in zip(rows, runs)])
    else:
        write_csv(written[0], header, rows)
    if grouped:
        written.append(os.path.join(out, "compare_groups.csv"))
        write_csv(written[-1], *group_csv_rows(groups, metric))
    if "metric" in args.plot:
        written.append(os.path.join(out, f"compare_{metric}.png"))
        plot_metric(written[-1], groups, metric, args.band)
    if "loss" in args.plot:
        written.append(os.path.join(out, "compare_loss.png"))
        plot_loss(written[-1], groups, args.band, args.x)
    hidden = set() if args.all_columns else {*DETAIL_COLUMNS, *path_flags([run.config for run in runs])}
    if grouped and not args.per_run:
        shown, shown_rows, dropped = default_columns(*group_table(groups, metric), hidden)
        print(format_markdown(shown, shown_rows))
        print(f"\nmean ± sample std over the n runs of each group (runs that differ only in --seed); "
              f"one row per run: --per_run or compare.csv")
    else:
        shown, shown_rows, dropped = default_columns(header, rows, hidden)
        print(format_markdown(shown, shown_rows))
    if dropped:
        print(f"not shown: {', '.join(dropped)} (--all_columns, or the CSVs)")
    for group in groups:
        repeated = sorted({format_value(s) for s in group.seeds if group.seeds.count(s) > 1})
        if len(group.runs) > 1 and repeated:
            print(f"note: {group.name}: seed {' '.join(repeated)} in more than one run "
                  f"({', '.join(run.name for run in group.runs)}); each counts as a sample")
    print(f"\nwrote {' and '.join(written)}")


def cli(argv=None) -> int:
    """The command line: exit code 2 with one line for bad input."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
