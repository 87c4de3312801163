"""Runs on disk, as experiments/compare.py reads them: a run folder's flags and epoch-axis scalars, and the
groups of runs that differ only in --seed.

A run folder is any folder holding TensorBoard event files (util/tb.py writes them straight into the run's
--output_dir). Its flags come from config.json, which main.py rewrites at every start, so a run resumed
with new flags (--epochs 20) shows them; TensorBoard's HPARAMS data keeps the first start's values and is
only used when config.json is missing.
"""
import json
import os
import re
from dataclasses import dataclass, field

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from options import BOOKKEEPING_FLAGS
from util.errors import UserError
from util.tb import COCO_METRIC_NAMES, EVAL_TAG_PREFIXES, METRIC_TAGS, hparam_value, panoptic_metrics



def per_run_flags() -> frozenset:
    """What compare.py neither shows as a column nor lets keep two seeds apart: the flags marked bookkeeping where
    they are defined (options.py) and the per-process values main.py stores beside the flags (util.dist, which
    imports torch: loaded when runs are compared, not for --help)."""
    from util.dist import RUNTIME_KEYS

    return frozenset(BOOKKEEPING_FLAGS) | frozenset(RUNTIME_KEYS)
SEED_FLAG = "seed"
MISSING = "-"
EVAL_JSON = "eval.json"  # what main.py --eval --output_dir RUN writes: evaluate()'s stats
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
    # METRIC_TAGS name -> value of the run folder's eval.json (a later --eval); empty without one
    evaluated: dict = field(default_factory=dict)

    def metric(self, name: str) -> list[tuple[int, float]]:
        """The series of a metric of util.tb.METRIC_TAGS ('AP', 'segm_AP', 'PQ', ...)."""
        return self.scalars.get(METRIC_TAGS[name], [])

    @property
    def epochs(self) -> int:
        """Epochs done: the last epoch-axis step written (epoch/time, else any evaluation metric)."""
        steps = [s for s, _ in self.scalars.get("epoch/time", [])]
        steps += [s for tag, series in self.scalars.items() if tag.startswith(EVAL_TAG_PREFIXES) for s, _ in series]
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


def eval_metrics(stats: dict) -> dict:
    """The METRIC_TAGS names ('AP', 'segm_AP', 'PQ', ...) of engine.evaluate's stats."""
    metrics = dict(zip(COCO_METRIC_NAMES, stats.get("coco_eval_bbox") or ()))
    metrics.update({f"segm_{k}": v for k, v in zip(COCO_METRIC_NAMES, stats.get("coco_eval_masks") or ())})
    metrics.update(panoptic_metrics(stats))
    return metrics


def _read_eval_json(run_dir: str) -> dict:
    path = os.path.join(run_dir, EVAL_JSON)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return eval_metrics(json.load(f))
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path}: cannot read ({e}); rerun main.py --eval or delete the file") from e


def load_run(run_dir: str, name: str) -> Run:
    acc = event_accumulator.EventAccumulator(run_dir, size_guidance=SIZE_GUIDANCE)
    acc.Reload()
    wanted = [t for t in acc.Tags()["scalars"] if t.startswith(EVAL_TAG_PREFIXES) or t == "epoch/time"]
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in wanted}
    # config.json is rewritten at every start (a resume with new flags); the hparams keep the first start's
    config = _read_config_json(run_dir) or _read_hparams(acc)
    return Run(name=name, path=run_dir, config=config, scalars=scalars, evaluated=_read_eval_json(run_dir))


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


def format_value(value) -> str:
    """A flag value as the tables print it (1.0 -> '1')."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _group_key(run: Run):
    per_run = per_run_flags()
    flags = {k: format_value(v) for k, v in run.config.items() if k not in per_run and k != SEED_FLAG}
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
