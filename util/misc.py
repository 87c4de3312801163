"""Batching (NestedTensor), progress logging, phase timing and seeding."""
import contextlib
import datetime
import random
import time
from collections import defaultdict, deque
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from util.dist import is_dist_avail_and_initialized


class NestedTensor:
    """A padded image batch and its padding mask (True on padded pixels)."""

    def __init__(self, tensors: Tensor, mask: Tensor):
        self.tensors = tensors  # (B, C, H, W)
        self.mask = mask  # (B, H, W) bool

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self):
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor], pad_to: Optional[Tuple[int, int]] = None) -> NestedTensor:
    """Zero-pad images (C, H, W) at the bottom/right to the largest H and W of the list, or to ``pad_to``
    (H, W) when given (--fixed_size: every batch the same size)."""
    channels = tensor_list[0].shape[0]
    height = max(t.shape[1] for t in tensor_list)
    width = max(t.shape[2] for t in tensor_list)
    if pad_to is not None:
        if height > pad_to[0] or width > pad_to[1]:
            raise ValueError(f"an image of {height}x{width} does not fit the {pad_to[0]}x{pad_to[1]} canvas")
        height, width = pad_to
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, height, width))
    mask = torch.ones((len(tensor_list), height, width), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensors, mask):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


def _describe(value) -> str:
    """What a model input is, for an error message: 'a tensor of shape (3, 64)', 'a dict', ..."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def as_nested_tensor(samples, channels: int) -> NestedTensor:
    """DETR's three input forms as one NestedTensor: a NestedTensor as it is, a (B, C, H, W) tensor (no padding:
    an all-False mask) or a list/tuple of (C, H, W) images of any sizes (padded by nested_tensor_from_tensor_list).

    ``channels``: the C the model reads. Anything else raises one ValueError naming what was given."""
    usage = f"pass a (B, {channels}, H, W) tensor, a list of ({channels}, H, W) images or a NestedTensor"
    if isinstance(samples, NestedTensor):
        tensors, mask = samples.tensors, samples.mask
        if tensors.dim() != 4 or tensors.shape[1] != channels or mask.shape != tensors.shape[:1] + tensors.shape[2:]:
            raise ValueError(f"model input: a NestedTensor of images {tuple(tensors.shape)} and mask "
                             f"{tuple(mask.shape)}; expected (B, {channels}, H, W) images and a (B, H, W) mask")
        return samples
    if isinstance(samples, Tensor):
        if samples.dim() != 4 or samples.shape[1] != channels or not samples.is_floating_point():
            hint = "; for one image use image[None]" if samples.dim() == 3 else ""
            raise ValueError(f"model input: {_describe(samples)}; {usage}{hint}")
        mask = torch.zeros((samples.shape[0], *samples.shape[2:]), dtype=torch.bool, device=samples.device)
        return NestedTensor(samples, mask)  # (B, C, H, W), (B, H, W)
    if isinstance(samples, (list, tuple)):
        bad = [i for i, image in enumerate(samples) if not isinstance(image, Tensor) or image.dim() != 3
               or image.shape[0] != channels or not image.is_floating_point()]
        if not samples or bad:
            what = "an empty list" if not samples else f"item {bad[0]} of the list is {_describe(samples[bad[0]])}"
            raise ValueError(f"model input: {what}; {usage}")
        return nested_tensor_from_tensor_list(list(samples))
    raise ValueError(f"model input: {_describe(samples)}; {usage}")


def collate_fn(batch, pad_to: Optional[Tuple[int, int]] = None):
    """Images padded into one NestedTensor (to ``pad_to`` (H, W) when given), targets as a tuple."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(list(images), pad_to), targets


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SmoothedValue:
    """A series of values with a windowed median/average and a global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Only the global average is synchronised; the window stays local."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(list(self.deque))) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Collects SmoothedValues and prints DETR-style progress lines with iteration count and ETA.

    ``show`` names the meters a progress line prints (None: all); the caller logs the full set elsewhere
    (TensorBoard, log.txt), so a line stays readable with auxiliary losses."""

    def __init__(self, delimiter: str = "  ", show: Optional[Sequence[str]] = None):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.show = tuple(show) if show is not None else None
        self.data_time = 0.0  # seconds waiting for the current item
        self.iter_time = 0.0  # seconds of the previous full iteration

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            if isinstance(value, Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def _shown(self, names=None):
        names = names if names is not None else self.show if self.show is not None else self.meters
        return [(name, self.meters[name]) for name in names if name in self.meters]

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self._shown())

    def averages(self, names: Optional[Sequence[str]] = None) -> str:
        """Global averages of the given meters (default: the shown ones), e.g. for an 'Averaged stats:' line."""
        return self.delimiter.join(f"{name}: {meter.global_avg:.4f}" for name, meter in self._shown(names))

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", total: Optional[int] = None,
                  start: int = 0):
        """Yield from ``iterable``; every ``print_freq`` items (and at the end) print progress and ETA.
        Items are counted from ``start`` (a resumed epoch) up to ``total``.

        Also exposes ``self.data_time`` / ``self.iter_time`` of the last item for the caller's logging.
        """
        total = start + len(iterable) if total is None else total
        width = len(str(total))
        began = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable, start):
            self.data_time = time.time() - end
            data_time.update(self.data_time)
            yield obj
            self.iter_time = time.time() - end
            iter_time.update(self.iter_time)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                print(f"{header} [{i:{width}d}/{total}]  eta: {eta}  {self}  "
                      f"time/it: {iter_time.avg:.3f} s (data {data_time.avg:.3f} s)", flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - began))
        print(f"{header} Total time: {elapsed} ({iter_time.global_avg:.4f} s / it)", flush=True)


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over calls: ``with timer("model"): ...``.

    On CUDA each phase ends with a synchronize, so queued kernels count in the phase that launched them
    and not in the next one that waits for them."""

    def __init__(self, device: Optional[torch.device] = None):
        self.seconds = defaultdict(float)
        self._sync = device is not None and torch.device(device).type == "cuda"
        self._device = device

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize(self._device)
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds
