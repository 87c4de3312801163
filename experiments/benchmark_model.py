"""Time and memory of a training step and of inference: plain DETR against the SMCA ablations and both prior
routes, on a synthetic batch (``python -m experiments.benchmark model``, the default mode).

    python -m experiments.benchmark [model] [--variants NAME...] [--routes fused explicit] [--queries Q...]
        [--sizes S...] [--batch_size B] [--device cpu|cuda] [--warmup N] [--iters N] [--repeats N] [--amp]
        [--threads N] [--json PATH] [--csv PATH] [-- MAIN.PY MODEL FLAGS...]

    # the targets: every SMCA variant with the fused route against DETR, R50, 300 queries, 800x1333, batch 2
    python -m experiments.benchmark model --device cpu --threads 1 --queries 300 --sizes 800 --iters 1 \\
        --repeats 3 --json bench.json
    # a small model, quick, on CPU
    python -m experiments.benchmark model --queries 100 300 900 --sizes 512 -- --backbone resnet18 --hidden_dim 128

What one measurement is
  train:     forward + criterion + backward + gradient clipping (--clip_max_norm, 0.1 as DETR) + AdamW step
  inference: model.eval(), no_grad, forward + post-processing
Each is timed for --iters calls after --warmup untimed calls, on a freshly built model (same seed for every
variant and route: the routes share their weights); its peak memory is measured afterwards, in a pass of its
own on another fresh model. The batch is --batch_size random images of one size with
3 to 6 random boxes each, the same (fixed seed) for every variant. Weights are random (no download): time and
memory do not depend on their values. The reported time is the median over all iterations of all repeats;
images/s = batch_size / median seconds. Memory and CPU time: see experiments/benchmark_common.py; the steps
themselves: experiments/benchmark_steps.py.

Cells: ``none`` (DETR) once, every other variant once per route in --routes (main.py's --prior_impl). Image
sizes: ``S`` means DETR's shape, min side S and max side 1333: S x min(round(S * 1333 / 800), 1333)
(512 -> 512x853, 800 -> 800x1333, 1333 -> 1333x1333); ``HxW`` gives the shape directly.
Ratios (``/none``) divide by DETR at the same queries and size in the same run; '-' without ``none``.

Noise: --repeats N times every cell N times per grid point in round-robin order, starting one later each
repeat (drift spreads over all cells), and the median is over all N * iters samples. Memory is measured once
per cell: with the allocator set up as described in experiments/benchmark_common.py it does not drift.

Model flags after ``--`` go to main.py's parser (unknown flags are an error). The benchmark sets
--num_queries, --dynamic_scale, --head_mixture, --query_mixture, --prior_impl, --batch_size, --device and
--amp itself; --num_classes defaults to COCO's 91. --cls_loss stays 'auto' as in training (focal with a
spatial prior, ce without); pass ``-- --cls_loss focal`` to time every variant with the same loss.
"""
import argparse
import csv
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch

import main as detr_main
from datasets import COCO_NUM_CLASSES
from experiments.benchmark_common import (BASELINE, MIB, MULTISCALE_VARIANTS, NO_ROUTE, VARIANTS, environment,
                                          fmt_ratio, image_shape, memory_meter, ratio, split_model_flags)
from experiments.benchmark_steps import STEPS, memory_step, synthetic_batch, time_step
from options import PRIOR_IMPLS
import run_setup
from util.errors import UserError

# flags the benchmark sets itself; passing them after -- would silently lose or fight the grid
RESERVED_FLAGS = ("--num_queries", "--dynamic_scale", "--head_mixture", "--query_mixture", "--prior_impl",
                  "--batch_size", "--device", "--amp")
MODEL_VARIANTS = {**VARIANTS, **MULTISCALE_VARIANTS}


# ---------------------------------------------------------------------------------------------------- grid

