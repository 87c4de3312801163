"""One decoder co-attention with and without the SMCA prior, forward + backward, over queries x image sizes
(``python -m experiments.benchmark coattn``): the prior's own share of the cost, per route, and how it grows
with Q x HW.

    python -m experiments.benchmark coattn [--variants NAME...] [--routes fused explicit] [--queries Q...]
        [--sizes S...] [--stride 32|16] [--batch_size B] [--hidden_dim D] [--nheads M] [--dropout P]
        [--device cpu|cuda] [--warmup N] [--iters N] [--repeats N] [--threads N] [--json PATH]

    python -m experiments.benchmark coattn --threads 1 --queries 100 300 900 --sizes 512 800 1333 --iters 5

What one measurement is: one decoder layer's co-attention in training mode on a batch without padding. For an
SMCA variant, the layer's SpatialPrior (offsets, scales, then G or its factors; models/spatial_prior.py) and
the ModulatedCrossAttention (projections, SDPA with --dropout as in training, output projection); for ``none``
(DETR) the attention alone. Then the backward from a fixed random gradient into every input and parameter.
Widths and heads default to main.py's (256, 8); the feature grid is ceil(H / stride) x ceil(W / stride), the
backbone's output (800x1333 at stride 32: 25 x 42).

Reported per cell:
  ms         the median wall time of forward + backward
  saved MiB  the bytes autograd keeps from the forward for the backward (distinct storages, counted once
             with saved_tensors_hooks: exact; in a model this adds up over the decoder layers)
  peak MiB   the high-water mark of one call, measured after the timings (experiments/benchmark_common.py;
             the median over --repeats builds): it also sees transient tensors such as the explicit route's
             G, its intermediates and its gradient
  /none      each divided by ``none`` at the same queries and size: the cost of the prior
  prior      what the route built: ``G`` or ``factors`` (type4 takes G past its accurate grid size)
  kernel     the SDPA kernel PyTorch's dispatch selects for the call (math, flash_attention,
             efficient_attention, cudnn_attention). On CPU with dropout it is the math kernel, which keeps
             (B, nhead, Q, HW) tensors for DETR too; with --dropout 0 the fused route gets the flash kernel.
"""
import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import main as detr_main
from experiments.benchmark_common import (BASELINE, MIB, NO_ROUTE, VARIANTS, environment, fmt_ratio, image_shape,
                                          memory_meter, peak_memory, ratio, set_threads, time_calls)
from models.attention import FactoredPrior, ModulatedCrossAttention
from models.spatial_prior import build_priors
from options import PRIOR_IMPLS
from util.errors import UserError

SEED = 0


@dataclass
class Config:
    variants: List[str]
    queries: List[int]
    sizes: List[Tuple[int, int]]
    routes: List[str] = field(default_factory=lambda: list(PRIOR_IMPLS))
    stride: int = 32
    batch_size: int = 2
    hidden_dim: int = 256
    nheads: int = 8
    dropout: float = 0.1
    device: str = "cpu"
    warmup: int = 1
    iters: int = 3
    repeats: int = 1

    def cells(self) -> List[Tuple[str, str]]:
        return [(v, NO_ROUTE) if v == BASELINE else (v, r) for v in self.variants
                for r in ([NO_ROUTE] if v == BASELINE else self.routes)]

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        return math.ceil(height / self.stride), math.ceil(width / self.stride)


@dataclass
class Row:
    variant: str
    route: str
    prior: str  # what the route built: 'G', 'factors' or '-'
    kernel: str  # the SDPA kernel selected: math, flash_attention, efficient_attention, cudnn_attention
    queries: int
    height: int
    width: int
    grid_h: int
    grid_w: int
    ms: float  # median wall milliseconds of forward + backward
    saved_mib: float
    peak_mib: float
    time_ratio: Optional[float] = None  # / none at the same queries and size
    saved_ratio: Optional[float] = None
    peak_ratio: Optional[float] = None
    times: List[float] = field(default_factory=list)


