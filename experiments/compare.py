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
Epochs are counted as util/tb.py writes them: step = epochs done, so 'epoch of best' is 1-based.
Runs still training, or that died early, show '-' where nothing was logged yet.

Flag values come from the run's config.json, which main.py rewrites at every start, so a run resumed with
new flags (--epochs 20) shows them; TensorBoard's HPARAMS data keeps the first start's values and is only
used when config.json is missing.

Files, in --out (default: the sweep root given, or the folder holding the given run folders, never a run
folder): compare.csv (the per-run table, plus each run's group when there are groups), compare_groups.csv
(one row per group: n and the unrounded mean, std, min and max; when there are groups), compare_<metric>.png (per group the mean curve with a ±std or
min-max band, a plain line for a single run) and, with --plot loss, compare_loss.png (log.txt curves:
experiments/plot_logs.py).
"""
import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):
    # Run as a script (python experiments/compare.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from experiments import plot_logs
from util.errors import UserError
from util.tb import COCO_METRIC_NAMES, hparam_value

# Flags that name this run's own files or restart state, or change no number of the run (the COCO backends
# score alike, logging intervals, the cache folder): they differ between runs without being ablations, and
# are neither columns nor a reason to keep two seeds apart.
PER_RUN_FLAGS = frozenset({"output_dir", "resume", "start_epoch", "dist_url", "rank", "gpu", "local_rank",
                           "synthetic_root", "coco_backend", "log_every", "save_every", "trust_checkpoint"})
SEED_FLAG = "seed"
MISSING = "-"
PLOTS = ("metric", "loss")
# '<name>/seed3' (sweep files with seeds) and '<name>_seed3' / '<name>-seed3' name one seed of <name>
SEED_SUFFIX = re.compile(r"(^|[/_-])seed\d+$")
# Keep every scalar: the default reservoir would subsample long series.
SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.IMAGES: 1,
    event_accumulator.AUDIO: 1,
    event_accumulator.TENSORS: 1,
}


@dataclass
class Run:
    name: str
    path: str
    # Flag -> value (str/bool/int/float); empty when neither config.json nor hparams data exist yet.
    config: dict = field(default_factory=dict)
    # TensorBoard tag ('coco/AP', 'epoch/time') -> [(step, value)], steps increasing.
    scalars: dict = field(default_factory=dict)

    def metric(self, name: str) -> list[tuple[int, float]]:
        return self.scalars.get(f"coco/{name}", [])

    @property
    def epochs(self) -> int:
        """Epochs done: the last epoch-axis step written (epoch/time, else any coco/ metric)."""
        steps = [s for s, _ in self.scalars.get("epoch/time", [])]
        steps += [s for tag, series in self.scalars.items() if tag.startswith("coco/") for s, _ in series]
        return max(steps, default=0)

    @property
    def total_time(self) -> float | None:
        times = self.scalars.get("epoch/time")
        return sum(v for _, v in times) if times else None

    def summary(self, metric: str) -> tuple[float, int, float] | None:
        """(best value, epochs done at the best, last value) of a COCO metric; None before its first value."""
        series = self.metric(metric)
        if not series:
            return None
        # max() keeps the first of equal values, so ties report the earliest epoch.
        best_step, best = max(series, key=lambda sv: sv[1])
        return best, best_step, series[-1][1]


@dataclass
class Group:
    """Runs whose flags differ only in --seed."""
    name: str
    runs: list

    @property
    def config(self) -> dict:
        return {k: v for k, v in self.runs[0].config.items() if k != SEED_FLAG}

    @property
    def seeds(self) -> list:
        return [run.config.get(SEED_FLAG, MISSING) for run in self.runs]


def find_run_dirs(path: str) -> list[str]:
    """Every folder at or below path that holds TensorBoard event files, sorted."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory; pass a run folder or a sweep root")
    runs = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        if any(event_accumulator.io_wrapper.IsSummaryEventsFile(name) for name in filenames):
            runs.append(dirpath)
    return sorted(runs)


def _read_hparams(acc) -> dict:
    """Flags from the HPARAMS plugin's session-start data; {} when the run has not written it yet."""
    try:
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    except KeyError:
        return {}
    raw = content.get(hparams_metadata.SESSION_START_INFO_TAG)
    if raw is None:
        return {}
    start = hparams_metadata.parse_session_start_info_plugin_data(raw)
    config = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            number = value.number_value
            # Struct stores every number as a double; flags like --epochs were ints.
            config[name] = int(number) if number.is_integer() else number
        elif kind == "bool_value":
            config[name] = value.bool_value
        elif kind == "string_value":
            config[name] = value.string_value
    return config


def _read_config_json(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e}); fix or delete the file") from e
    return {name: hparam_value(value) for name, value in config.items()}


def load_run(run_dir: str, name: str) -> Run:
    acc = event_accumulator.EventAccumulator(run_dir, size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    wanted = [t for t in acc.Tags()["scalars"] if t.startswith("coco/") or t == "epoch/time"]
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in wanted}
    # config.json is rewritten at every start (a resume with new flags); the hparams keep the first start's
    config = _read_config_json(run_dir) or _read_hparams(acc)
    return Run(name=name, path=run_dir, config=config, scalars=scalars)


def load_runs(paths: list[str]) -> list[Run]:
    """Runs under the given run folders / sweep roots, named by their folder relative to the root given."""
    found = []
    for root in paths:
        for run_dir in find_run_dirs(root):
            rel = os.path.relpath(run_dir, root)
            name = os.path.basename(os.path.abspath(root)) if rel == "." else rel
            found.append((run_dir, name))
    if not found:
        raise UserError(f"no run folder (with events.out.tfevents.* files) found under: {' '.join(paths)}")
    names = [name for _, name in found]
    if len(set(names)) != len(names):
        # Two roots holding runs of the same name: name them from the common parent instead.
        common = os.path.commonpath([os.path.abspath(d) for d, _ in found])
        found = [(d, os.path.relpath(os.path.abspath(d), common)) for d, _ in found]
    return [load_run(run_dir, name) for run_dir, name in found]


