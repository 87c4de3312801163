"""Run a trained detector on images and look at what it found.

    python predict.py --resume CKPT_OR_URL IMAGE_OR_FOLDER... --output_dir OUT [--threshold T] [--attention]
    python predict.py --onnx FILE IMAGE_OR_FOLDER... --output_dir OUT [--threshold T]   # export.py's ONNX file

Writes into OUT:
- ``detections.json``: COCO results (image_id, category_id, bbox [x, y, w, h] in image pixels, score) plus
  file_name and category_name, for every detection scoring at least --threshold;
- ``<name>_boxes.png`` per image: its boxes, class names and scores (the image's size times --vis_scale);
- with --attention, ``<name>_attention.png`` per image: for its top detections, the last decoder layer's
  co-attention per head and, for SMCA models, each head's spatial prior, overlaid on the image;
- for a segmentation checkpoint (--masks), ``<name>_panoptic.png`` per image: its panoptic segmentation, each
  segment tinted, outlined and named (the evaluation's post-processing, at the image's size).

The architecture, class names and input transform come from the checkpoint (inference.load_detector).
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

# Sigmoid (focal) scores run lower than softmax ones: a focal model's good detections often score 0.4-0.6,
# which DETR's 0.7 would hide. 0.3 is the usual cut for focal-loss DETRs' pictures.
DEFAULT_THRESHOLDS = {"ce": 0.7, "focal": 0.3}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("predict.py", allow_abbrev=False,
                                     description="detections.json, box pictures and attention figures for images")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help=f"image files, or folders whose images ({' '.join(IMAGE_SUFFIXES)}) are all used")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--resume", "--checkpoint", dest="resume", metavar="CKPT_OR_URL",
                       help="checkpoint written by main.py, or one of DETR's (path or https URL)")
    model.add_argument("--onnx", metavar="FILE",
                       help="an ONNX file written by export.py (run by onnxruntime on the CPU; needs the export "
                            "extra): the same outputs and pictures as its checkpoint")
    parser.add_argument("--output_dir", required=True, help="where detections.json and the pictures go")
    parser.add_argument("--threshold", type=float, default=None,
                        help="keep detections scoring at least this (0 keeps all: COCO-evaluable results); "
                             "default 0.7 for a softmax classifier (DETR), 0.3 for a focal one")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--attention", action="store_true",
                        help="also draw the co-attention (and SMCA's spatial prior) of the top detections")
    parser.add_argument("--attention_top", type=int, default=3, help="detections per attention figure")
    parser.add_argument("--vis_scale", type=float, default=1.0,
                        help="draw the box pictures this many times the image size (e.g. 3 for 128-px images)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (only for files you trust)")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip (and count) unreadable images instead of stopping")
    return parser


if __name__ == "__main__":
    # --help and a flag error answer before torch and the models are imported (seconds of CPU)
    get_args_parser().parse_args(sys.argv[1:])

# the imports follow the early parse on purpose
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from datasets.class_names import class_name  # noqa: E402
from datasets.images import ImageDecodeError, load_rgb  # noqa: E402
from inference import Detector, load_detector, load_onnx_detector  # noqa: E402
from models.attention_maps import co_attention_maps  # noqa: E402
from rundir.checkpoint import atomic_write_text  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from visualize import (AttentionRow, class_colour, draw_detections, draw_panoptic, plot_attention,  # noqa: E402
                       query_panels)


def check_args(args) -> None:
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.attention_top < 1 or args.vis_scale <= 0:
        raise UserError("--attention_top must be >= 1 and --vis_scale > 0")
    if args.onnx and args.attention:
        raise UserError("--attention reads the PyTorch model's attention with hooks; an --onnx graph has none: "
                        "pass the checkpoint with --resume instead")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available; use --device cpu")


def find_images(paths: List[str], output_dir: Path) -> List[Path]:
    """The files named, and the image files directly inside the folders named, in order (folders sorted)."""
    found = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            if path.resolve() == output_dir.resolve():
                raise UserError(f"--output_dir {output_dir} is also an input folder; choose another one "
                                f"(its pictures would be read as images on the next run)")
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{name} does not exist (expected an image file or a folder of images)")
    if not found:
        raise UserError(f"no images found in {' '.join(paths)} (looked for {' '.join(IMAGE_SUFFIXES)} files)")
    return found


def image_ids(images: List[Path]) -> List[int]:
    """COCO's file names are their image ids (000000139.jpg -> 139): when every name is a distinct number,
    that number is the image_id, so detections.json scores against the matching annotation file; else 1..N."""
    stems = [p.stem for p in images]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(images) + 1))


def output_names(images: List[Path]) -> List[str]:
    """File stems, made unique ('a', 'a-2', ...) when two inputs share one."""
    names, seen = [], {}
    for path in images:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


class Progress:
    """'[k/N] name: ... | s/image | ETA' lines, at most one every ``every_s`` seconds, plus the first and last."""

    def __init__(self, total: int, every_s: float = 2.0):
        self.total, self.every_s = total, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, message: str) -> None:
        now = time.monotonic()
        if done not in (1, self.total) and now - self.last < self.every_s:
            return
        self.last = now
        per_image = (now - self.start) / done
        eta = datetime.timedelta(seconds=round(per_image * (self.total - done)))
        width = len(str(self.total))
        print(f"[{done:>{width}}/{self.total}] {message} | {per_image:.2f} s/image | ETA {eta}", flush=True)


def coco_records(result: dict, image_id: int, file_name: str, names: Optional[dict]) -> List[dict]:
    """Post-processed detections (boxes absolute xyxy) -> COCO results with file_name and category_name."""
    records = []
    for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
        x0, y0, x1, y1 = box
        records.append({"image_id": image_id, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score, "file_name": file_name, "category_name": class_name(names, label)})
    return records


def attention_rows(detector: Detector, outputs: dict, maps, input_size, image: Image.Image, threshold: float,
                   top: int) -> List[AttentionRow]:
    """The ``top`` best queries scoring at least ``threshold`` (one row each), as the post-processor scores them."""
    scores, labels = detector.query_scores(outputs["pred_logits"])  # (1, Q), (1, Q)
    order = scores[0].argsort(descending=True)[:top]
    scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
    rows = []
    for q in order.tolist():
        score, label = float(scores[0, q]), int(labels[0, q])
        if score < threshold:
            break
        box = (box_cxcywh_to_xyxy(outputs["pred_boxes"][0, q].float().cpu()) * scale).numpy()
        panels = query_panels(maps, 0, q, input_size, (image.height, image.width))
        title = f"{class_name(detector.class_names, label)} {score:.2f} (query {q})"
        rows.append(AttentionRow(panels, box, title, class_colour(label)))
    return rows


@torch.no_grad()
def predict(args) -> List[dict]:
    """Run the detector over the images of ``args``; writes the pictures as it goes and detections.json at the
    end (also when a bad image stops the run: what was done is kept). Returns the detection records."""
    output_dir = Path(args.output_dir)
    images = find_images(args.images, output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir} cannot be created ({e.strerror})") from None
    if args.onnx:
        detector = load_onnx_detector(args.onnx)
    else:
        detector = load_detector(args.resume, device=args.device, trust=args.trust_checkpoint)
    print(f"model: {detector.describe()}")
    if args.attention and detector.config.get("ms_levels", "none") != "none":
        raise UserError(f"--attention draws one feature map; {args.resume} is multi-scale "
                        f"(--ms_levels {detector.config['ms_levels']}); drop --attention")
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLDS[detector.cls_loss]
        print(f"--threshold {args.threshold} (the default for a {detector.cls_loss} classifier)")
    print(f"{len(images)} images -> {output_dir}")
    records: List[dict] = []
    skipped = 0
    progress = Progress(len(images))
    try:
        for done, (path, image_id, name) in enumerate(zip(images, image_ids(images), output_names(images)), 1):
            try:
                image = load_rgb(path)  # every PIL mode by its rule, as training reads images
            except ImageDecodeError as e:
                if not args.skip_bad_images:
                    raise UserError(f"{e}; fix or remove it, or pass --skip_bad_images (the detections of the "
                                    f"{done - 1 - skipped} images before it are in {output_dir / 'detections.json'})"
                                    ) from None
                skipped += 1
                print(f"warning: {e}; skipped ({skipped} so far)", file=sys.stderr)
                continue
            found = run_one(detector, image, image_id, path.name, name, output_dir, args)
            records += found
            progress.update(done, f"{path.name}: {len(found)} detections")
    finally:
        atomic_write_text(output_dir / "detections.json", json.dumps(records), what="detections")
    print(f"wrote {len(records)} detections of {len(images) - skipped} images to {output_dir / 'detections.json'}"
          + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    return records


def panoptic_segmentation(detector: Detector, outputs: dict, input_size, image: Image.Image) -> dict:
    """The panoptic segmentation of one image at its own size: 'segments' (H, W), 0 = VOID, k = the k-th entry of
    'segments_info' ({'id', 'category_id', 'isthing', 'area'}), as the evaluation's post-processor makes it."""
    processed = torch.tensor([input_size], device=detector.device)
    target = torch.tensor([[image.height, image.width]], device=detector.device)
    result = detector.panoptic(outputs, processed, target)[0]
    return {"segments": result["segments"].cpu(), "segments_info": result["segments_info"]}