class CoAttentionStep:
    """The inputs and modules of one co-attention; ``__call__`` runs forward + backward once."""

    def __init__(self, config: Config, variant: str, route: str, queries: int, grid: Tuple[int, int]):
        device = torch.device(config.device)
        flags = _variant_flags(variant)
        torch.manual_seed(SEED)
        batch, dim, (height, width) = config.batch_size, config.hidden_dim, grid
        self.attention = ModulatedCrossAttention(dim, config.nheads, config.dropout).to(device).train()
        self.prior = None if variant == BASELINE else build_priors(
            1, dim, config.nheads, queries, flags.dynamic_scale, flags.smooth, flags.head_mixture,
            flags.query_mixture, route)[0].to(device)
        generator = torch.Generator().manual_seed(SEED)

        def tensor(*shape, grad=True):
            return torch.randn(*shape, generator=generator).to(device).requires_grad_(grad)

        self.tgt, self.query_pos = tensor(queries, batch, dim), tensor(queries, batch, dim)
        self.memory, self.pos = tensor(height * width, batch, dim), tensor(height * width, batch, dim, grad=False)
        extent = torch.tensor([width, height], dtype=torch.float32)
        self.centre = (torch.rand(batch, queries, 2, generator=generator) * extent).to(device).requires_grad_()
        self.grid_x = torch.arange(width, dtype=torch.float32, device=device)
        self.grid_y = torch.arange(height, dtype=torch.float32, device=device)
        self.padding = torch.zeros(batch, height * width, dtype=torch.bool, device=device)
        self.upstream = tensor(queries, batch, dim, grad=False)
        self.leaves = [self.tgt, self.query_pos, self.memory, self.centre, *self.attention.parameters(),
                       *(self.prior.parameters() if self.prior is not None else ())]

    def forward(self):
        bias = None if self.prior is None else self.prior(self.tgt, self.query_pos, self.centre, self.grid_x,
                                                          self.grid_y)
        out = self.attention(self.tgt + self.query_pos, self.memory + self.pos, self.memory, self.padding, bias)
        return (out * self.upstream).sum(), bias

    def __call__(self) -> None:
        """Forward and backward once."""
        for leaf in self.leaves:
            leaf.grad = None  # as optimizer.zero_grad(set_to_none=True): no accumulation
        self.forward()[0].backward()

    def sdpa_kernel(self) -> str:
        """The kernel SDPA selects for this co-attention's call, from PyTorch's own dispatch
        (torch._fused_sdp_choice, a private function: '?' where it is missing or fails)."""
        calls = []
        original = F.scaled_dot_product_attention

        def record(*args, **kwargs):
            calls.append((args, kwargs))
            return original(*args, **kwargs)

        F.scaled_dot_product_attention = record  # models/attention.py calls it through torch.nn.functional
        try:
            self.forward()
        finally:
            F.scaled_dot_product_attention = original
        (query, key, value), kwargs = calls[0]
        try:
            choice = torch._fused_sdp_choice(query, key, value, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0),
                                             False, scale=kwargs.get("scale"))
        except (AttributeError, RuntimeError, TypeError):
            return "?"
        names = {int(backend.value): name.lower() for name, backend in SDPBackend.__members__.items()}
        return names.get(int(choice), "?")

    def saved_bytes(self) -> Tuple[int, str]:
        """Bytes of the distinct storages autograd saves for the backward, and what the prior built."""
        storages: Dict[int, int] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, bias = self.forward()
        loss.backward()
        built = "-" if bias is None else ("factors" if isinstance(bias, FactoredPrior) else "G")
        return sum(storages.values()), built


def _variant_flags(variant: str) -> argparse.Namespace:
    return detr_main.get_args_parser().parse_args(VARIANTS[variant])


def check_config(config: Config) -> None:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {' '.join(VARIANTS)}")
    bad_routes = [r for r in config.routes if r not in PRIOR_IMPLS]
    if bad_routes or not config.routes:
        raise UserError(f"--routes: choose one or both of {' '.join(PRIOR_IMPLS)}, got {' '.join(config.routes)}")
    if len(set(config.variants)) != len(config.variants) or len(set(config.routes)) != len(config.routes):
        raise UserError("--variants / --routes: a name is given twice")
    if min(config.queries) <= 0 or config.batch_size <= 0 or config.iters <= 0 or config.repeats <= 0:
        raise UserError("--queries, --batch_size, --iters and --repeats must be positive")
    if config.warmup < 0 or config.stride <= 0 or not 0 <= config.dropout < 1:
        raise UserError("--warmup must be >= 0, --stride positive and --dropout in [0, 1)")
    if config.hidden_dim % config.nheads:
        raise UserError(f"--hidden_dim {config.hidden_dim} must be divisible by --nheads {config.nheads}")
    if any("query_mixture" in v for v in config.variants) and min(config.queries) < 2:
        raise UserError("--query_mixture variants need at least 2 queries")


