"""Time and memory of a training step and of inference: plain DETR against the SMCA ablations, on a synthetic batch.

    python -m experiments.benchmark [--variants NAME...] [--queries Q...] [--sizes S...] [--batch_size B]
        [--device cpu|cuda] [--warmup N] [--iters N] [--repeats N] [--amp] [--threads N]
        [--json PATH] [--csv PATH] [-- MAIN.PY MODEL FLAGS...]
    python -m experiments.benchmark eval ...   # evaluation throughput per COCO backend: experiments/benchmark_eval.py

    # the issue's question: overhead of each type over DETR, 300 queries, 800x1333, batch 2, on a busy CPU
    python -m experiments.benchmark --device cpu --threads 1 --queries 300 --sizes 800 --iters 1 --repeats 2 \
        --variants none type1 type2 type3 type4 type2+head_mixture type2+query_mixture --json bench.json
    # a small model, quick, on CPU
    python -m experiments.benchmark --queries 100 300 900 --sizes 512 -- --backbone resnet18 --hidden_dim 128

What one measurement is
  train:     forward + criterion + backward + gradient clipping (--clip_max_norm, 0.1 as DETR) + AdamW step
  inference: model.eval(), no_grad, forward + post-processing
Each is timed with time.perf_counter (torch.cuda.synchronize before and after on CUDA) for --iters calls after
--warmup untimed calls, on a freshly built model (same seed for every variant). The batch is --batch_size random
images of one size with 3 to 6 random boxes each, the same (fixed seed) for every variant. Weights are random
(no download): time and memory do not depend on their values. The reported time is the median over all
iterations of all repeats; images/s = batch_size / median seconds.

Image sizes: ``S`` means DETR's shape, min side S and max side 1333: S x min(round(S * 1333 / 800), 1333)
(512 -> 512x853, 800 -> 800x1333, 1333 -> 1333x1333); ``HxW`` gives the shape directly.

Memory (MiB), per measurement, the peak during the timed iterations minus what was in use before the model was
built, so it counts weights, gradients, optimizer state and activations:
  CUDA: torch.cuda.max_memory_allocated (peak reset after the warmup) minus memory_allocated before building.
  CPU:  the kernel's peak resident set size (VmHWM, reset through /proc/self/clear_refs after the warmup) minus
        the RSS before building (after gc and malloc_trim). Where /proc/self/clear_refs is not writable, RSS
        sampled with psutil every 5 ms in a background thread (can miss short peaks). RSS is noisy: it counts
        pages the allocator keeps cached and shared library pages, so compare CPU memory ratios, not MiB, and
        only within one run.
Ratios (``/none``) divide by the baseline ``none`` at the same queries and size in the same run; they are '-'
when ``none`` is not among --variants.

Noise: on CPU other processes and thermal/frequency drift move the times. --repeats N runs every variant N
times per grid cell in round-robin order, starting one later each repeat (drift spreads over all variants),
and the median is over all N * iters samples. On CPU the process CPU time of each call (time.process_time) is
recorded too and its ratio to the baseline is shown ('cpu /none'): time spent waiting for a core taken by
another process is not counted, so on a shared machine it is the steadier overhead measure. With more than one
thread it also counts OpenMP spin-waiting; use --threads 1 on a busy machine.

Model flags after ``--`` go to main.py's parser (unknown flags are an error). The benchmark sets
--num_queries, --dynamic_scale, --head_mixture, --query_mixture, --batch_size, --device and --amp itself;
--num_classes defaults to COCO's 91. --cls_loss stays 'auto' as in training (focal with a spatial prior, ce
without); pass ``-- --cls_loss focal`` to time every variant with the same loss.
"""
import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):
    # Run as a script (python experiments/benchmark.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import main as detr_main
from datasets import COCO_NUM_CLASSES
from models import build_model
from util.errors import UserError
from util.misc import nested_tensor_from_tensor_list

# name -> main.py flags that differ from plain DETR
VARIANTS: Dict[str, List[str]] = {
    "none": [],
    "type1": ["--dynamic_scale", "type1"],
    "type2": ["--dynamic_scale", "type2"],
    "type3": ["--dynamic_scale", "type3"],
    "type4": ["--dynamic_scale", "type4"],
    "type2+head_mixture": ["--dynamic_scale", "type2", "--head_mixture"],
    "type2+query_mixture": ["--dynamic_scale", "type2", "--query_mixture"],
    "type2+both": ["--dynamic_scale", "type2", "--head_mixture", "--query_mixture"],
}
BASELINE = "none"
# flags the benchmark sets itself; passing them after -- would silently lose or fight the grid
RESERVED_FLAGS = ("--num_queries", "--dynamic_scale", "--head_mixture", "--query_mixture", "--batch_size",
                  "--device", "--amp")
