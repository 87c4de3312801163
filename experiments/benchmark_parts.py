"""Where a training step's time goes: each part of the model timed on its own, on the inputs it gets in a real
step, against the whole step (``python -m experiments.benchmark parts``).

    python -m experiments.benchmark parts [--variants NAME...] [--route fused|explicit] [--queries Q] [--size S]
        [--batch_size B] [--device cpu|cuda] [--warmup N] [--samples N] [--threads N] [--json PATH]
        [-- MAIN.PY MODEL FLAGS...]

For each variant: one training step (experiments/benchmark_steps.py) runs once with forward pre-hooks that record
what every part is called with. A part is a module called directly by the model's containers (PARTS_OF): the
backbone's ResNet and position encoding, the input projection(s), each encoder layer (its I or M letter for the
multi-scale encoder), each decoder layer, each layer's spatial prior, the box-centre reference MLP, the heads;
then the criterion (matcher and losses), the matcher alone, and clipping + the AdamW step. Each part's step is
its forward on the recorded inputs (detached copies, requiring gradients where the originals did) and the
backward of its outputs' sum, so what the part costs in both passes; the criterion's backward reaches only the
model outputs; the matcher has none. Parts and the whole step are then timed in interleaved rounds
(experiments/benchmark_rounds.py): a part's share is the median of its per-round time over the whole step's in
the same round, with a bootstrap 95% interval. What no part covers (flattening, masks, positions, the decoder's
glue between layers, autograd's own bookkeeping) is the whole step minus the sum of the parts: 'rest'.
"""
import argparse
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from experiments.benchmark_common import image_shape, split_model_flags, write_json
from experiments.benchmark_model import MODEL_VARIANTS, Config, variant_args
from experiments.benchmark_rounds import Ratio, check_samples, interleave, load_average, paired_ratio
from experiments.benchmark_steps import Built, float32_outputs, make_train_step, synthetic_batch
from models.criterion import weighted
from options import PRIOR_IMPLS
from util.errors import UserError
from util.misc import NestedTensor

# containers: a module called directly by one of these is a part, unless it calls parts itself (the encoder)
PARTS_OF = ("", "backbone", "input_proj", "transformer", "transformer.encoder", "transformer.encoder.layers",
            "transformer.decoder", "transformer.decoder.layers", "transformer.decoder.priors")
STEP = "training step"
CRITERION, MATCHER, OPTIMIZER = "criterion (matcher + losses)", "matcher", "clip + AdamW step"
REST = "rest (glue, not in a part)"


@dataclass
class PartRow:
    variant: str
    part: str
    calls: int
    ms: Optional[float]  # median per round
    share: Optional[Ratio]  # of the training step, paired per round


def _parent(name: str) -> str:
    return name.rpartition(".")[0] if "." in name else ""


def _label(model: nn.Module, name: str) -> str:
    """The module's name, with its I/M letter for a multi-scale encoder's layer."""
    pattern = getattr(getattr(getattr(model, "transformer", None), "encoder", None), "pattern", None)
    if pattern and _parent(name) == "transformer.encoder.layers":
        return f"{name} ({pattern[int(name.rpartition('.')[2])]})"
    return name


