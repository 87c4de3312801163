"""What every benchmark mode shares: the variants, image shapes, peak-memory meters, timing one step, ratios.

Memory (bytes): measured in a pass of its own after the timings, per step: build, one call, then the peak over
a second call minus what was in use before the build (``meter.start()``), so it counts what the step builds and
keeps (weights, gradients, optimizer state) and its activations:
  CUDA: torch.cuda.max_memory_allocated (peak reset before the second call) minus memory_allocated at start.
  CPU (--memory tensors, the default): the peak of live tensor bytes, exact: every allocation and free of
        PyTorch's CPU allocator from the profiler's memory events, summed in time order (CpuTensorPeak). The
        same number in every run and whatever ran before in the process; it leaves out the Python heap,
        oneDNN's own scratch buffers and the C allocator's cache, as CUDA's counter leaves out its cache.
  CPU (--memory rss): the kernel's peak resident set size (VmHWM, reset through /proc/self/clear_refs before
        the second call) minus the RSS at start (after gc and malloc_trim), with glibc told to give every
        allocation of 1 MiB or more back to the OS when freed (return_freed_memory) and free heap pages
        released (malloc_trim) before the second call. Where /proc/self/clear_refs is not writable, RSS
        sampled with psutil every 5 ms in a background thread (can miss short peaks). Small allocations, the
        heap's fragmentation and shared library pages count, so the peak moves with what ran before in the
        process (docs/benchmarks.md): compare ratios within one run.
Times: time.perf_counter around each call (torch.cuda.synchronize before and after on CUDA), and on CPU the
process CPU time (time.process_time): time spent waiting for a core taken by another process is not counted,
so on a shared machine it is the steadier overhead measure (with more than one thread it also counts OpenMP
spin-waiting; use --threads 1 on a busy machine).
"""
import contextlib
import ctypes
import ctypes.util
import gc
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd import DeviceType

from util.errors import UserError

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
# multi-scale SMCA (docs/multiscale-smca.md), whole models only (``model`` mode): the paper's P (IIMII) and the
# official zip's Z, with type2 scales as the single-scale variant they are compared with
MULTISCALE_VARIANTS: Dict[str, List[str]] = {
    "ms_P_IIMII": ["--dynamic_scale", "type2", "--ms_levels", "16,32,64", "--enc_layers", "5", "--enc_pattern", "IIMII",
                   "--dim_feedforward", "1024"],
    "ms_Z": ["--dynamic_scale", "type2", "--ms_levels", "8,16,32,64", "--ms_encoder", "dwconv", "--ms_prior",
             "per_level", "--dim_feedforward", "1024"],
}
BASELINE = "none"  # plain DETR: every ratio divides by it
NO_ROUTE = "-"  # the --prior_impl column of DETR, which has no prior
# DETR's training resize: shorter side S, longer side at most 1333 (COCO images are about 800x1333 after it)
DETR_MAX_SIZE = 1333
DETR_ASPECT = 1333 / 800
RSS_SAMPLE_SECONDS = 0.005
MIB = 2 ** 20


def set_threads(threads: Optional[int]) -> None:
    """A mode's --threads: torch.set_num_threads, or torch's default when None."""
    if threads is None:
        return
    if threads <= 0:
        raise UserError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def split_model_flags(argv: List[str]) -> Tuple[List[str], List[str]]:
    """A mode's own arguments and, after '--', main.py's flags of the model it measures."""
    if "--" not in argv:
        return list(argv), []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def write_json(path: str, result) -> None:
    """A mode's result (rows, environment) as the --json file."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def report(table: str, json_path, result) -> int:
    """A mode's last step: its markdown table on stdout, the result as the --json file if asked; exit code 0."""
    print(table, end="")
    if json_path:
        write_json(json_path, result)
    return 0


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- memory