@dataclass
class Config:
    variants: List[str]
    queries: List[int]
    sizes: List[Tuple[int, int]]
    routes: List[str] = field(default_factory=lambda: list(PRIOR_IMPLS))
    batch_size: int = 2
    device: str = "cpu"
    warmup: int = 1
    iters: int = 3
    repeats: int = 1
    amp: bool = False
    model_flags: List[str] = field(default_factory=list)

    def cells(self) -> List[Tuple[str, str]]:
        """(variant, route) pairs: DETR once, every SMCA variant once per route."""
        return [(v, NO_ROUTE) if v == BASELINE else (v, r) for v in self.variants
                for r in ([NO_ROUTE] if v == BASELINE else self.routes)]


@dataclass
class Row:
    variant: str
    route: str  # --prior_impl, '-' for DETR
    queries: int
    height: int
    width: int
    batch_size: int
    train_s: float  # median wall seconds per step
    train_img_s: float
    train_cpu_s: float  # median process CPU seconds per step
    train_mem_mib: float
    infer_s: float
    infer_img_s: float
    infer_cpu_s: float
    infer_mem_mib: float
    train_time_ratio: Optional[float] = None  # / baseline at the same queries and size
    train_cpu_ratio: Optional[float] = None
    train_mem_ratio: Optional[float] = None
    infer_time_ratio: Optional[float] = None
    infer_cpu_ratio: Optional[float] = None
    infer_mem_ratio: Optional[float] = None
    train_times: List[float] = field(default_factory=list)
    infer_times: List[float] = field(default_factory=list)
    train_cpu_times: List[float] = field(default_factory=list)
    infer_cpu_times: List[float] = field(default_factory=list)


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


def variant_args(config: Config, variant: str, queries: int, route: str = NO_ROUTE) -> argparse.Namespace:
    """Resolved main.py args for one grid cell; bad combinations raise UserError from run_setup.resolve_args."""
    argv = (["--num_classes", str(COCO_NUM_CLASSES)] + config.model_flags + MODEL_VARIANTS[variant]
            + ["--num_queries", str(queries), "--batch_size", str(config.batch_size), "--device", config.device]
            + ([] if route == NO_ROUTE else ["--prior_impl", route]) + (["--amp"] if config.amp else []))
    args = _parse_model_flags(argv)
    run_setup.resolve_args(args)
    return args


def check_config(config: Config) -> None:
    unknown = [v for v in config.variants if v not in MODEL_VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {' '.join(MODEL_VARIANTS)}")
    if len(set(config.variants)) != len(config.variants) or len(set(config.routes)) != len(config.routes):
        raise UserError("--variants / --routes: a name is given twice")
    bad_routes = [r for r in config.routes if r not in PRIOR_IMPLS]
    if bad_routes or not config.routes:
        raise UserError(f"--routes: choose one or both of {' '.join(PRIOR_IMPLS)}, got {' '.join(config.routes)}")
    if config.batch_size <= 0 or config.iters <= 0 or config.repeats <= 0 or config.warmup < 0:
        raise UserError("--batch_size, --iters and --repeats must be positive and --warmup >= 0")
    if any(q <= 0 for q in config.queries):
        raise UserError(f"--queries must be positive, got {config.queries}")
    reserved = [t for t in config.model_flags if t.split("=", 1)[0] in RESERVED_FLAGS]
    if reserved:
        raise UserError(f"model flags after --: {' '.join(reserved)} is set by the benchmark; use --variants, "
                        f"--routes, --queries, --batch_size, --device, --amp instead")
    for variant, route in config.cells():  # every cell is valid before the first (slow) measurement
        for queries in config.queries:
            variant_args(config, variant, queries, route)


def run(config: Config, log=print) -> List[Row]:
    """Measure every (size, queries, variant, route) cell; rows in (size, queries, cell) order of the config.
    Times first (round-robin over the cells, --repeats passes), then the memory of every cell in a pass of its
    own (experiments/benchmark_common.py)."""
    check_config(config)
    device = torch.device(config.device)
    cells = config.cells()
    num_classes = variant_args(config, cells[0][0], config.queries[0], cells[0][1]).num_classes
    batches = {}
    for height, width in config.sizes:
        samples, targets = synthetic_batch(config.batch_size, height, width, num_classes)
        batches[height, width] = (samples.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets])
    points = [(size, queries) for size in config.sizes for queries in config.queries]
    results = {point: {cell: {f"{kind}{part}": [] for kind in STEPS for part in ("", "_cpu", "_mem")}
                       for cell in cells} for point in points}
    total, done = len(points) * len(cells) * (config.repeats + 1), 0
    for (size, queries) in points:
        for repeat in range(config.repeats):
            # round-robin, one later each repeat: slow drift does not always hit the same cell
            shift = repeat % len(cells)
            for cell in cells[shift:] + cells[:shift]:
                args = variant_args(config, cell[0], queries, cell[1])
                samples = results[size, queries][cell]
                for kind in STEPS:
                    timing = time_step(kind, args, batches[size], device, config.warmup, config.iters)
                    samples[kind] += timing.times
                    samples[f"{kind}_cpu"] += timing.cpu_times
                done += 1
                log(f"[{done}/{total}] time {cell[0]} ({cell[1]}) q={queries} {size[0]}x{size[1]} repeat {repeat + 1}: "
                    f"train {statistics.median(samples['train'][-config.iters:]) * 1000:.0f} ms, "
                    f"infer {statistics.median(samples['infer'][-config.iters:]) * 1000:.0f} ms")
    meter = memory_meter(device)  # after the timings: on CPU it changes how memory is returned
    for (size, queries) in points:
        for cell in cells:
            args = variant_args(config, cell[0], queries, cell[1])
            samples = results[size, queries][cell]
            for kind in STEPS:
                samples[f"{kind}_mem"].append(memory_step(kind, args, batches[size], device, meter))
            done += 1
            log(f"[{done}/{total}] memory {cell[0]} ({cell[1]}) q={queries} {size[0]}x{size[1]}: "
                f"train {samples['train_mem'][-1] / MIB:.0f} MiB, infer {samples['infer_mem'][-1] / MIB:.0f} MiB")
    return [row for (size, queries) in points for row in _rows(config, results[size, queries], queries, *size)]


