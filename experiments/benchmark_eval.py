"""Evaluation throughput: post-processing + COCO scoring of N images, for each COCO backend in the same run.

    python -m experiments.benchmark eval [--images 5000] [--queries 100] [--classes 80] [--objects 7.3]
        [--postprocess focal|ce] [--backends faster_coco_eval pycocotools] [--batch_size 8] [--repeats 1]
        [--seed 0] [--threads N] [--json PATH]
    (python -m experiments.benchmark_eval ... is the same)

What one measurement is, per backend, on the same inputs:
  post-processing: the model's post-processor (models/postprocess.py; focal: the top --queries (query, class)
                   pairs per image, ce: one detection per query) on random model outputs, batch by batch, and
                   CocoEvaluator.update (tensors -> COCO result dicts);
  scoring:         CocoEvaluator.accumulate + summarize (the backend's evaluate, accumulate, summarize).
images/s = images / (post-processing + scoring). Converting the ground truth to faster_coco_eval's COCO class
happens once per training run (the first evaluation); it is reported apart ('gt setup') and not in images/s.

The inputs are synthetic but COCO-shaped: N images of 320-640 px per side, a Poisson(--objects) number of
ground-truth boxes per image over --classes categories (COCO: 7.3 objects, 80 classes), small/medium/large
alike, 1% crowd; model outputs where one query per object sits near it (jittered box, its class boosted) and
the other queries are random. The time of COCO scoring grows with the detections and objects per image, not
with their values, so random outputs time it as real ones do. The stats of all backends are compared
(they must agree to float64 rounding, see tests/test_coco_eval.py).

--repeats N alternates the backend order between passes; times are medians over the passes.
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):
    # Run as a script (python experiments/benchmark_eval.py): make the repo's top-level packages importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from datasets.coco_eval import COCO_BACKENDS, CocoEvaluator, ground_truth
from experiments.benchmark_common import report
from models.postprocess import build_postprocessors
from util.errors import UserError

POSTPROCESSORS = ("focal", "ce")


def synthetic_ground_truth(num_images: int, num_classes: int, objects: float, seed: int):
    """A pycocotools COCO object: image sizes, boxes of all three COCO area ranges, some crowd regions."""
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = (int(v) for v in rng.integers(320, 641, size=2))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        for _ in range(int(rng.poisson(objects))):
            side = float(np.exp(rng.uniform(np.log(8), np.log(min(width, height) * 0.9))))
            w, h = side * rng.uniform(0.7, 1.0), side * rng.uniform(0.7, 1.0)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, num_classes + 1)), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.01)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def synthetic_outputs(coco, queries: int, num_classes: int, batch_size: int, seed: int) -> List[tuple]:
    """[(image ids, outputs {'pred_logits' (B, Q, C+2), 'pred_boxes' (B, Q, 4)}, target sizes (B, 2))]: class
    index = category id as in DETR (0 unused, the last column is no-object)."""
    rng = np.random.default_rng(seed + 1)
    image_ids = sorted(coco.getImgIds())
    batches = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        logits = rng.normal(-3.0, 1.0, size=(len(ids), queries, num_classes + 2))  # (B, Q, C+2)
        centres = rng.uniform(0.05, 0.95, size=(len(ids), queries, 2))
        sizes = np.exp(rng.uniform(np.log(0.02), np.log(0.6), size=(len(ids), queries, 2)))
        boxes = np.concatenate([centres, sizes], axis=-1)  # (B, Q, 4) normalised cxcywh
        target_sizes = []
        for b, image_id in enumerate(ids):
            info = coco.imgs[image_id]
            width, height = info["width"], info["height"]
            target_sizes.append([height, width])
            for q, ann in enumerate(coco.imgToAnns[image_id][:queries]):
                x, y, w, h = ann["bbox"]
                jitter = rng.normal(0, 0.05, size=4)
                boxes[b, q] = [(x + w / 2) / width + jitter[0] * w / width, (y + h / 2) / height + jitter[1] * h / height,
                               w / width * np.exp(jitter[2]), h / height * np.exp(jitter[3])]
                logits[b, q, ann["category_id"]] += 5.0
        outputs = {"pred_logits": torch.tensor(logits, dtype=torch.float32),
                   "pred_boxes": torch.tensor(boxes, dtype=torch.float32).clamp(0, 1)}
        batches.append((ids, outputs, torch.tensor(target_sizes)))
    return batches


def measure(coco, batches, postprocessor, backend: str) -> Dict:
    evaluator = CocoEvaluator(coco, ("bbox",), backend=backend)
    start = time.perf_counter()
    detections = 0
    for ids, outputs, target_sizes in batches:
        results = postprocessor(outputs, target_sizes)
        detections += sum(len(r["scores"]) for r in results)
        evaluator.update(dict(zip(ids, results)))
    post = time.perf_counter() - start
    start = time.perf_counter()
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluator.summarize()
    scoring = time.perf_counter() - start
    return {"post_s": post, "scoring_s": scoring, "stats": stats, "detections": detections}


def run(opts, log=print) -> Dict:
    """Measure every backend of ``opts.backends``; returns the environment, the rows and the stats check."""
    coco = synthetic_ground_truth(opts.images, opts.classes, opts.objects, opts.seed)
    batches = synthetic_outputs(coco, opts.queries, opts.classes, opts.batch_size, opts.seed)
    # the training run's rule: focal keeps num_queries pairs (the original SMCA code), ce one per query (DETR)
    postprocessor = build_postprocessors(argparse.Namespace(cls_loss=opts.postprocess, num_detections=None,
                                                            num_queries=opts.queries))["bbox"]
    samples = {b: [] for b in opts.backends}
    setup = {}
    for backend in opts.backends:
        start = time.perf_counter()
        ground_truth(coco, backend)
        setup[backend] = time.perf_counter() - start
    for repeat in range(opts.repeats):
        order = opts.backends[repeat % len(opts.backends):] + opts.backends[:repeat % len(opts.backends)]
        for backend in order:
            sample = measure(coco, batches, postprocessor, backend)
            log(f"pass {repeat + 1}/{opts.repeats} {backend}: post-processing {sample['post_s']:.2f} s, "
                f"scoring {sample['scoring_s']:.2f} s")
            samples[backend].append(sample)
    rows = []
    for backend in opts.backends:
        post = statistics.median(s["post_s"] for s in samples[backend])
        scoring = statistics.median(s["scoring_s"] for s in samples[backend])
        rows.append({"backend": backend, "images": opts.images, "detections": samples[backend][0]["detections"],
                     "gt_setup_s": setup[backend], "post_s": post, "scoring_s": scoring, "total_s": post + scoring,
                     "images_per_s": opts.images / (post + scoring), "stats": samples[backend][0]["stats"],
                     "post_times": [s["post_s"] for s in samples[backend]],
                     "scoring_times": [s["scoring_s"] for s in samples[backend]]})
    reference = rows[0]["stats"]
    max_diff = max(abs(a - b) for row in rows for a, b in zip(row["stats"], reference))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "objects": len(coco.anns),
           **{k: getattr(opts, k) for k in ("images", "queries", "classes", "postprocess", "batch_size",
                                              "repeats", "seed")}}
    return {"env": env, "rows": rows, "stats_max_abs_diff": max_diff}


def markdown(result: Dict) -> str:
    env, rows = result["env"], result["rows"]
    # speed-up against the reference implementation when it was measured
    base = next((row for row in rows if row["backend"] == "pycocotools"), rows[0])
    lines = [f"{env['images']} images, {env['objects']} objects, {env['queries']} queries, {env['classes']} classes, "
             f"{env['postprocess']} post-processing, torch {env['torch']}, {env['threads']} threads, "
             f"median of {env['repeats']} pass(es)", "",
             f"| backend | detections/image | gt setup s | post-processing s | scoring s | total s | images/s | "
             f"speed-up vs {base['backend']} | AP | AP50 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['detections'] / row['images']:.1f} | {row['gt_setup_s']:.2f} | "
                     f"{row['post_s']:.2f} | {row['scoring_s']:.2f} | {row['total_s']:.2f} | {row['images_per_s']:.1f} | "
                     f"{base['total_s'] / row['total_s']:.2f}x | {row['stats'][0]:.4f} | {row['stats'][1]:.4f} |")
    verdict = "the same" if result["stats_max_abs_diff"] <= 1e-12 else "DIFFERENT"
    lines += ["", f"12 COCO stats {verdict} across backends (largest difference {result['stats_max_abs_diff']:.1e})"]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m experiments.benchmark eval", allow_abbrev=False,
                                     description="Post-processing + COCO scoring throughput of each COCO backend.")
    parser.add_argument("--images", type=int, default=5000, help="images to evaluate (COCO val2017: 5000)")
    parser.add_argument("--queries", type=int, default=100, help="model queries per image")
    parser.add_argument("--classes", type=int, default=80, help="categories (ids 1..N)")
    parser.add_argument("--objects", type=float, default=7.3, help="mean ground-truth objects per image")
    parser.add_argument("--postprocess", choices=POSTPROCESSORS, default="focal")
    parser.add_argument("--backends", nargs="+", choices=COCO_BACKENDS, default=list(COCO_BACKENDS))
    parser.add_argument("--batch_size", type=int, default=8, help="images per post-processing call")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the backends (alternating order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def check(opts) -> None:
    for name in ("images", "queries", "classes", "batch_size", "repeats"):
        if getattr(opts, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(opts, name)}")
    if opts.objects < 0:
        raise UserError(f"--objects must be >= 0, got {opts.objects}")
    if len(set(opts.backends)) != len(opts.backends):
        raise UserError(f"--backends lists a backend twice: {' '.join(opts.backends)}")
    if opts.threads is not None and opts.threads <= 0:
        raise UserError(f"--threads must be positive, got {opts.threads}")


def cli(argv: Optional[List[str]] = None) -> int:
    opts = get_args_parser().parse_args(argv)
    try:
        check(opts)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    result = run(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    return report(markdown(result), opts.json, result)


if __name__ == "__main__":
    sys.exit(cli())
