"""Inference on the CPU, eager PyTorch against the same model exported to ONNX and run by onnxruntime
(``python -m experiments.benchmark infer``; docs/export.md).

    python -m experiments.benchmark infer [--variants none type2] [--size 800] [--batch_size 1] [--warmup 1]
        [--iters 3] [--threads N] [--json PATH] [-- MAIN.PY MODEL FLAGS...]

Per variant (experiments/benchmark_common.VARIANTS; DETR and SMCA type2 by default, fused prior route) one model
with random weights (R50, 91 class ids, the same seed for every variant) is exported as export.py does
(models/deploy.DeployModel: padded batch + mask in, 'pred_logits' and 'pred_boxes' out, dynamic sizes) into a
temporary folder. What one measurement is, on the same random batch (--batch_size images of --size, no padding):
  eager: model.eval(), no_grad, the DeployModel's forward (the model and the scoring-free outputs);
  onnxruntime: InferenceSession.run of the exported graph (CPUExecutionProvider, intra-op threads = torch's).
images/s = batch_size / median seconds of --iters timed calls after --warmup; CPU seconds are the process's.
Peak memory: a pass of its own per engine, build (model or session) then one call, then the peak over a
second call minus the memory before the build (experiments/benchmark_common.py), so it counts the weights. It is
the process's resident set, not the tensor meter, since onnxruntime allocates outside PyTorch.
The largest |onnxruntime - eager| over both outputs is reported too. Export time is not in any column.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

import export
import main as detr_main
from datasets import COCO_NUM_CLASSES
from experiments.benchmark_common import (MIB, VARIANTS, environment, image_shape, memory_meter, peak_memory,
                                          set_threads, split_model_flags, time_calls, report)
from inference import EXPORT_INSTALL_HINT
import run_setup
from util.errors import UserError

MODEL_SEED = 0
BATCH_SEED = 0
ENGINES = ("eager", "onnxruntime")


def model_args(variant: str, model_flags: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()], add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    try:
        args, unknown = parser.parse_known_args(["--num_classes", str(COCO_NUM_CLASSES), "--device", "cpu",
                                                 *model_flags, *VARIANTS[variant]])
    except argparse.ArgumentError as exc:
        raise UserError(f"model flags after --: {exc}") from None
    if unknown:
        raise UserError(f"model flags after --: unknown {' '.join(unknown)} (see python main.py --help)")
    run_setup.resolve_args(args)
    return args


def build_deploy(args):
    from models import build_model
    from models.deploy import DeployModel

    torch.manual_seed(MODEL_SEED)
    model = build_model(args, backbone_weights="none")[0].eval()
    return DeployModel(model, args.cls_loss, args.num_queries).eval()


def eager_step(args, images, mask):
    def build():
        deploy = build_deploy(args)

        @torch.no_grad()
        def step():
            deploy(images, mask)
        return step
    return build


def onnx_step(path: str, images, mask):
    def build():
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy(), "mask": mask.numpy()}
        return lambda: session.run(None, feed)
    return build


def run(opts, model_flags: List[str], log=print) -> Dict:
    height, width = image_shape(opts.size)
    generator = torch.Generator().manual_seed(BATCH_SEED)
    images = torch.randn(opts.batch_size, 3, height, width, generator=generator)
    mask = torch.zeros(opts.batch_size, height, width, dtype=torch.bool)
    meter = memory_meter(torch.device("cpu"), "rss")  # onnxruntime's buffers are not PyTorch tensors
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in opts.variants:
            args = model_args(variant, model_flags)
            path = str(Path(folder) / f"{variant}.onnx")
            log(f"{variant}: exporting")
            deploy = build_deploy(args)
            export.write_onnx(deploy, path, metadata="{}")
            with torch.no_grad():
                eager = deploy(images, mask)
            ort = onnx_step(path, images, mask)()()
            diff = max(float((torch.from_numpy(o) - e).abs().max()) for o, e in zip(ort, eager))
            del deploy
            steps = {"eager": eager_step(args, images, mask), "onnxruntime": onnx_step(path, images, mask)}
            for engine in ENGINES:
                log(f"{variant}: timing {engine}")
                timing = time_calls(steps[engine], torch.device("cpu"), opts.warmup, opts.iters)
                memory = peak_memory(steps[engine], torch.device("cpu"), meter)
                seconds = statistics.median(timing.times)
                rows.append({"variant": variant, "engine": engine, "seconds": seconds,
                             "images_per_s": opts.batch_size / seconds,
                             "cpu_s": statistics.median(timing.cpu_times), "peak_mib": memory / MIB,
                             "max_abs_diff": diff if engine == "onnxruntime" else 0.0, "times": timing.times})
    env = environment("cpu", meter.method, height=height, width=width, batch_size=opts.batch_size,
                      warmup=opts.warmup, iters=opts.iters, model_flags=model_flags)
    return {"env": env, "rows": rows}


def markdown(result: Dict) -> str:
    env = result["env"]
    lines = [f"CPU, {env['height']}x{env['width']}, batch {env['batch_size']}, {env['threads']} threads, torch "
             f"{env['torch']}, median of {env['iters']} calls after {env['warmup']} warm-up", "",
             "| variant | engine | s/batch | images/s | CPU s | peak MiB | speed-up vs eager | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    eager = {row["variant"]: row for row in result["rows"] if row["engine"] == "eager"}
    for row in result["rows"]:
        speedup = eager[row["variant"]]["seconds"] / row["seconds"]
        diff = "-" if row["engine"] == "eager" else f"{row['max_abs_diff']:.1e}"
        lines.append(f"| {row['variant']} | {row['engine']} | {row['seconds']:.3f} | {row['images_per_s']:.2f} | "
                     f"{row['cpu_s']:.3f} | {row['peak_mib']:.0f} | {speedup:.2f}x | {diff} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m experiments.benchmark infer", allow_abbrev=False,
                                     description="CPU inference: eager PyTorch vs the exported ONNX graph in "
                                                 "onnxruntime")
    parser.add_argument("--variants", nargs="+", default=["none", "type2"], metavar="NAME",
                        help=f"any of: {' '.join(VARIANTS)} (default: none type2)")
    parser.add_argument("--size", default="800", metavar="S|HxW",
                        help="min side S (DETR shape S x min(round(S*1333/800), 1333)) or HxW (default 800: 800x1333)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def cli(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, model_flags = split_model_flags(argv)
    opts = get_args_parser().parse_args(own)
    try:
        unknown = [v for v in opts.variants if v not in VARIANTS]
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {' '.join(VARIANTS)}")
        for name in ("batch_size", "warmup", "iters"):
            if getattr(opts, name) < (0 if name == "warmup" else 1):
                raise UserError(f"--{name} must be positive, got {getattr(opts, name)}")
        missing = export.missing_packages("onnx")
        if missing:
            raise UserError(f"the infer mode needs {', '.join(missing)}: {EXPORT_INSTALL_HINT}")
        set_threads(opts.threads)
        result = run(opts, model_flags, log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report(markdown(result), opts.json, result)


if __name__ == "__main__":
    sys.exit(cli())
