"""Interleaved timing and paired ratios with bootstrap intervals (``python -m experiments.benchmark model``).

Every variant is built once, in one process; then each round runs one step of every variant (A B C, then B C A,
C A B, ...: the start moves one on per round so no variant always follows the same one), timing the wall clock
and the process CPU time of each step. A slow spell of the machine hits every variant of a round alike, so the
ratio of two variants within a round (a paired sample) cancels it, where medians taken one variant after another
would not. A ratio is reported as the median of its per-round ratios with a bootstrap 95% interval: the rounds are
resampled with replacement (BOOTSTRAP_RESAMPLES times, numpy, fixed seed), the median taken of each resample,
and the 2.5th and 97.5th percentiles of those medians are the interval. A ratio whose interval reaches further
than RESOLUTION (3%) from its median on either side is flagged 'not resolved': the data cannot tell a 2%
difference.
"""
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from experiments.benchmark_common import Timing, sync

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
RESOLUTION = 0.03  # an interval wider than +-3% of the median: 'not resolved'
MIN_SAMPLES = 10


@dataclass
class Ratio:
    median: float  # median of the per-round ratios
    low: float  # bootstrap 2.5th percentile of the median
    high: float  # bootstrap 97.5th percentile of the median
    resolved: bool  # low and high within RESOLUTION of the median

    def format(self) -> str:
        text = f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return text if self.resolved else text + " not resolved"


def paired_ratio(values: Sequence[float], baseline: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Ratio:
    """values[i] / baseline[i] per round i: their median and its bootstrap 95% interval (module docstring)."""
    if len(values) != len(baseline) or not len(values):
        raise ValueError(f"paired samples need equal, non-zero counts, got {len(values)} and {len(baseline)}")
    ratios = np.asarray(values, dtype=np.float64) / np.asarray(baseline, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))
    medians = np.median(ratios[picks], axis=1)  # (resamples,)
    low, high = np.percentile(medians, [2.5, 97.5])
    median = float(np.median(ratios))
    resolved = bool(high <= median * (1 + RESOLUTION) and low >= median * (1 - RESOLUTION))
    return Ratio(median, float(low), float(high), resolved)


def interleave(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int, samples: int,
               log: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """``warmup`` untimed rounds, then ``samples`` timed rounds of one call of every step, the order rotated one
    place per round. Returns each step's Timing (one wall and one CPU time per round, in round order)."""
    names = list(steps)
    timings = {name: Timing([], []) for name in names}
    for round_index in range(-warmup, samples):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            if round_index >= 0:
                timings[name].times.append(time.perf_counter() - start)
                timings[name].cpu_times.append(time.process_time() - cpu_start)
        if log is not None:
            log(f"round {round_index + 1}/{samples}" if round_index >= 0 else f"warmup round {round_index + warmup + 1}/{warmup}")
    return timings


def load_average() -> str:
    """os.getloadavg() as '1, 5, 15 min: a b c' ('unavailable' where the platform has none)."""
    try:
        return "1, 5, 15 min: " + " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unavailable"


def check_samples(samples: int) -> List[str]:
    """Problems with --samples (an empty list when it is fine)."""
    return [] if samples >= MIN_SAMPLES else [f"--samples {samples}: at least {MIN_SAMPLES} paired samples"]