def _rows(config: Config, samples: dict, queries: int, height: int, width: int) -> List[Row]:
    rows = {}
    for (variant, route), s in samples.items():
        train_s, infer_s = statistics.median(s["train"]), statistics.median(s["infer"])
        rows[variant, route] = Row(variant=variant, route=route, queries=queries, height=height, width=width,
                                   batch_size=config.batch_size,
                                   train_s=train_s, train_img_s=config.batch_size / train_s,
                                   train_cpu_s=statistics.median(s["train_cpu"]),
                                   train_mem_mib=statistics.median(s["train_mem"]) / MIB,
                                   infer_s=infer_s, infer_img_s=config.batch_size / infer_s,
                                   infer_cpu_s=statistics.median(s["infer_cpu"]),
                                   infer_mem_mib=statistics.median(s["infer_mem"]) / MIB,
                                   train_times=s["train"], infer_times=s["infer"],
                                   train_cpu_times=s["train_cpu"], infer_cpu_times=s["infer_cpu"])
    base = rows.get((BASELINE, NO_ROUTE))
    if base is not None:
        for row in rows.values():
            for kind in STEPS:
                for name, value in (("time", "s"), ("cpu", "cpu_s"), ("mem", "mem_mib")):
                    setattr(row, f"{kind}_{name}_ratio",
                            ratio(getattr(row, f"{kind}_{value}"), getattr(base, f"{kind}_{value}")))
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------- output

def table_columns(device: str) -> List[str]:
    """Per step kind: wall ms, images/s, MiB and the ratios to the baseline (CPU time ratio on CPU only)."""
    columns = ["variant", "route", "queries", "image"]
    for kind in STEPS:
        columns += [f"{kind} ms", f"{kind} img/s", f"{kind} MiB", f"{kind} time /{BASELINE}"]
        columns += [f"{kind} cpu /{BASELINE}"] if device == "cpu" else []
        columns += [f"{kind} mem /{BASELINE}"]
    return columns


CSV_FIELDS = [name for name in Row.__dataclass_fields__ if not name.endswith("_times")]