def _detached(obj):
    """The same structure with every tensor detached: float tensors that required grad become leaves that do."""
    if isinstance(obj, Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad and obj.is_floating_point())
    if isinstance(obj, NestedTensor):
        return NestedTensor(_detached(obj.tensors), obj.mask)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (the fused route's FactoredPrior)
        return type(obj)(*(_detached(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _tensors(obj) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, NestedTensor):
        return [obj.tensors]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def record_calls(built: Built, samples, targets) -> Dict[str, List[Tuple[tuple, dict]]]:
    """One forward + criterion with pre-hooks on every module: the parts' recorded (args, kwargs), detached,
    in call order, plus the matcher's and the criterion's inputs."""
    calls = defaultdict(list)
    modules = dict(built.module.named_modules())
    handles = [module.register_forward_pre_hook(
        lambda _, args, kwargs, name=name: calls[name].append(_detached((args, kwargs))), with_kwargs=True)
        for name, module in modules.items() if name and _parent(name) in PARTS_OF]
    handles.append(built.criterion.matcher.register_forward_pre_hook(
        lambda _, args, kwargs: calls[MATCHER].append(_detached((args, kwargs))), with_kwargs=True))
    try:
        built.module.train()
        outputs = built.module(samples)
        with torch.no_grad():
            built.criterion(float32_outputs(outputs), targets)  # the matcher's calls
    finally:
        for handle in handles:
            handle.remove()
    calls = {name: recorded for name, recorded in calls.items()  # a called container's parts stand for it
             if not any(other.startswith(name + ".") for other in calls)}
    calls[CRITERION] = [((_detached(float32_outputs(outputs)), targets), {})]
    return calls


def _backward_of_sum(outputs) -> None:
    grads = [t for t in _tensors(outputs) if t.requires_grad]
    if grads:
        sum(t.float().sum() for t in grads).backward()


def part_step(module: nn.Module, calls: List[Tuple[tuple, dict]], leaves: List[Tensor]) -> Callable[[], None]:
    """Forward on every recorded call and the backward of the outputs' sum; gradients freed first, as after an
    optimizer step, so every round computes them afresh."""
    def step() -> None:
        for tensor in leaves:
            tensor.grad = None
        _backward_of_sum([module(*args, **kwargs) for args, kwargs in calls])
    return step


def criterion_step(built: Built, calls) -> Callable[[], None]:
    (outputs, targets), _ = calls[0]
    weights = built.criterion.weight_dict

    def step() -> None:
        for tensor in _tensors(outputs):
            tensor.grad = None
        losses = built.criterion(outputs, targets)
        sum(weighted(losses, weights).values()).backward()
    return step


def optimizer_step(args, built: Built) -> Callable[[], None]:
    """Clipping and AdamW over the model's parameters, with gradients of the step's shape (random values)."""
    params = [p for p in built.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator).to(p.device) for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        if args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip_max_norm)
        optimizer.step()
        for p in params:
            p.grad = None  # as the training step's zero_grad(set_to_none=True)
    return step


def build_steps(args, device: torch.device, batch) -> Tuple[Dict[str, Callable[[], None]], Dict[str, int], Built]:
    """The whole training step first, then every part's step (in call order), criterion, matcher, optimizer."""
    built = Built(args, device)
    samples, targets = batch
    steps = {STEP: make_train_step(args, samples, targets, device, built=built)}
    calls = record_calls(built, samples, targets)
    counts = {STEP: 1}
    modules = dict(built.module.named_modules())
    for name, recorded in calls.items():
        if name in (CRITERION, MATCHER):
            continue
        leaves = [t for t in _tensors(recorded) if t.requires_grad] + list(modules[name].parameters())
        steps[_label(built.module, name)] = part_step(modules[name], recorded, leaves)
        counts[_label(built.module, name)] = len(recorded)
    steps[CRITERION] = criterion_step(built, calls[CRITERION])
    steps[MATCHER] = lambda: [built.criterion.matcher(*args, **kwargs) for args, kwargs in calls[MATCHER]]
    steps[OPTIMIZER] = optimizer_step(args, built)
    counts.update({CRITERION: 1, MATCHER: len(calls[MATCHER]), OPTIMIZER: 1})
    return steps, counts, built


def measure(config: Config, route: str, log=print) -> List[PartRow]:
    device = torch.device(config.device)
    (height, width), queries = config.sizes[0], config.queries[0]
    rows = []
    for variant in config.variants:
        args = variant_args(config, variant, queries, route)
        batch = synthetic_batch(config.batch_size, height, width, args.num_classes)
        batch = (batch[0].to(device), [{k: v.to(device) for k, v in t.items()} for t in batch[1]])
        steps, counts, _ = build_steps(args, device, batch)
        log(f"{variant}: {len(steps) - 1} parts; {config.warmup} warmup and {config.samples} timed rounds")
        timings = interleave(steps, device, config.warmup, config.samples, log=lambda line: log(f"{variant}: {line}"))
        whole = timings[STEP].times
        summed = [sum(timings[name].times[i] for name in steps if name not in (STEP, MATCHER))
                  for i in range(len(whole))]  # the matcher runs inside the criterion: counted there
        rest = [w - s for w, s in zip(whole, summed)]
        for name in steps:
            times = timings[name].times
            rows.append(PartRow(variant, name, counts[name], statistics.median(times) * 1000,
                                None if name == STEP else paired_ratio(times, whole)))
        rows.append(PartRow(variant, REST, 0, statistics.median(rest) * 1000,
                            paired_ratio([max(r, 0.0) for r in rest], whole)))
    return rows


def _percent(share: Optional[Ratio]) -> str:
    """'36.1% [32.1, 39.9]': a share and its interval in percent (no 'not resolved': +-3% of a 1% share means
    nothing; read the interval)."""
    return "-" if share is None else f"{100 * share.median:.1f}% [{100 * share.low:.1f}, {100 * share.high:.1f}]"


def markdown(rows: List[PartRow], env: dict) -> str:
    lines = [f"device {env['device']}, {env['threads']} threads, torch {env['torch']}, batch {env['batch_size']}, "
             f"{env['queries']} queries, image {env['image']}, route {env['route']}, warmup {env['warmup']}, "
             f"{env['samples']} interleaved rounds",
             f"load average at start {env['load_start']}, at end {env['load_end']}",
             f"model flags: {' '.join(env['model_flags']) or '(main.py defaults)'}",
             "share: median of the per-round part / step time [bootstrap 95% interval]; each part forward + "
             "backward on its recorded inputs; the matcher is also inside the criterion", "",
             "| variant | part | calls | ms | share of step |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.variant} | {r.part} | {r.calls or '-'} | {r.ms:.1f} | {_percent(r.share)} |" for r in rows]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m experiments.benchmark parts", allow_abbrev=False,
                                     description="Each part of a training step timed on its own recorded inputs, "
                                                 "against the whole step. main.py model flags go after '--'.")
    parser.add_argument("--variants", nargs="+", default=["none", "type2"], metavar="NAME",
                        help=f"any of: {' '.join(MODEL_VARIANTS)}")
    parser.add_argument("--route", default=PRIOR_IMPLS[0], choices=PRIOR_IMPLS, help="--prior_impl of SMCA variants")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--size", default="800", metavar="S|HxW", help="as the model mode's --sizes")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--samples", type=int, default=10, help="timed interleaved rounds (>= 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, model_flags = split_model_flags(argv)
    opts = get_args_parser().parse_args(own)
    load_start = load_average()
    try:
        unknown = [v for v in opts.variants if v not in MODEL_VARIANTS]
        if unknown:
            raise UserError(f"--variants: unknown {' '.join(unknown)}; choose from {' '.join(MODEL_VARIANTS)}")
        problems = check_samples(opts.samples)
        if problems:
            raise UserError(problems[0])
        if opts.threads is not None:
            torch.set_num_threads(max(1, opts.threads))
        config = Config(variants=opts.variants, queries=[opts.queries], sizes=[image_shape(opts.size)],
                        batch_size=opts.batch_size, device=opts.device, warmup=opts.warmup, samples=opts.samples,
                        model_flags=model_flags)
        rows = measure(config, opts.route, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    height, width = config.sizes[0]
    env = {"device": config.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "batch_size": config.batch_size, "queries": opts.queries, "image": f"{height}x{width}", "route": opts.route,
           "warmup": opts.warmup, "samples": opts.samples, "model_flags": model_flags, "load_start": load_start,
           "load_end": load_average()}
    print(markdown(rows, env), end="")
    if opts.json:
        write_json(opts.json, {"environment": env, "rows": [asdict(r) for r in rows]})
    return 0
