"""This fork's training step against the original SMCA code's, interleaved in one process
(``python -m experiments.benchmark seed``).

    python -m experiments.benchmark seed --seed_repo PATH [--dynamic_scale type2] [--accels NAME...]
        [--queries Q] [--size S|HxW] [--batch_size B] [--warmup N] [--samples N] [--threads N] [--json PATH]

    git clone https://github.com/gaopengcuhk/SMCA-DETR /tmp/SMCA-DETR
    python -m experiments.benchmark seed --seed_repo /tmp/SMCA-DETR --threads 1 --queries 300 --size 512 \\
        --accels default channels_last compile both --warmup 2 --samples 20

The original code is not a dependency: it is imported from the checkout given with --seed_repo. Its top-level
packages ``models`` and ``util`` have this repo's names, so they are imported with this repo's modules of those
names set aside (sys.modules), and put aside again afterwards: the objects built keep their own modules. Its
parser is its main.py's ``get_args_parser``, read from the file's syntax tree and run alone (importing main.py
would import its datasets and engine); its defaults are the original run's, with --num_queries, --dynamic_scale
and --device set from the flags here, and ``is_main_process`` patched to False so that torchvision builds the
ResNet with random weights instead of downloading them (both models start from random weights). Its util/misc.py
misreads torchvision 0.10 and later as older than 0.7 at import (float of the version's first three characters);
while it is imported, torchvision.__version__ reads '0.7' (_torchvision_version_as_seed_reads_it). Nothing else
of the original code is changed.

Cells: ``seed`` (the original code) and ``fork <accel>`` for each --accels entry (main.py's --dynamic_scale with
the fused prior, focal loss as the original, plus --channels_last / --compile). Both models are built with the
same seed and get the same synthetic batch (experiments/benchmark_steps.py); one training step is forward,
criterion, weighted loss, backward, clip to 0.1, AdamW (backbone at --lr_backbone), the same code for both. The
rounds interleave the cells step by step (experiments/benchmark_rounds.py); each fork cell's wall and CPU time
per round is divided by the seed's in the same round, reported as the median with a bootstrap 95% interval.
Peak memory, after the rounds, one cell at a time on a fresh model (experiments/benchmark_common.py).
"""
import argparse
import ast
import contextlib
import importlib
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from experiments.benchmark_common import (MEMORY_METHODS, MIB, environment, image_shape, memory_meter, peak_memory,
                                          ratio, set_threads, split_model_flags, write_json)
from experiments.benchmark_model import ACCELS, DEFAULT_ACCEL, Config, check_config, variant_args
from experiments.benchmark_rounds import Ratio, interleave, load_average, paired_ratio
from experiments.benchmark_steps import Built, make_train_step, synthetic_batch
from util.errors import UserError

SEED_PACKAGES = ("models", "util")  # the original code's top-level packages imported here (same names as ours)
SEED_FILES = ("main.py", "models/__init__.py", "models/transformer.py", "util/misc.py")
SEED_SCALES = ("type1", "type2", "type3", "type4")  # the original code's --dynamic_scale values
SEED_CELL = "seed"
SEED_URL = "https://github.com/gaopengcuhk/SMCA-DETR"


@dataclass
class SeedCode:
    parser: argparse.ArgumentParser  # the original main.py's get_args_parser()
    build_model: Callable  # its models.build_model(args) -> model, criterion, postprocessors
    nested_tensor_from_tensor_list: Callable  # its util.misc batching


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@contextlib.contextmanager
def _own_packages_set_aside():
    """While inside: this repo's modules named like the original code's packages are out of sys.modules; on exit
    the original code's modules go and ours come back."""
    ours = {name: module for name, module in sys.modules.items() if _top(name) in SEED_PACKAGES}
    for name in ours:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if _top(n) in SEED_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(ours)


@contextlib.contextmanager
def _torchvision_version_as_seed_reads_it():
    """The original util/misc.py tests ``float(torchvision.__version__[:3]) < 0.7`` at import, which reads 0.10 and
    later as 0.1 and then imports names torchvision removed long ago. While inside, torchvision.__version__ is
    '0.7' (the oldest release the test lets through) if the real one is 0.7 or later."""
    import torchvision

    real = torchvision.__version__
    major, minor = (int(part) for part in real.split("+")[0].split(".")[:2])
    if (major, minor) >= (0, 7):
        torchvision.__version__ = "0.7"
    try:
        yield
    finally:
        torchvision.__version__ = real


