"""Time and memory of a training step and of inference: plain DETR against the SMCA ablations, both prior routes
and main.py's speed flags, on a synthetic batch (``python -m experiments.benchmark model``, the default mode).

    python -m experiments.benchmark [model] [--variants NAME...] [--routes fused explicit] [--accels NAME...]
        [--steps train infer] [--queries Q...] [--sizes S...] [--batch_size B] [--device cpu|cuda] [--warmup N]
        [--samples N] [--compile_backend B] [--amp] [--threads N] [--memory tensors|rss] [--memory_only]
        [--json PATH] [--csv PATH] [-- MAIN.PY FLAGS...]

    # item 4 of the speed issue at 512 px (docs/benchmarks.md has the commands)
    python -m experiments.benchmark model --device cpu --threads 1 --queries 300 --sizes 512 --steps train \\
        --variants none type2 type4 type2+both --routes fused --accels default channels_last compile both

What one measurement is
  train:     forward + criterion + backward + gradient clipping (--clip_max_norm, 0.1 as DETR) + AdamW step
  inference: model.eval(), no_grad, forward + post-processing
Cells: ``none`` (DETR) once per accel, every other variant once per route in --routes (main.py's --prior_impl)
and accel in --accels (default; channels_last, compile, both: main.py's --channels_last / --compile). Every cell
is built once (same seed: shared parameters have the same values), all in one process; a cell's train and infer
steps share its model. After --warmup untimed rounds (compilation happens there), --samples rounds each call
every step once, interleaved (experiments/benchmark_rounds.py), timing wall and process CPU time. Reported per
cell: the median step time over the rounds, and paired ratios with a bootstrap 95% interval, 'not resolved'
when wider than +-3%: ``/none`` divides by DETR with the same accel in the same round (the targets' ratio),
``/default`` by the same variant and route without speed flags. Peak memory: after the timings, one cell at a
time on a freshly built model, in a pass of its own (experiments/benchmark_common.py; on CPU exact tensor bytes
by default, --memory rss for the resident set); --memory_only measures it alone, without rounds. The load
average is printed at the start and the end.

Image sizes: ``S`` means DETR's shape, min side S and max side 1333: S x min(round(S * 1333 / 800), 1333)
(512 -> 512x853, 800 -> 800x1333); ``HxW`` gives the shape directly. The batch is --batch_size random images of
one size with 3 to 6 random boxes each (fixed seed). Weights are random (no download).

Model flags after ``--`` go to main.py's parser (unknown flags are an error). The benchmark sets the variant,
route, accel flags, --batch_size, --device and --amp itself; --num_classes defaults to COCO's 91. --cls_loss
stays 'auto' as in training (focal with a spatial prior, ce without).
"""
import argparse
import csv
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import main as detr_main
from datasets import COCO_NUM_CLASSES
from experiments.benchmark_common import (BASELINE, Timing, MIB, MULTISCALE_VARIANTS, NO_ROUTE, VARIANTS, environment,
                                          image_shape, memory_meter, MEMORY_METHODS, ratio, set_threads, split_model_flags,
                                          write_json)
from experiments.benchmark_rounds import Ratio, check_samples, interleave, load_average, paired_ratio
from experiments.benchmark_steps import STEPS, Built, memory_step, synthetic_batch
from options import COMPILE_BACKENDS, PRIOR_IMPLS
import run_setup
from util.errors import UserError

# flags the benchmark sets itself; passing them after -- would silently lose or fight the grid
RESERVED_FLAGS = ("--num_queries", "--dynamic_scale", "--head_mixture", "--query_mixture", "--prior_impl",
                  "--batch_size", "--device", "--amp", "--channels_last", "--compile", "--fixed_size")
MODEL_VARIANTS = {**VARIANTS, **MULTISCALE_VARIANTS}
DEFAULT_ACCEL = "default"
# accel name -> main.py speed flags (docs/training-and-run-folders.md, "Speed flags"); compile: --compile_backend
ACCELS: Dict[str, List[str]] = {DEFAULT_ACCEL: [], "channels_last": ["--channels_last"], "compile": ["--compile"],
                                "both": ["--channels_last", "--compile"]}
MEASURES = ("time", "cpu")  # wall and process CPU seconds per step


# ---------------------------------------------------------------------------------------------------- grid