class CudaMemory:
    method = "CUDA: torch.cuda.max_memory_allocated over the timed iterations minus memory_allocated at start"

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        sync(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        sync(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS at start is not inflated by the last step."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 2 ** 20


def return_freed_memory() -> bool:
    """glibc: serve every allocation of 1 MiB or more with its own mmap, unmapped when freed. A fixed threshold
    also stops glibc from raising it after frees, which otherwise keeps freed tensors of up to 32 MiB in the
    heap, so RSS would count the allocator's cache and differ with the order of the measurements. With it the
    peak RSS follows the live tensors. Process-wide and it slows allocation, so memory passes only. False
    where mallopt is missing (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        return bool(name) and ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):
        return False


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


class CpuKernelPeakRss:
    method = ("CPU: kernel peak RSS (VmHWM, reset via /proc/self/clear_refs after a first call) minus RSS at "
              "start, with allocations >= 1 MiB mmapped and returned when freed")

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.base = _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        _malloc_trim()  # freed heap pages of the first call leave the RSS, or they would count as live
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return _proc_status_kib("VmHWM") * 1024 - self.base


class CpuSampledRss:
    method = (f"CPU: RSS sampled with psutil every {RSS_SAMPLE_SECONDS * 1000:g} ms during the measured call "
              f"minus RSS at start (can miss short peaks), with allocations >= 1 MiB mmapped and returned when freed")

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
        _malloc_trim()
        self.max_rss = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def peak(self) -> int:
        self.stop.set()
        self.thread.join()
        self.max_rss = max(self.max_rss, self.process.memory_info().rss)
        return self.max_rss - self.base


class CpuTensorPeak:
    """Exact and load-independent: every allocation and free of PyTorch's CPU allocator, as the profiler's memory
    events record them from ``start()`` on, summed in time order; the peak of that running sum over the measured
    call (from ``reset_peak()``), counting what was live when it began. The CPU counterpart of CUDA's
    max_memory_allocated: tensors only, not the Python heap, oneDNN's own scratch buffers or what the C allocator
    keeps cached, so it is the same number whatever ran before in the process."""
    method = ("CPU: peak of live tensor bytes (PyTorch profiler memory events: every allocation and free of the CPU "
              "allocator) minus those at start; not the Python heap, oneDNN scratch or the C allocator's cache")
    mark = "benchmark: measured call"

    def start(self) -> None:
        gc.collect()
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def reset_peak(self) -> None:
        with torch.profiler.record_function(self.mark):
            pass

    def peak(self) -> int:
        self.profiler.stop()
        events = self.profiler.profiler.kineto_results.events()
        self.profiler = None
        begin = min(e.start_ns() for e in events if e.name() == self.mark)
        memory = sorted((e.start_ns(), e.nbytes()) for e in events  # (time, +bytes allocated / -bytes freed)
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
        live = sum(nbytes for time_ns, nbytes in memory if time_ns < begin)
        peak = live
        for time_ns, nbytes in memory:
            if time_ns >= begin:
                live += nbytes
                peak = max(peak, live)
        return peak


MEMORY_METHODS = ("tensors", "rss")  # the CPU meters: exact tensor bytes (default), or the process's resident set


def memory_meter(device: torch.device, method: str = MEMORY_METHODS[0]):
    """The meter for ``device``: CUDA's allocator counters; on CPU the live tensor bytes (``tensors``) or the
    kernel's RSS (``rss``, which also sets return_freed_memory() for the rest of the process)."""
    if device.type == "cuda":
        return CudaMemory(device)
    if method == "tensors":
        return CpuTensorPeak()
    meter = CpuKernelPeakRss() if can_reset_peak_rss() else CpuSampledRss()
    if not return_freed_memory():
        meter.method += " (not set: no glibc mallopt; RSS then also counts the allocator's cache)"
    return meter


# ---------------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    times: List[float]  # wall seconds, one per timed iteration
    cpu_times: List[float]  # process CPU seconds (all threads), one per timed iteration


def time_calls(build: Callable[[], Callable[[], None]], device: torch.device, warmup: int, iters: int) -> Timing:
    """``build()`` makes a step (a model, its inputs); then ``warmup`` untimed and ``iters`` timed calls."""
    step = build()
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(iters):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return Timing(times, cpu_times)


def peak_memory(build: Callable[[], Callable[[], None]], device: torch.device, meter) -> int:
    """Bytes: the peak over one call of a step built after ``meter.start()`` (so its weights, gradients and
    optimizer state count) and called once before (lazily allocated state), minus the memory at start."""
    meter.start()
    step = build()
    step()
    sync(device)
    meter.reset_peak()
    step()
    peak = meter.peak()
    del step
    return peak


def ratio(value: float, base: Optional[float]) -> Optional[float]:
    return value / base if base else None


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def environment(device: str, meter_method: str, **settings) -> dict:
    """The machine and the run's settings, for the JSON output and the table's header."""
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "memory": meter_method, **settings}