def _parser_from_main(path: str) -> argparse.ArgumentParser:
    """The original main.py's get_args_parser(), compiled on its own (the rest of main.py is not run)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "get_args_parser"]
    if not functions:
        raise UserError(f"--seed_repo: {path} has no get_args_parser(); is this the original SMCA code ({SEED_URL})?")
    namespace = {"argparse": argparse}
    exec(compile(ast.Module(body=functions, type_ignores=[]), path, "exec"), namespace)
    return namespace["get_args_parser"]()


def load_seed(repo: str) -> SeedCode:
    """Import the original SMCA code from a checkout (module docstring)."""
    missing = [name for name in SEED_FILES if not os.path.isfile(os.path.join(repo, name))]
    if missing:
        raise UserError(f"--seed_repo {repo}: no {', '.join(missing)}; give a checkout of the original SMCA code "
                        f"(git clone {SEED_URL})")
    repo = os.path.abspath(repo)
    parser = _parser_from_main(os.path.join(repo, "main.py"))
    with _own_packages_set_aside(), _torchvision_version_as_seed_reads_it():
        sys.path.insert(0, repo)
        try:
            seed_models = importlib.import_module("models")
            backbone = importlib.import_module("models.backbone")
            misc = importlib.import_module("util.misc")
        finally:
            sys.path.remove(repo)
    backbone.is_main_process = lambda: False  # pretrained=False: random ResNet weights, no download
    return SeedCode(parser, seed_models.build_model, misc.nested_tensor_from_tensor_list)


def seed_args(seed: SeedCode, dynamic_scale: str, queries: int, device: str) -> argparse.Namespace:
    """The original parser's defaults with the variant, queries and device set; plus what the shared training
    step and Built read: no autocast, no speed flags (the original code has none)."""
    args = seed.parser.parse_args(["--dynamic_scale", dynamic_scale, "--num_queries", str(queries),
                                   "--device", device])
    args.amp, args.channels_last, args.compile = False, False, None
    return args


# ---------------------------------------------------------------------------------------------------- run

@dataclass
class Row:
    cell: str  # 'seed' or 'fork <accel>'
    seconds: Dict[str, float] = field(default_factory=dict)  # 'train', 'train_cpu': median per round
    times: Dict[str, List[float]] = field(default_factory=dict)  # 'train', 'train_cpu': seconds per round
    mem_mib: float = 0.0
    vs_seed: Dict[str, Optional[Ratio]] = field(default_factory=dict)  # 'time', 'cpu'
    mem_vs_seed: Optional[float] = None


def fork_cell(accel: str) -> str:
    return f"fork {accel}"


def seed_config(dynamic_scale: str, accels: List[str], queries: int, size, batch_size: int = 2, warmup: int = 1,
                samples: int = 10, device: str = "cpu", memory: str = MEMORY_METHODS[0],
                model_flags: Optional[List[str]] = None) -> Config:
    """The fork's cells as a ``model``-mode grid (one variant, the fused route, training steps), so that
    benchmark_model.check_config validates them as it does that mode's."""
    return Config(variants=[dynamic_scale], queries=[queries], sizes=[size], routes=["fused"], accels=accels,
                  steps=["train"], batch_size=batch_size, device=device, warmup=warmup, samples=samples,
                  memory=memory, model_flags=list(model_flags or []))