def run_one(detector: Detector, image: Image.Image, image_id: int, file_name: str, name: str, output_dir: Path,
            args) -> List[dict]:
    tensor = detector.transform(image)  # (3, h, w)
    samples = nested_tensor_from_tensor_list([tensor]).to(detector.device)
    if args.attention:
        outputs, maps = co_attention_maps(detector.model, samples)
    else:
        outputs = detector.model(samples)
    size = torch.tensor([[image.height, image.width]], device=detector.device)
    result = {k: v.cpu() for k, v in detector.postprocessor(outputs, size)[0].items()}
    order = result["scores"].argsort(descending=True, stable=True)
    result = {k: v[order][result["scores"][order] >= args.threshold] for k, v in result.items()}
    records = coco_records(result, image_id, file_name, detector.class_names)
    picture = draw_detections(image, result["boxes"].numpy(), result["labels"].tolist(),
                              [r["category_name"] for r in records], result["scores"].tolist(), args.vis_scale)
    picture.save(output_dir / f"{name}_boxes.png", optimize=True)
    if detector.panoptic is not None:
        panoptic = panoptic_segmentation(detector, outputs, tuple(tensor.shape[-2:]), image)
        names = [class_name(detector.class_names, info["category_id"]) for info in panoptic["segments_info"]]
        draw_panoptic(image, panoptic["segments"].numpy(), panoptic["segments_info"], names,
                      args.vis_scale).save(output_dir / f"{name}_panoptic.png", optimize=True)
    if args.attention:
        rows = attention_rows(detector, outputs, maps, tuple(tensor.shape[-2:]), image, args.threshold,
                              args.attention_top)
        if rows:
            plot_attention(image, rows, output_dir / f"{name}_attention.png")
        else:
            print(f"{file_name}: no attention figure, no detection scores at least --threshold {args.threshold:g}; "
                  f"a lower --threshold draws the top ones")
    return records


def cli(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
        predict(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