def run(config: Config, log=print) -> List[Row]:
    """Times first, then peak memory (experiments/benchmark_common.py), each in --repeats round-robin passes over
    the cells (median), and the saved bytes (exact, once)."""
    check_config(config)
    device = torch.device(config.device)
    cells = config.cells()
    points = [(size, queries) for size in config.sizes for queries in config.queries]
    times = {point: {cell: [] for cell in cells} for point in points}
    total, done = len(points) * len(cells) * (config.repeats + 1), 0  # timed passes, then one line per cell
    for size, queries in points:
        grid = config.grid(*size)
        for repeat in range(config.repeats):
            shift = repeat % len(cells)  # round-robin, one later each repeat
            for cell in cells[shift:] + cells[:shift]:
                timing = time_calls(lambda: CoAttentionStep(config, cell[0], cell[1], queries, grid), device,
                                    config.warmup, config.iters)
                times[size, queries][cell] += timing.times
                done += 1
                log(f"[{done}/{total}] time {cell[0]} ({cell[1]}) q={queries} grid {grid[0]}x{grid[1]}: "
                    f"{statistics.median(timing.times) * 1000:.1f} ms")
    meter = memory_meter(device)  # after the timings, as the rss meter changes how memory is returned
    rows = []
    for size, queries in points:
        grid = config.grid(*size)
        peaks = {cell: [] for cell in cells}
        for repeat in range(config.repeats):  # CPU peaks move by some MiB from build to build: a median
            shift = repeat % len(cells)
            for cell in cells[shift:] + cells[:shift]:
                peaks[cell].append(peak_memory(lambda: CoAttentionStep(config, cell[0], cell[1], queries, grid),
                                               device, meter))
        group = []
        for cell in cells:
            step = CoAttentionStep(config, cell[0], cell[1], queries, grid)
            saved, built = step.saved_bytes()
            kernel = step.sdpa_kernel()
            del step
            peak = statistics.median(peaks[cell])
            group.append(Row(variant=cell[0], route=cell[1], prior=built, kernel=kernel, queries=queries,
                             height=size[0],
                             width=size[1], grid_h=grid[0], grid_w=grid[1],
                             ms=statistics.median(times[size, queries][cell]) * 1000, saved_mib=saved / MIB,
                             peak_mib=peak / MIB, times=times[size, queries][cell]))
            done += 1
            log(f"[{done}/{total}] memory {cell[0]} ({cell[1]}) q={queries} grid {grid[0]}x{grid[1]}: "
                f"saved {saved / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB")
        base = next((r for r in group if r.variant == BASELINE), None)
        for row in group:
            if base is not None:
                row.time_ratio = ratio(row.ms, base.ms)
                row.saved_ratio = ratio(row.saved_mib, base.saved_mib)
                row.peak_ratio = ratio(row.peak_mib, base.peak_mib)
        rows += group
    return rows


COLUMNS = ["variant", "route", "prior", "kernel", "queries", "image", "grid", "Q x HW", "ms", "saved MiB", "peak MiB",
           f"time /{BASELINE}", f"saved /{BASELINE}", f"peak /{BASELINE}"]


def markdown(rows: List[Row], env: dict) -> str:
    lines = [f"device {env['device']}" + (f" ({env['cuda_device']})" if env["cuda_device"] else "")
             + f", {env['threads']} threads, torch {env['torch']}; one co-attention, forward + backward, batch "
             f"{env['batch_size']}, width {env['hidden_dim']}, {env['nheads']} heads, dropout {env['dropout']}, "
             f"stride {env['stride']}; warmup {env['warmup']}, iters {env['iters']} x repeats {env['repeats']} "
             f"(median)", f"memory: {env['memory']}", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|"]
    for r in rows:
        cells = [r.variant, r.route, r.prior, r.kernel, str(r.queries), f"{r.height}x{r.width}",
                 f"{r.grid_h}x{r.grid_w}", str(r.queries * r.grid_h * r.grid_w), f"{r.ms:.1f}",
                 f"{r.saved_mib:.1f}", f"{r.peak_mib:.0f}", fmt_ratio(r.time_ratio), fmt_ratio(r.saved_ratio), fmt_ratio(r.peak_ratio)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m experiments.benchmark coattn", allow_abbrev=False,
        description="One decoder co-attention (forward + backward) with and without the SMCA prior.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"any of: {' '.join(VARIANTS)} (default: all; 'none' is the attention alone)")
    parser.add_argument("--routes", nargs="+", default=list(PRIOR_IMPLS), metavar="ROUTE",
                        help=f"--prior_impl values: {' '.join(PRIOR_IMPLS)} (default: both)")
    parser.add_argument("--queries", nargs="+", type=int, default=[100, 300, 900], metavar="Q")
    parser.add_argument("--sizes", nargs="+", default=["512", "800", "1333"], metavar="S|HxW",
                        help="image sizes as in the model mode (800 -> 800x1333)")
    parser.add_argument("--stride", type=int, default=32, help="backbone stride (16 for DC5)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--hidden_dim", type=int, default=256)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    opts = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = Config(variants=opts.variants, routes=opts.routes, queries=opts.queries,
                        sizes=[image_shape(s) for s in opts.sizes], stride=opts.stride, batch_size=opts.batch_size,
                        hidden_dim=opts.hidden_dim, nheads=opts.nheads, dropout=opts.dropout, device=opts.device,
                        warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats)
        set_threads(opts.threads)
        rows = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = {k: getattr(config, k) for k in ("batch_size", "hidden_dim", "nheads", "dropout", "stride", "warmup",
                                                "iters", "repeats")}
    env = environment(config.device, memory_meter(torch.device(config.device)).method, **settings)
    print(markdown(rows, env), end="")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0