@dataclass
class Config:
    variants: List[str]
    queries: List[int]
    sizes: List[Tuple[int, int]]
    routes: List[str] = field(default_factory=lambda: list(PRIOR_IMPLS))
    accels: List[str] = field(default_factory=lambda: [DEFAULT_ACCEL])
    steps: List[str] = field(default_factory=lambda: list(STEPS))
    batch_size: int = 2
    device: str = "cpu"
    warmup: int = 1
    samples: int = 10
    compile_backend: str = "inductor"
    amp: bool = False
    model_flags: List[str] = field(default_factory=list)
    memory: str = MEMORY_METHODS[0]  # the CPU meter (experiments/benchmark_common.py)
    timing: bool = True  # False (--memory_only): no rounds, peak memory only

    def cells(self) -> List[Tuple[str, str, str]]:
        """(variant, route, accel): DETR once per accel, every SMCA variant once per route and accel."""
        return [(v, r, a) for a in self.accels for v in self.variants
                for r in ([NO_ROUTE] if v == BASELINE else self.routes)]


@dataclass
class Row:
    variant: str
    route: str  # --prior_impl, '-' for DETR
    accel: str  # ACCELS name
    queries: int
    height: int
    width: int
    batch_size: int
    times: Dict[str, List[float]] = field(default_factory=dict)  # 'train', 'train_cpu', ...: seconds per round
    seconds: Dict[str, float] = field(default_factory=dict)  # 'train', 'train_cpu', ...: median per round
    mem_mib: Dict[str, float] = field(default_factory=dict)  # 'train', 'infer': peak MiB
    vs_none: Dict[str, Optional[Ratio]] = field(default_factory=dict)  # 'train_time', 'train_cpu', ...
    vs_default: Dict[str, Optional[Ratio]] = field(default_factory=dict)
    mem_vs_none: Dict[str, Optional[float]] = field(default_factory=dict)  # 'train', 'infer'
    mem_vs_default: Dict[str, Optional[float]] = field(default_factory=dict)


def _parse_model_flags(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()], add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise UserError(f"model flags after --: {exc}") from None
    if unknown:
        raise UserError(f"model flags after --: unknown {' '.join(unknown)} (see python main.py --help)")
    return args


def variant_args(config: Config, variant: str, queries: int, route: str = NO_ROUTE,
                 accel: str = DEFAULT_ACCEL) -> argparse.Namespace:
    """Resolved main.py args for one grid cell; bad combinations raise UserError from run_setup.resolve_args."""
    # --compile inductor trains only on one canvas (flag_checks.check_speed_flags); the benchmark feeds one fixed
    # batch per size, never through the data pipeline that reads --fixed_size, so the first size stands for it
    canvas = ["--fixed_size", f"{config.sizes[0][0]}x{config.sizes[0][1]}"] if config.sizes else []
    speed = [part for flag in ACCELS[accel] for part in ([flag, config.compile_backend] + canvas
                                                         if flag == "--compile" else [flag])]
    argv = (["--num_classes", str(COCO_NUM_CLASSES)] + config.model_flags + MODEL_VARIANTS[variant]
            + ["--num_queries", str(queries), "--batch_size", str(config.batch_size), "--device", config.device]
            + ([] if route == NO_ROUTE else ["--prior_impl", route]) + (["--amp"] if config.amp else [])
            + speed)
    args = _parse_model_flags(argv)
    run_setup.resolve_args(args)
    return args


def check_config(config: Config) -> None:
    for name, given, known in (("--variants", config.variants, MODEL_VARIANTS), ("--accels", config.accels, ACCELS),
                               ("--routes", config.routes, PRIOR_IMPLS), ("--steps", config.steps, STEPS)):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            raise UserError(f"{name}: unknown {', '.join(unknown) or '(none given)'}; choose from {' '.join(known)}")
        if len(set(given)) != len(given):
            raise UserError(f"{name}: a name is given twice")
    if config.compile_backend not in COMPILE_BACKENDS:
        raise UserError(f"--compile_backend {config.compile_backend}: choose one of {' '.join(COMPILE_BACKENDS)}")
    problems = check_samples(config.samples) if config.timing else []
    if config.memory not in MEMORY_METHODS:
        raise UserError(f"--memory {config.memory}: choose one of {' '.join(MEMORY_METHODS)}")
    if problems:
        raise UserError(problems[0])
    if config.batch_size <= 0 or config.warmup < 0:
        raise UserError("--batch_size must be positive and --warmup >= 0")
    if any(q <= 0 for q in config.queries):
        raise UserError(f"--queries must be positive, got {config.queries}")
    reserved = [t for t in config.model_flags if t.split("=", 1)[0] in RESERVED_FLAGS]
    if reserved:
        raise UserError(f"model flags after --: {' '.join(reserved)} is set by the benchmark; use --variants, "
                        f"--routes, --accels, --queries, --batch_size, --device, --amp instead")
    for variant, route, accel in config.cells():  # every cell is valid before the first (slow) measurement
        for queries in config.queries:
            variant_args(config, variant, queries, route, accel)