# DETR's training resize: shorter side S, longer side at most 1333 (COCO images are about 800x1333 after it)
DETR_MAX_SIZE = 1333
DETR_ASPECT = 1333 / 800
BOXES_PER_IMAGE = (3, 6)  # inclusive range of random boxes per synthetic image
BATCH_SEED = 0
MODEL_SEED = 0
RSS_SAMPLE_SECONDS = 0.005
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------------- inputs

def image_shape(spec: str) -> Tuple[int, int]:
    """'800' -> (800, 1333) (DETR's shape for min side 800), '600x900' -> (600, 900)."""
    try:
        if "x" in spec:
            height, width = (int(part) for part in spec.split("x"))
        else:
            height = int(spec)
            width = min(round(height * DETR_ASPECT), DETR_MAX_SIZE)
    except ValueError:
        raise UserError(f"--sizes {spec!r}: give the min side S (e.g. 800) or HxW (e.g. 800x1333)") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--sizes {spec!r}: height and width must be positive")
    return height, width


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, seed: int = BATCH_SEED):
    """(NestedTensor (B, 3, H, W) without padding, targets in the dataset format), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, height, width, generator=generator) for _ in range(batch_size)]
    size = torch.tensor([height, width])
    targets = []
    for index in range(batch_size):
        count = int(torch.randint(BOXES_PER_IMAGE[0], BOXES_PER_IMAGE[1] + 1, (1,), generator=generator))
        centers = 0.2 + 0.6 * torch.rand(count, 2, generator=generator)  # (N, 2) cx, cy inside the image
        extents = 0.05 + 0.3 * torch.rand(count, 2, generator=generator)  # (N, 2) w, h
        targets.append({
            "boxes": torch.cat([centers, extents], dim=1),  # (N, 4) normalised cxcywh
            "labels": torch.randint(0, num_classes, (count,), generator=generator),
            "image_id": torch.tensor([index]),
            "orig_size": size.clone(),
            "size": size.clone(),
            "area": extents.prod(dim=1) * height * width,
            "iscrowd": torch.zeros(count, dtype=torch.int64),
        })
    return nested_tensor_from_tensor_list(images), targets


# ---------------------------------------------------------------------------------------------------- memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CudaMemory:
    method = "CUDA: torch.cuda.max_memory_allocated over the timed iterations minus memory_allocated before build"

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        _sync(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        _sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        _sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS before a build is not inflated by the last one."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


class CpuKernelPeakRss:
    method = ("CPU: kernel peak RSS (VmHWM, reset via /proc/self/clear_refs after warmup) minus RSS before build; "
              "RSS is noisy (allocator caching, shared pages)")

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.base = _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return _proc_status_kib("VmHWM") * 1024 - self.base


class CpuSampledRss:
    method = (f"CPU: RSS sampled with psutil every {RSS_SAMPLE_SECONDS * 1000:g} ms during the timed iterations "
              f"minus RSS before build; can miss short peaks; RSS is noisy (allocator caching, shared pages)")

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.thread = None

    def _sample(self) -> None:
        while not self.stop.wait(RSS_SAMPLE_SECONDS):
            self.max_rss = max(self.max_rss, self.process.memory_info().rss)

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.base = self.process.memory_info().rss

    def reset_peak(self) -> None:
        self.max_rss = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def peak(self) -> int:
        self.stop.set()
        self.thread.join()
        self.max_rss = max(self.max_rss, self.process.memory_info().rss)
        return self.max_rss - self.base


def memory_meter(device: torch.device):
    if device.type == "cuda":
        return CudaMemory(device)
    return CpuKernelPeakRss() if _can_reset_peak_rss() else CpuSampledRss()


# ---------------------------------------------------------------------------------------------------- steps

def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _float32(outputs: dict) -> dict:
    """Losses and post-processing in float32 whatever the autocast dtype (as engine.py)."""
    return {k: (v.float() if isinstance(v, torch.Tensor) else [{n: t.float() for n, t in aux.items()} for aux in v])
            for k, v in outputs.items()}


def _build(args, device: torch.device):
    torch.manual_seed(MODEL_SEED)  # identical weights for the parameters every variant shares
    model, criterion, postprocessors = build_model(args, backbone_weights="none")
    return model.to(device), criterion.to(device), postprocessors


def make_train_step(args, samples, targets, device: torch.device) -> Callable[[], None]:
    """One DETR training step: forward, criterion, backward, clip to --clip_max_norm, AdamW step."""
    model, criterion, _ = _build(args, device)
    model.train()
    criterion.train()
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone}],
                                  lr=args.lr, weight_decay=args.weight_decay)
    weights = criterion.weight_dict
    amp = args.amp

    def step() -> None:
        with _autocast(device, amp):
            outputs = model(samples)
        loss_dict = criterion(_float32(outputs), targets)
        loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        optimizer.step()

    return step


def make_inference_step(args, samples, targets, device: torch.device) -> Callable[[], None]:
    """Inference as in evaluation: eval mode, no_grad, forward and post-processing to absolute boxes."""
    model, _, postprocessors = _build(args, device)
    model.eval()
    orig_sizes = torch.stack([t["orig_size"] for t in targets])  # (B, 2)
    amp = args.amp

    @torch.no_grad()
    def step() -> None:
        with _autocast(device, amp):
            outputs = model(samples)
        postprocessors["bbox"](_float32(outputs), orig_sizes)

    return step


STEPS = {"train": make_train_step, "infer": make_inference_step}


@dataclass
class Measurement:
    times: List[float]  # wall seconds, one per timed iteration
    cpu_times: List[float]  # process CPU seconds (all threads), one per timed iteration
    peak_bytes: int


def measure(kind: str, args, batch, device: torch.device, warmup: int, iters: int, meter) -> Measurement:
    """Build a fresh model for ``kind`` ('train' | 'infer'), run ``warmup`` untimed and ``iters`` timed calls."""
    samples, targets = batch
    meter.start()
    step = STEPS[kind](args, samples, targets, device)
    for _ in range(warmup):
        step()
    _sync(device)
    meter.reset_peak()
    times, cpu_times = [], []
    for _ in range(iters):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = meter.peak()
    del step
    return Measurement(times, cpu_times, peak)


# ---------------------------------------------------------------------------------------------------- grid

@dataclass
class Config:
    variants: List[str]
    queries: List[int]
    sizes: List[Tuple[int, int]]
    batch_size: int = 2
    device: str = "cpu"
    warmup: int = 1
    iters: int = 3
    repeats: int = 1
    amp: bool = False
    model_flags: List[str] = field(default_factory=list)


@dataclass
class Row:
    variant: str
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


def variant_args(config: Config, variant: str, queries: int) -> argparse.Namespace:
    """Resolved main.py args for one grid cell; bad combinations raise UserError from main.resolve_args."""
    argv = (["--num_classes", str(COCO_NUM_CLASSES)] + config.model_flags + VARIANTS[variant]
            + ["--num_queries", str(queries), "--batch_size", str(config.batch_size), "--device", config.device]
            + (["--amp"] if config.amp else []))
    args = _parse_model_flags(argv)
    detr_main.resolve_args(args)
    return args


def check_config(config: Config) -> None:
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {' '.join(VARIANTS)}")
    if len(set(config.variants)) != len(config.variants):
        raise UserError("--variants: a name is given twice")
    if config.batch_size <= 0 or config.iters <= 0 or config.repeats <= 0 or config.warmup < 0:
        raise UserError("--batch_size, --iters and --repeats must be positive and --warmup >= 0")
    if any(q <= 0 for q in config.queries):
        raise UserError(f"--queries must be positive, got {config.queries}")
    reserved = [t for t in config.model_flags if t.split("=", 1)[0] in RESERVED_FLAGS]
    if reserved:
        raise UserError(f"model flags after --: {' '.join(reserved)} is set by the benchmark; use --variants, "
                        f"--queries, --batch_size, --device, --amp instead")
    for variant in config.variants:  # every cell is valid before the first (slow) measurement
        for queries in config.queries:
            variant_args(config, variant, queries)


def _ratio(value: float, base: float) -> Optional[float]:
    return value / base if base > 0 else None


def run(config: Config, log=print) -> List[Row]:
    """Measure every (size, queries, variant) cell; rows in (size, queries, variant) order of the config."""
    check_config(config)
    device = torch.device(config.device)
    meter = memory_meter(device)
    num_classes = variant_args(config, config.variants[0], config.queries[0]).num_classes
    cells = len(config.sizes) * len(config.queries) * config.repeats * len(config.variants)
    done = 0
    rows = []
    for height, width in config.sizes:
        batch = synthetic_batch(config.batch_size, height, width, num_classes)
        batch = (batch[0].to(device), [{k: v.to(device) for k, v in t.items()} for t in batch[1]])
        for queries in config.queries:
            samples = {v: {f"{kind}{part}": [] for kind in STEPS for part in ("", "_cpu", "_mem")}
                       for v in config.variants}
            for repeat in range(config.repeats):
                # round-robin, one later each repeat: slow drift does not always hit the same variant
                shift = repeat % len(config.variants)
                for variant in config.variants[shift:] + config.variants[:shift]:
                    args = variant_args(config, variant, queries)
                    for kind in STEPS:
                        result = measure(kind, args, batch, device, config.warmup, config.iters, meter)
                        samples[variant][kind] += result.times
                        samples[variant][f"{kind}_cpu"] += result.cpu_times
                        samples[variant][f"{kind}_mem"].append(result.peak_bytes)
                    done += 1
                    log(f"[{done}/{cells}] {variant} q={queries} {height}x{width} repeat {repeat + 1}: "
                        f"train {statistics.median(samples[variant]['train'][-config.iters:]) * 1000:.0f} ms, "
                        f"infer {statistics.median(samples[variant]['infer'][-config.iters:]) * 1000:.0f} ms")
            rows += _rows(config, samples, queries, height, width)
    return rows


def _rows(config: Config, samples: dict, queries: int, height: int, width: int) -> List[Row]:
    rows = {}
    for variant, s in samples.items():
        train_s, infer_s = statistics.median(s["train"]), statistics.median(s["infer"])
        rows[variant] = Row(variant=variant, queries=queries, height=height, width=width,
                            batch_size=config.batch_size,
                            train_s=train_s, train_img_s=config.batch_size / train_s,
                            train_cpu_s=statistics.median(s["train_cpu"]),
                            train_mem_mib=statistics.median(s["train_mem"]) / MIB,
                            infer_s=infer_s, infer_img_s=config.batch_size / infer_s,
                            infer_cpu_s=statistics.median(s["infer_cpu"]),
                            infer_mem_mib=statistics.median(s["infer_mem"]) / MIB,
                            train_times=s["train"], infer_times=s["infer"],
                            train_cpu_times=s["train_cpu"], infer_cpu_times=s["infer_cpu"])
    base = rows.get(BASELINE)
    if base is not None:
        for row in rows.values():
            for kind in STEPS:
                for ratio, value in (("time", "s"), ("cpu", "cpu_s"), ("mem", "mem_mib")):
                    setattr(row, f"{kind}_{ratio}_ratio",
                            _ratio(getattr(row, f"{kind}_{value}"), getattr(base, f"{kind}_{value}")))
    return list(rows.values())


# ---------------------------------------------------------------------------------------------------- output

def table_columns(device: str) -> List[str]:
    """Per step kind: wall ms, images/s, MiB and the ratios to the baseline (CPU time ratio on CPU only)."""
    columns = ["variant", "queries", "image"]
    for kind in STEPS:
        columns += [f"{kind} ms", f"{kind} img/s", f"{kind} MiB", f"{kind} time /{BASELINE}"]
        columns += [f"{kind} cpu /{BASELINE}"] if device == "cpu" else []
        columns += [f"{kind} mem /{BASELINE}"]
    return columns


CSV_FIELDS = [name for name in Row.__dataclass_fields__ if not name.endswith("_times")]


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def environment(config: Config, meter_method: str) -> dict:
    return {"device": config.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "batch_size": config.batch_size, "warmup": config.warmup, "iters": config.iters,
            "repeats": config.repeats, "amp": config.amp, "model_flags": config.model_flags,
            "memory": meter_method, "cuda_device": (torch.cuda.get_device_name() if config.device.startswith("cuda")
                                                    else None)}


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
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        cells = [r.variant, str(r.queries), f"{r.height}x{r.width}"]
        for kind in STEPS:
            cells += [f"{getattr(r, f'{kind}_s') * 1000:.1f}", f"{getattr(r, f'{kind}_img_s'):.3f}",
                      f"{getattr(r, f'{kind}_mem_mib'):.0f}", _fmt_ratio(getattr(r, f"{kind}_time_ratio"))]
            cells += [_fmt_ratio(getattr(r, f"{kind}_cpu_ratio"))] if device == "cpu" else []
            cells += [_fmt_ratio(getattr(r, f"{kind}_mem_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        "python -m experiments.benchmark",
        description="Time and memory of a DETR/SMCA training step and inference on a synthetic batch. "
                    "main.py model flags go after '--'.", allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"any of: {' '.join(VARIANTS)} (default: all)")
    parser.add_argument("--queries", nargs="+", type=int, default=[100], metavar="Q")
    parser.add_argument("--sizes", nargs="+", default=["800"], metavar="S|HxW",
                        help="min side S (DETR shape S x min(round(S*1333/800), 1333)) or HxW")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin passes over the variants")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--csv", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        from experiments import benchmark_eval

        return benchmark_eval.cli(argv[1:])
    own, model_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    opts = get_args_parser().parse_args(own)
    try:
        config = Config(variants=opts.variants, queries=opts.queries, sizes=[image_shape(s) for s in opts.sizes],
                        batch_size=opts.batch_size, device=opts.device, warmup=opts.warmup, iters=opts.iters,
                        repeats=opts.repeats, amp=opts.amp, model_flags=model_flags)
        if opts.threads is not None:
            if opts.threads <= 0:
                raise UserError(f"--threads must be positive, got {opts.threads}")
            torch.set_num_threads(opts.threads)
        rows = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(config, memory_meter(torch.device(config.device)).method)
    print(markdown(rows, env), end="")
    if opts.json:
        write_json(opts.json, rows, env)
    if opts.csv:
        write_csv(opts.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
