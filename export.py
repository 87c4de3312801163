"""Export a trained detector to ONNX (run it with onnxruntime) or to a torch.export program (docs/export.md).

    python export.py --resume CKPT_OR_URL_OR_HUB_NAME --format onnx|torch_export --output FILE [--postprocess]

The architecture, class names and input transform come from the checkpoint, as predict.py reads them; a DETR hub
name (detr_resnet50, detr_resnet50_dc5, detr_resnet101, detr_resnet101_dc5) means DETR's published COCO weights.
The graph (models/deploy.py) takes one padded batch, 'images' (B, 3, H, W) float and 'mask' (B, H, W) bool True
on padding, with batch, height and width dynamic, and returns 'pred_logits' and 'pred_boxes' ('pred_masks' too for
a --masks model); --postprocess puts the scoring in the graph instead ('scores', 'labels', 'boxes', 'queries':
softmax for a ce classifier, top-k for a focal one). After the export a check runs the exported file (onnxruntime
for ONNX) and the PyTorch model on random images of two sizes and prints the largest difference of each output;
above CHECK_TOLERANCE the command fails. ONNX needs the export extra: pip install -e .[export].

The parser imports nothing heavy (``--help`` loads no torch); the work is in ``export_model``.
"""
import argparse
import contextlib
import importlib.util
import logging
import math
import os
import sys
import warnings
from typing import Dict, Tuple

FORMATS = ("onnx", "torch_export")
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# the check: largest |exported - PyTorch| allowed for every output (float32; measured differences are ~1e-6)
CHECK_TOLERANCE = 1e-4
# the check's random images (H, W): run as one padded batch (one image padded), then the second image alone
CHECK_SIZES = ((320, 480), (384, 256))
# the example batch the exporter traces with: two images, the second padded to the first's size
EXAMPLE_SIZES = ((256, 352), (224, 320))
INPUT_NAMES = ("images", "mask")
# the smallest image side the graph takes: the feature map needs two cells (a side of one cell is a special case to
# torch.export, which then refuses the range), i.e. more than 32 px at stride 32; 64 holds for DC5's 16 too
MIN_SIDE = 64


def dynamic_shapes():
    """Batch, height and width dynamic, the same for the images (B, 3, H, W) and the mask (B, H, W)."""
    from torch.export import Dim

    batch, height, width = Dim("batch", min=1), Dim("height", min=MIN_SIDE), Dim("width", min=MIN_SIDE)
    return {0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("export.py", allow_abbrev=False,
                                     description="export a detector to ONNX or torch.export, then check it")
    parser.add_argument("--resume", "--checkpoint", dest="resume", required=True, metavar="CKPT_OR_URL_OR_HUB_NAME",
                        help="checkpoint written by main.py, one of DETR's (path or https URL), or a DETR hub "
                             "name (detr_resnet50, ...: DETR's COCO weights)")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (dynamo exporter; run with onnxruntime) or torch_export (torch.export.save)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write (.onnx, .pt2)")
    parser.add_argument("--postprocess", action="store_true",
                        help="score the detections in the graph: outputs scores, labels, boxes (normalised xyxy) "
                             "and queries instead of pred_logits and pred_boxes")
    parser.add_argument("--no_check", dest="check", action="store_false",
                        help="skip the check of the exported file against PyTorch")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (only for files you trust)")
    return parser


def missing_packages(fmt: str) -> Tuple[str, ...]:
    """The export extra's packages that ``fmt`` needs and that are not installed."""
    needed = EXPORT_PACKAGES if fmt == "onnx" else ()
    return tuple(name for name in needed if importlib.util.find_spec(name) is None)


def random_batch(sizes, seed: int):
    """Random images of the given (H, W) sizes as one padded batch: images (B, 3, H, W), mask (B, H, W)."""
    import torch

    from util.misc import nested_tensor_from_tensor_list

    generator = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=generator) for h, w in sizes]).decompose()


def load(resume: str, trust: bool):
    """The Detector of a checkpoint path, URL or DETR hub name."""
    from inference import DETR_CHECKPOINTS, load_detector

    if resume in DETR_CHECKPOINTS:
        url, architecture = DETR_CHECKPOINTS[resume]
        return load_detector(url, check_hash=True, **architecture)
    return load_detector(resume, trust=trust)


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notes that say nothing about this model: one warning per dynamic axis (the names are
    kept; it warns that the second input's axes share the first's) and the optimizer's skipped folds."""
    optimizer = logging.getLogger("onnxscript")
    level = optimizer.level
    optimizer.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        try:
            yield
        finally:
            optimizer.setLevel(level)