def run(seed: SeedCode, config: Config, log=print) -> List[Row]:
    check_config(config)
    (dynamic_scale,), (queries,), (size,) = config.variants, config.queries, config.sizes
    device, batch_size = torch.device(config.device), config.batch_size
    fork_args = {fork_cell(a): variant_args(config, dynamic_scale, queries, "fused", a) for a in config.accels}
    original_args = seed_args(seed, dynamic_scale, queries, str(device))
    samples_tensor, targets = synthetic_batch(batch_size, size[0], size[1], fork_args[fork_cell(config.accels[0])].num_classes)
    images = [image.to(device) for image in samples_tensor.tensors]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    seed_samples = [seed.nested_tensor_from_tensor_list(images), targets]  # its model reads sizes from targets
    fork_samples = samples_tensor.to(device)

    def build_step(cell: str):
        if cell == SEED_CELL:
            return make_train_step(original_args, seed_samples, targets, device,
                                   built=Built(original_args, device, build=seed.build_model))
        return make_train_step(fork_args[cell], fork_samples, targets, device)

    cells = [SEED_CELL] + list(fork_args)
    steps = {cell: build_step(cell) for cell in cells}
    log(f"{len(cells)} cells built; {config.warmup} warmup and {config.samples} timed rounds")
    timings = interleave(steps, device, config.warmup, config.samples, log=log)
    del steps
    meter = memory_meter(device, config.memory)
    rows = []
    for cell in cells:
        row = Row(cell, times={"train": timings[cell].times, "train_cpu": timings[cell].cpu_times})
        row.seconds = {k: statistics.median(v) for k, v in row.times.items()}
        row.mem_mib = peak_memory(lambda: build_step(cell), device, meter) / MIB
        log(f"memory {cell}: {row.mem_mib:.0f} MiB")
        rows.append(row)
    base = rows[0]
    for row in rows:
        row.vs_seed = {"time": paired_ratio(row.times["train"], base.times["train"]),
                       "cpu": paired_ratio(row.times["train_cpu"], base.times["train_cpu"])}
        row.mem_vs_seed = ratio(row.mem_mib, base.mem_mib)
    return rows


def markdown(rows: List[Row], env: dict) -> str:
    lines = [f"device {env['device']}, {env['threads']} threads, torch {env['torch']}, batch {env['batch_size']}, "
             f"{env['queries']} queries, {env['image']}, --dynamic_scale {env['dynamic_scale']}, warmup "
             f"{env['warmup']} rounds, {env['samples']} interleaved rounds (paired samples)",
             f"load average at start {env['load_start']}, at end {env['load_end']}",
             f"memory: {env['memory']}",
             "ratios to the original code's step: median of the per-round ratios [bootstrap 95% interval]; "
             "'not resolved': wider than +-3%",
             "",
             "| cell | train ms | train cpu ms | train MiB | time /seed | cpu /seed | mem /seed |",
             "|---|---:|---:|---:|---|---|---:|"]
    for row in rows:
        lines.append(f"| {row.cell} | {row.seconds['train'] * 1000:.1f} | {row.seconds['train_cpu'] * 1000:.1f} | "
                     f"{row.mem_mib:.0f} | {row.vs_seed['time'].format()} | {row.vs_seed['cpu'].format()} | "
                     f"{row.mem_vs_seed:.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m experiments.benchmark seed",
        description="This fork's training step against the original SMCA code's (a checkout given with "
                    "--seed_repo), interleaved in one process. main.py model flags for the fork go after '--'.",
        allow_abbrev=False)
    parser.add_argument("--seed_repo", required=True, metavar="PATH",
                        help=f"a checkout of the original SMCA code ({SEED_URL})")
    parser.add_argument("--dynamic_scale", default="type2", choices=SEED_SCALES)
    parser.add_argument("--accels", nargs="+", default=[DEFAULT_ACCEL], metavar="NAME",
                        help=f"the fork's speed flags, any of: {' '.join(ACCELS)} (default: {DEFAULT_ACCEL})")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--size", default="512", metavar="S|HxW",
                        help="min side S (DETR shape S x min(round(S*1333/800), 1333)) or HxW")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (compilation happens here)")
    parser.add_argument("--samples", type=int, default=10, help="timed interleaved rounds (>= 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory", default=MEMORY_METHODS[0], choices=MEMORY_METHODS)
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, model_flags = split_model_flags(argv)
    opts = get_args_parser().parse_args(own)
    load_start = load_average()
    try:
        size = image_shape(opts.size)
        config = seed_config(opts.dynamic_scale, opts.accels, opts.queries, size, opts.batch_size, opts.warmup,
                             opts.samples, opts.device, opts.memory, model_flags)
        set_threads(opts.threads)
        rows = run(load_seed(opts.seed_repo), config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(opts.device, memory_meter(torch.device(opts.device), opts.memory).method,
                      batch_size=opts.batch_size, queries=opts.queries, image=f"{size[0]}x{size[1]}",
                      dynamic_scale=opts.dynamic_scale, warmup=opts.warmup, samples=opts.samples,
                      accels=opts.accels, model_flags=model_flags, seed_repo=os.path.abspath(opts.seed_repo),
                      load_start=load_start, load_end=load_average())
    print(markdown(rows, env), end="")
    if opts.json:
        write_json(opts.json, {"environment": env, "rows": [asdict(r) for r in rows]})
    return 0
