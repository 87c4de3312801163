"""Compare runs from their TensorBoard events: a markdown table, a CSV and a metric-vs-epoch plot.

    python experiments/compare.py RUN_DIR... [--metric AP] [--out DIR]

Each RUN_DIR is a run folder (holds events.out.tfevents.*) or a sweep root (every run folder below it).
The table has one row per run and the columns
    run | <each flag whose value differs between runs> | best <metric> | epoch of best | last <metric> | epochs | time
Epochs are counted as util/tb.py writes them: step = epochs done, so 'epoch of best' is 1-based.
Runs still training, or that died early, show '-' where nothing was logged yet.
"""
import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

if __package__ in (None, ""):
    # Run as a script (python experiments/compare.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from util.errors import UserError
from util.tb import COCO_METRIC_NAMES, hparam_value

# Flags that name this run's own files or restart state; they differ between runs without being ablations.
PER_RUN_FLAGS = frozenset({"output_dir", "resume", "start_epoch", "dist_url", "rank", "gpu", "local_rank"})
MISSING = "-"
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
    # Flag -> value (str/bool/int/float); empty when neither hparams data nor config.json exist yet.
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
    config = _read_hparams(acc) or _read_config_json(run_dir)
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


def resolve_metric(metric: str) -> str:
    for name in COCO_METRIC_NAMES:
        if name.lower() == metric.lower():
            return name
    raise UserError(f"--metric {metric}: unknown metric; choose one of {', '.join(COCO_METRIC_NAMES)}")


def differing_flags(runs: list[Run]) -> list[str]:
    """Flags whose value is not the same in every run that has a configuration (a missing flag differs)."""
    configs = [run.config for run in runs if run.config]
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


def compare_table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the comparison; rows in the order of runs."""
    metric = resolve_metric(metric)
    flags = differing_flags(runs)
    header = ["run", *flags, f"best {metric}", "epoch of best", f"last {metric}", "epochs", "time"]
    rows = []
    for run in runs:
        series = run.metric(metric)
        if series:
            # max() keeps the first of equal values, so ties report the earliest epoch.
            best_step, best = max(series, key=lambda sv: sv[1])
            metric_cells = [f"{best:.4f}", str(best_step), f"{series[-1][1]:.4f}"]
        else:
            metric_cells = [MISSING] * 3
        flag_cells = [_format_value(run.config.get(f, MISSING)) if run.config else MISSING for f in flags]
        rows.append([run.name, *flag_cells, *metric_cells, str(run.epochs), _format_time(run.total_time)])
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


def plot_metric(path: str, runs: list[Run], metric: str) -> None:
    """One line per run: metric against epochs done. Agg canvas, so no display and no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = resolve_metric(metric)
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for run in runs:
        series = run.metric(metric)
        if series:
            steps, values = zip(*series)
            # The colour cycle has 10 colours; a new line style per 10 runs keeps big sweeps apart.
            style = ("-", "--", ":", "-.")[plotted // 10 % 4]
            ax.plot(steps, values, linestyle=style, marker="o", markersize=3, label=run.name)
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare runs (TensorBoard events) in a table, a CSV and a plot.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or sweep roots")
    parser.add_argument("--metric", default="AP", help=f"COCO metric, one of {', '.join(COCO_METRIC_NAMES)}")
    parser.add_argument("--out", default=None, help="folder for compare.csv and compare_<metric>.png "
                        "(default: the first RUN_DIR)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    metric = resolve_metric(args.metric)
    runs = load_runs(args.run_dirs)
    header, rows = compare_table(runs, metric)
    out = args.out or args.run_dirs[0]
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "compare.csv")
    png_path = os.path.join(out, f"compare_{metric}.png")
    write_csv(csv_path, header, rows)
    plot_metric(png_path, runs, metric)
    print(format_markdown(header, rows))
    print(f"\nwrote {csv_path} and {png_path}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
