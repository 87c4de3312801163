"""Benchmarks of DETR against the SMCA ablations: ``python -m experiments.benchmark [MODE] [FLAGS...]``.

Modes (``python -m experiments.benchmark MODE --help`` for each one's flags):
  model   (default) a whole model's training step and inference, per variant and prior route, with the
          time and peak-memory ratios to DETR (experiments/benchmark_model.py)
  coattn  one decoder co-attention with and without the prior, over queries x image sizes: the prior's own
          share and its growth with Q x HW (experiments/benchmark_coattn.py)
  eval    evaluation throughput (post-processing + COCO scoring) per COCO backend, side by side
          (experiments/benchmark_eval.py)
  infer   CPU inference, eager PyTorch against the ONNX export in onnxruntime: images/s and peak memory
          (experiments/benchmark_infer.py; needs the export extra)
  parts   where a training step's time goes: backbone, each encoder and decoder layer (I/M for multi-scale),
          each prior, heads, criterion, matcher, optimizer, each timed on its recorded inputs, as shares of
          the step (experiments/benchmark_parts.py)
  seed    this fork's training step against the original SMCA code's (a checkout given with --seed_repo),
          interleaved in one process, with the fork's speed flags (experiments/benchmark_seed.py)

A mode is a module with ``cli(argv) -> exit code``; add one to MODES. Without a mode name the flags go to
``model``, so the commands of earlier versions still work.
"""
import importlib
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):
    # Run as a script (python experiments/benchmark.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {
    "model": "experiments.benchmark_model",
    "coattn": "experiments.benchmark_coattn",
    "eval": "experiments.benchmark_eval",
    "infer": "experiments.benchmark_infer",
    "parts": "experiments.benchmark_parts",
    "seed": "experiments.benchmark_seed",
}
DEFAULT_MODE = "model"


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    mode, rest = (argv[0], argv[1:]) if argv and argv[0] in MODES else (DEFAULT_MODE, argv)
    return importlib.import_module(MODES[mode]).cli(rest)


if __name__ == "__main__":
    sys.exit(cli())