def _step_name(cell: Tuple[str, str, str], kind: str) -> str:
    return f"{cell[0]} ({cell[1]}, {cell[2]}) {kind}"


def run(config: Config, log=print) -> List[Row]:
    """Measure every (size, queries) point: all cells built, interleaved rounds of their steps, then the peak
    memory of each cell in a pass of its own. Rows in (size, queries, cell) order of the config."""
    check_config(config)
    log(f"load average at start: {load_average()}")
    device = torch.device(config.device)
    cells = config.cells()
    num_classes = variant_args(config, cells[0][0], config.queries[0], cells[0][1], cells[0][2]).num_classes
    rows = []
    for height, width in config.sizes:
        samples, targets = synthetic_batch(config.batch_size, height, width, num_classes)
        batch = (samples.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets])
        for queries in config.queries:
            point = f"q={queries} {height}x{width}"
            if config.timing:
                timings = _time_cells(config, cells, queries, batch, device, log=lambda line: log(f"{point}: {line}"))
            point_rows = [Row(cell[0], cell[1], cell[2], queries, height, width, config.batch_size)
                          for cell in cells]
            meter = memory_meter(device, config.memory)  # after the timings: 'rss' changes how memory is returned
            for row, cell in zip(point_rows, cells):
                args = variant_args(config, cell[0], queries, cell[1], cell[2])
                for kind in config.steps:
                    if config.timing:
                        timing = timings[_step_name(cell, kind)]
                        row.times[kind], row.times[f"{kind}_cpu"] = timing.times, timing.cpu_times
                    row.mem_mib[kind] = memory_step(kind, args, batch, device, meter) / MIB
                log(f"{point}: memory {_step_name(cell, '')}: "
                    + ", ".join(f"{kind} {row.mem_mib[kind]:.0f} MiB" for kind in config.steps))
            rows += _with_ratios(point_rows, config.steps)
    return rows


def _time_cells(config: Config, cells, queries: int, batch, device: torch.device, log) -> Dict[str, Timing]:
    """Every cell built at once, then the interleaved rounds of all their steps."""
    steps = {}
    for cell in cells:
        args = variant_args(config, cell[0], queries, cell[1], cell[2])
        built = Built(args, device)
        for kind in config.steps:
            steps[_step_name(cell, kind)] = STEPS[kind](args, *batch, device, built=built)
    log(f"{len(cells)} cells built; {config.warmup} warmup and {config.samples} timed rounds")
    return interleave(steps, device, config.warmup, config.samples, log=log)


def _with_ratios(rows: List[Row], kinds: List[str]) -> List[Row]:
    """Medians, and the paired ratios to DETR with the same accel and to the same cell without speed flags."""
    by_cell = {(r.variant, r.route, r.accel): r for r in rows}
    for row in rows:
        row.seconds = {name: statistics.median(values) for name, values in row.times.items()}
        bases = {"vs_none": by_cell.get((BASELINE, NO_ROUTE, row.accel)),
                 "vs_default": by_cell.get((row.variant, row.route, DEFAULT_ACCEL))}
        for attr, base in bases.items():
            for kind in kinds:
                for measure, key in (("time", kind), ("cpu", f"{kind}_cpu")):
                    getattr(row, attr)[f"{kind}_{measure}"] = (
                        None if base is None or key not in row.times else paired_ratio(row.times[key],
                                                                                       base.times[key]))
                getattr(row, f"mem_{attr}")[kind] = None if base is None else ratio(row.mem_mib[kind],
                                                                                   base.mem_mib[kind])
    return rows


# ---------------------------------------------------------------------------------------------------- output

def _fmt(value) -> str:
    if value is None:
        return "-"
    return value.format() if isinstance(value, Ratio) else f"{value:.3f}"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def table_columns(kinds: List[str]) -> List[str]:
    columns = ["variant", "route", "accel", "queries", "image"]
    for kind in kinds:
        columns += [f"{kind} ms", f"{kind} cpu ms", f"{kind} MiB"]
        for base in (BASELINE, DEFAULT_ACCEL):
            columns += [f"{kind} {measure} /{base}" for measure in MEASURES] + [f"{kind} mem /{base}"]
    return columns