def worst_ratios(rows: List[Row], route: str) -> str:
    """One line per (queries, size): the largest training time and memory ratios among the route's variants,
    the numbers the targets are about."""
    lines = []
    for key in dict.fromkeys((r.queries, r.height, r.width) for r in rows):
        mine = [r for r in rows if (r.queries, r.height, r.width) == key and r.route == route
                and r.train_time_ratio is not None]
        if mine:
            slow = max(mine, key=lambda r: r.train_time_ratio)
            big = max(mine, key=lambda r: r.train_mem_ratio)
            lines.append(f"{route} route, {key[0]} queries, {key[1]}x{key[2]}: largest train time /{BASELINE} "
                         f"{slow.train_time_ratio:.3f} ({slow.variant}), largest train mem /{BASELINE} "
                         f"{big.train_mem_ratio:.3f} ({big.variant})")
    return "\n".join(lines)


def markdown(rows: List[Row], env: dict) -> str:
    flags = " ".join(env["model_flags"]) or "(main.py defaults)"
    device = torch.device(env["device"]).type
    columns = table_columns(device)
    lines = [f"device {env['device']}" + (f" ({env['cuda_device']})" if env["cuda_device"] else "")
             + f", {env['threads']} threads, torch {env['torch']}, batch {env['batch_size']}, warmup {env['warmup']}, "
             f"iters {env['iters']} x repeats {env['repeats']} (median), amp {'bf16' if env['amp'] else 'off'}",
             f"model flags: {flags}",
             f"memory: {env['memory']}",
             "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        cells = [r.variant, r.route, str(r.queries), f"{r.height}x{r.width}"]
        for kind in STEPS:
            cells += [f"{getattr(r, f'{kind}_s') * 1000:.1f}", f"{getattr(r, f'{kind}_img_s'):.3f}",
                      f"{getattr(r, f'{kind}_mem_mib'):.0f}", fmt_ratio(getattr(r, f"{kind}_time_ratio"))]
            cells += [fmt_ratio(getattr(r, f"{kind}_cpu_ratio"))] if device == "cpu" else []
            cells += [fmt_ratio(getattr(r, f"{kind}_mem_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    summary = "\n".join(filter(None, (worst_ratios(rows, route) for route in PRIOR_IMPLS)))
    return "\n".join(lines) + "\n" + (f"\n{summary}\n" if summary else "")


def write_json(path: str, rows: List[Row], env: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)


def write_csv(path: str, rows: List[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


# ---------------------------------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m experiments.benchmark model",
        description="Time and memory of a DETR/SMCA training step and inference on a synthetic batch. "
                    "main.py model flags go after '--'.", allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"any of: {' '.join(MODEL_VARIANTS)} (default: all single-scale ones)")
    parser.add_argument("--routes", nargs="+", default=list(PRIOR_IMPLS), metavar="ROUTE",
                        help=f"--prior_impl values to measure every SMCA variant with: {' '.join(PRIOR_IMPLS)} "
                             f"(default: both)")
    parser.add_argument("--queries", nargs="+", type=int, default=[100], metavar="Q")
    parser.add_argument("--sizes", nargs="+", default=["800"], metavar="S|HxW",
                        help="min side S (DETR shape S x min(round(S*1333/800), 1333)) or HxW")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin passes over the cells")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--csv", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, model_flags = split_model_flags(argv)
    opts = get_args_parser().parse_args(own)
    try:
        config = Config(variants=opts.variants, routes=opts.routes, queries=opts.queries,
                        sizes=[image_shape(s) for s in opts.sizes], batch_size=opts.batch_size, device=opts.device,
                        warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats, amp=opts.amp,
                        model_flags=model_flags)
        if opts.threads is not None:
            if opts.threads <= 0:
                raise UserError(f"--threads must be positive, got {opts.threads}")
            torch.set_num_threads(opts.threads)
        rows = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(config.device, memory_meter(torch.device(config.device)).method,
                      batch_size=config.batch_size, warmup=config.warmup, iters=config.iters,
                      repeats=config.repeats, amp=config.amp, model_flags=config.model_flags)
    print(markdown(rows, env), end="")
    if opts.json:
        write_json(opts.json, rows, env)
    if opts.csv:
        write_csv(opts.csv, rows)
    return 0