def default_out(paths: list[str], runs: list[Run]) -> str:
    """The folder the given paths share, moved up until it is not a run folder (nor inside one)."""
    run_dirs = [os.path.abspath(run.path) for run in runs]
    out = os.path.commonpath([os.path.abspath(p) for p in paths])
    while any(out == d or out.startswith(d + os.sep) for d in run_dirs) and os.path.dirname(out) != out:
        out = os.path.dirname(out)
    return out


def resolve_metric(metric: str) -> str:
    for name in COCO_METRIC_NAMES:
        if name.lower() == metric.lower():
            return name
    raise UserError(f"--metric {metric}: unknown metric; choose one of {', '.join(COCO_METRIC_NAMES)}")


def _group_key(run: Run):
    flags = {k: _format_value(v) for k, v in run.config.items() if k not in PER_RUN_FLAGS and k != SEED_FLAG}
    return tuple(sorted(flags.items()))


def _group_name(runs: list[Run]) -> str:
    """The runs' common name without its seed suffix ('type2/seed0' -> 'type2'); names joined with ' + ' when
    they differ; the parent folder's name when only a seed is left ('seed0' under runs/type2 -> 'type2')."""
    names = [SEED_SUFFIX.sub("", run.name) for run in runs]
    if set(names) == {""}:
        return os.path.basename(os.path.dirname(os.path.abspath(runs[0].path)))
    return " + ".join(dict.fromkeys(name or run.name for name, run in zip(names, runs)))


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of runs whose flags differ only in --seed, in the order of their first run. A run without a
    configuration (nothing written yet) is a group of its own."""
    groups: dict = {}
    for i, run in enumerate(runs):
        key = _group_key(run) if run.config else ("no config", i)
        groups.setdefault(key, []).append(run)
    return [Group(_group_name(members), members) for members in groups.values()]


def differing_flags(configs: list[dict]) -> list[str]:
    """Flags whose value is not the same in every non-empty config (a missing flag differs)."""
    configs = [c for c in configs if c]
    names = sorted(set().union(*configs) - PER_RUN_FLAGS) if configs else []
    return [n for n in names if len({_format_value(c.get(n, MISSING)) for c in configs}) > 1]


def _format_value(value) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _format_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _flag_cells(config: dict, flags: list[str]) -> list[str]:
    return [_format_value(config.get(f, MISSING)) if config else MISSING for f in flags]


def compare_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the per-run comparison; rows in the order of runs."""
    metric = resolve_metric(metric)
    flags = differing_flags([run.config for run in runs])
    header = ["run", *flags, f"best {metric}", "epoch of best", f"last {metric}", "epochs done", "time"]
    rows = []
    for run in runs:
        summary = run.summary(metric)
        metric_cells = ([f"{summary[0]:.4f}", str(summary[1]), f"{summary[2]:.4f}"] if summary
                        else [MISSING] * 3)
        rows.append([run.name, *_flag_cells(run.config, flags), *metric_cells, str(run.epochs),
                     _format_time(run.total_time)])
    return header, rows


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
    header = ["run", *flags, "seeds", "n", f"best {metric}", "epoch of best", f"last {metric}", "epochs done",
              "time"]
    rows = []
    for group in groups:
        stats = group_stats(group, metric)
        low, high = (min(stats["epochs"].values), max(stats["epochs"].values))
        epochs = f"{low:.0f}" if low == high else f"{low:.0f}-{high:.0f}"
        rows.append([group.name, *_flag_cells(group.config, flags), " ".join(map(_format_value, group.seeds)),
                     str(stats["best"].n), stats["best"].format(4), stats["epoch"].format(1),
                     stats["last"].format(4), epochs, _format_time(stats["time"].mean)])
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
        rows.append([group.name, *_flag_cells(group.config, flags), " ".join(map(_format_value, group.seeds)),
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
        ax.text(0.5, 0.5, f"no coco/{metric} logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (epochs done)")
    ax.set_ylabel(f"COCO bbox {metric}")
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
    parser.add_argument("--metric", default="AP", help=f"COCO metric, one of {', '.join(COCO_METRIC_NAMES)}")
    parser.add_argument("--out", default=None, help="folder for the CSVs and PNGs (default: the sweep root, or the "
                        "folder holding the given run folders)")
    parser.add_argument("--plot", nargs="+", choices=PLOTS, default=["metric"],
                        help="metric: compare_<metric>.png; loss: compare_loss.png from log.txt (default: metric)")
    parser.add_argument("--band", choices=plot_logs.BANDS, default="std",
                        help="around a group's mean curve: ±1 sample std (default), min-max, or none")
    parser.add_argument("--x", choices=plot_logs.X_AXES, default="epoch", help="x axis of --plot loss")
    parser.add_argument("--per_run", action="store_true", help="print one row per run even when runs are grouped")
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
    if grouped and not args.per_run:
        print(format_markdown(*group_table(groups, metric)))
        print(f"\nmean ± sample std over the n runs of each group (runs that differ only in --seed); "
              f"one row per run: --per_run or compare.csv")
    else:
        print(format_markdown(header, rows))
    for group in groups:
        repeated = sorted({_format_value(s) for s in group.seeds if group.seeds.count(s) > 1})
        if len(group.runs) > 1 and repeated:
            print(f"note: {group.name}: seed {' '.join(repeated)} in more than one run "
                  f"({', '.join(run.name for run in group.runs)}); each counts as a sample")
    print(f"\nwrote {' and '.join(written)}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