def table_cells(row: Row, kinds: List[str]) -> List[str]:
    cells = [row.variant, row.route, row.accel, str(row.queries), f"{row.height}x{row.width}"]
    for kind in kinds:
        cells += [_ms(row.seconds.get(kind)), _ms(row.seconds.get(f"{kind}_cpu")), f"{row.mem_mib[kind]:.0f}"]
        for attr in ("vs_none", "vs_default"):
            cells += [_fmt(getattr(row, attr)[f"{kind}_{m}"]) for m in MEASURES]
            cells += [_fmt(getattr(row, f"mem_{attr}")[kind])]
    return cells


def markdown(rows: List[Row], env: dict) -> str:
    flags = " ".join(env["model_flags"]) or "(main.py defaults)"
    kinds = env["steps"]
    columns = table_columns(kinds)
    lines = [f"device {env['device']}" + (f" ({env['cuda_device']})" if env["cuda_device"] else "")
             + f", {env['threads']} threads, torch {env['torch']}, batch {env['batch_size']}, "
             + (f"warmup {env['warmup']} rounds, {env['samples']} interleaved rounds (paired samples)" if env["timing"]
                else "no timed rounds (--memory_only)") + ", amp "
             f"{'bf16' if env['amp'] else 'off'}, compile backend {env['compile_backend']}",
             f"load average at start {env['load_start']}, at end {env['load_end']}",
             f"model flags: {flags}",
             f"memory: {env['memory']}",
             "ratios: median of the per-round ratios [bootstrap 95% interval]; 'not resolved': wider than +-3%",
             "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(table_cells(r, kinds)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: List[Row], kinds: List[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table_columns(kinds))
        writer.writerows(table_cells(r, kinds) for r in rows)


# ---------------------------------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m experiments.benchmark model",
        description="Time and memory of a DETR/SMCA training step and inference on a synthetic batch, variants "
                    "interleaved step by step. main.py model flags go after '--'.", allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"any of: {' '.join(MODEL_VARIANTS)} (default: all single-scale ones)")
    parser.add_argument("--routes", nargs="+", default=list(PRIOR_IMPLS), metavar="ROUTE",
                        help=f"--prior_impl values to measure every SMCA variant with: {' '.join(PRIOR_IMPLS)} "
                             f"(default: both)")
    parser.add_argument("--accels", nargs="+", default=[DEFAULT_ACCEL], metavar="NAME",
                        help=f"speed-flag combinations, any of: {' '.join(ACCELS)} (default: {DEFAULT_ACCEL})")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), metavar="KIND",
                        help=f"what to time: {' '.join(STEPS)} (default: both)")
    parser.add_argument("--queries", nargs="+", type=int, default=[100], metavar="Q")
    parser.add_argument("--sizes", nargs="+", default=["800"], metavar="S|HxW",
                        help="min side S (DETR shape S x min(round(S*1333/800), 1333)) or HxW")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (compilation happens here)")
    parser.add_argument("--samples", type=int, default=10, help="timed interleaved rounds (>= 10)")
    parser.add_argument("--compile_backend", default="inductor", help=f"for the compile accels: "
                                                                       f"{' '.join(COMPILE_BACKENDS)}")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory", default=MEMORY_METHODS[0], choices=MEMORY_METHODS,
                        help="CPU peak memory: 'tensors' (live tensor bytes, exact: the same in any run) or 'rss' "
                             "(the process's resident set: also the allocator's cache and the Python heap)")
    parser.add_argument("--memory_only", action="store_true",
                        help="no timed rounds: peak memory per cell only (--samples and --warmup unused)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--csv", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, model_flags = split_model_flags(argv)
    opts = get_args_parser().parse_args(own)
    load_start = load_average()
    try:
        config = Config(variants=opts.variants, routes=opts.routes, accels=opts.accels, steps=opts.steps,
                        queries=opts.queries, sizes=[image_shape(s) for s in opts.sizes],
                        batch_size=opts.batch_size, device=opts.device, warmup=opts.warmup, samples=opts.samples,
                        compile_backend=opts.compile_backend, amp=opts.amp, model_flags=model_flags,
                        memory=opts.memory, timing=not opts.memory_only)
        set_threads(opts.threads)
        rows = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(config.device, memory_meter(torch.device(config.device), config.memory).method,
                      batch_size=config.batch_size, warmup=config.warmup, samples=config.samples,
                      steps=config.steps, compile_backend=config.compile_backend, amp=config.amp,
                      timing=config.timing,
                      model_flags=config.model_flags, load_start=load_start, load_end=load_average())
    print(markdown(rows, env), end="")
    if opts.json:
        write_json(opts.json, {"environment": env, "rows": [asdict(r) for r in rows]})
    if opts.csv:
        write_csv(opts.csv, rows, config.steps)
    return 0