def write_onnx(deploy, path: str, metadata: str) -> None:
    import onnx
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from inference import EXPORT_METADATA_KEY

    # the math attention kernel while tracing: the exporter decomposes attention into that kernel's ops, and a
    # trace with the fused CPU kernel records views of its output layout that the decomposed graph cannot take
    with sdpa_kernel(SDPBackend.MATH), quiet_exporter():
        try:
            torch.onnx.export(deploy, random_batch(EXAMPLE_SIZES, seed=0), path, dynamo=True, verbose=False,
                              external_data=False, input_names=list(INPUT_NAMES),
                              output_names=list(deploy.output_names), dynamic_shapes=dynamic_shapes())
        except torch.onnx.errors.OnnxExporterError as e:
            from util.errors import UserError
            summary = str(e).strip().splitlines()[0]
            message = f"the ONNX exporter cannot export this model ({summary}); try --format torch_export"
            raise UserError(message) from None
    proto = onnx.load(path)  # one file, weights inside (external_data=False: the models here are far below 2 GB)
    entry = proto.metadata_props.add()
    entry.key, entry.value = EXPORT_METADATA_KEY, metadata
    onnx.save(proto, path)


def write_program(deploy, path: str, metadata: str) -> None:
    import torch

    from inference import EXPORT_METADATA_KEY

    program = torch.export.export(deploy, random_batch(EXAMPLE_SIZES, seed=0), dynamic_shapes=dynamic_shapes())
    torch.export.save(program, path, extra_files={f"{EXPORT_METADATA_KEY}.json": metadata})


def exported_runner(path: str, fmt: str):
    """(images, mask) tensors -> the exported file's outputs as tensors."""
    import torch

    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images, mask: tuple(torch.from_numpy(o) for o in session.run(
            None, {"images": images.numpy(), "mask": mask.numpy()}))
    module = torch.export.load(path).module()
    return lambda images, mask: tuple(module(images, mask))


def check(deploy, path: str, fmt: str) -> Dict[str, float]:
    """The largest |exported - PyTorch| of each output over the check batches (CHECK_SIZES); inf where the shapes
    differ."""
    import torch

    run = exported_runner(path, fmt)
    worst = dict.fromkeys(deploy.output_names, 0.0)
    for seed, sizes in enumerate((CHECK_SIZES, CHECK_SIZES[1:]), start=1):
        images, mask = random_batch(sizes, seed)
        with torch.no_grad():
            expected = deploy(images, mask)
            got_all = run(images, mask)
        for name, got, want in zip(deploy.output_names, got_all, expected):
            difference = float((got.double() - want.double()).abs().max()) if got.shape == want.shape else math.inf
            worst[name] = max(worst[name], difference)
    return worst


def export_model(args) -> Dict[str, float]:
    """Export ``args.resume`` to ``args.output``; returns the check's differences per output ({} with --no_check)."""
    from inference import EXPORT_INSTALL_HINT, export_metadata
    from models.deploy import DeployModel

    from util.errors import UserError

    missing = missing_packages(args.format)
    if missing:
        raise UserError(f"--format {args.format} needs {', '.join(missing)}: {EXPORT_INSTALL_HINT}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UserError(f"--output {args.output}: the folder {folder} does not exist")
    detector = load(args.resume, args.trust_checkpoint)
    print(f"model: {detector.describe()}")
    deploy = DeployModel(detector.model, detector.cls_loss, detector.postprocessor.num_select or
                         detector.config["num_queries"], postprocess=args.postprocess).eval()
    metadata = export_metadata(detector, deploy.output_names)
    (write_onnx if args.format == "onnx" else write_program)(deploy, args.output, metadata)
    print(f"wrote {args.output} ({args.format}; inputs {', '.join(INPUT_NAMES)}; outputs "
          f"{', '.join(deploy.output_names)})")
    if not args.check:
        return {}
    worst = check(deploy, args.output, args.format)
    engine = "onnxruntime" if args.format == "onnx" else "torch.export"
    sizes = " and ".join(f"{h}x{w}" for h, w in CHECK_SIZES)
    verdict = "ok" if max(worst.values()) <= CHECK_TOLERANCE else "FAILED"
    print(f"check ({engine} vs PyTorch, random images {sizes}, tolerance {CHECK_TOLERANCE:g}): "
          + ", ".join(f"{name} max |diff| {value:.2g}" for name, value in worst.items()) + f": {verdict}")
    return worst


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from util.errors import UserError

    try:
        worst = export_model(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if worst and max(worst.values()) > CHECK_TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(cli())
