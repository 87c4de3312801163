"""Train one epoch and evaluate (COCO scoring: datasets/coco_eval.py); explicit parameters, no argparse namespace."""
import contextlib
import datetime
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils.data.distributed import DistributedSampler

from datasets.coco_eval import DEFAULT_BACKEND, CocoEvaluator
from datasets.panoptic_eval import STATS_KEYS, PanopticEvaluator
from datasets.voc_eval import VocEvaluator
from models.criterion import weighted
from util import dist
from util.errors import UserError
from util.misc import MetricLogger, PhaseTimer, SmoothedValue
from util.tb import COCO_METRIC_NAMES, panoptic_metrics

# What the console shows per progress line; every meter still goes to TensorBoard and log.txt.
LOSS_METERS = ("loss", "loss_ce", "loss_bbox", "loss_giou")
TRAIN_CONSOLE = LOSS_METERS + ("lr",)
EVAL_CONSOLE = LOSS_METERS + ("class_error",)
# Phases of evaluate(), in order: stats 'time_<phase>' (seconds), and their names in the printed line.
EVAL_PHASES = {"data": "data", "model": "model", "loss": "loss", "postprocess": "post-processing",
               "gather": "gathering", "scoring": "COCO scoring"}
VOC_MEAN_NAMES = ("voc_mAP50_11point", "voc_mAP50_area")


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first ``start`` indices (a preempted epoch resumes
    at the batch it stopped at, with the same order, since the order depends only on seed and epoch)."""

    start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class NonFiniteLoss(UserError):
    pass


def nonfinite_outputs(outputs: dict) -> List[str]:
    """Names of the model outputs holding a NaN or inf ('pred_boxes', 'aux_outputs[0].pred_logits', ...).
    Checked before the loss: the matcher's GIoU asserts on NaN boxes, and scipy refuses NaN costs."""
    named = [(k, v) for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        named += [(f"aux_outputs[{i}].{k}", v) for k, v in aux.items()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()  # one device sync per step
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _nonfinite_on_any_rank(outputs: dict, device: torch.device) -> List[str]:
    """``nonfinite_outputs`` agreed on by every rank (they must all take the same path or DDP hangs)."""
    bad = nonfinite_outputs(outputs)
    if dist.any_rank(bool(bad), device) and not bad:
        bad = ["on another rank"]
    return bad


@dataclass
class TrainResult:
    stats: Dict[str, float]
    step: int  # global iteration counter after the epoch (TensorBoard x axis)
    skipped: int = 0  # batches skipped for a non-finite output or loss
    stopped_at: Optional[int] = None  # iterations done in this epoch when a stop was requested


def _autocast(device: torch.device, amp: bool):
    if amp:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _targets_to(targets, device) -> List[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, max_norm: float = 0.0,
                    logger=None, step: int = 0, images_per_step: int = 1, log_every: int = 20,
                    max_iters: int = 0, amp: bool = False, skip_nonfinite: int = 0,
                    should_stop: Callable[[], bool] = lambda: False, start_iter: int = 0) -> TrainResult:
    """One pass over ``data_loader``. Stops early after ``max_iters`` steps (0: no cap) or when
    ``should_stop()`` turns true after a step (preemption: ``stopped_at`` says how many steps are done).
    A non-finite model output (checked first, on every rank) or loss raises NonFiniteLoss naming epoch,
    iteration and the outputs or loss components, unless fewer than ``skip_nonfinite`` batches were skipped
    so far (then the batch is skipped and counted)."""
    model.train()
    criterion.train()
    metric_logger = MetricLogger(delimiter="  ", show=TRAIN_CONSOLE)
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    total = len(data_loader) + start_iter
    if max_iters:
        total = min(total, max_iters)
    result = TrainResult(stats={}, step=step)
    weight_dict = criterion.weight_dict
    batches = itertools.islice(data_loader, total - start_iter)
    iterator = metric_logger.log_every(batches, log_every, f"Epoch: [{epoch}]", total=total, start=start_iter)

    def nonfinite(what: str, i: int) -> None:
        """Stop with NonFiniteLoss, or count the batch as skipped while --skip_nonfinite allows."""
        if result.skipped >= skip_nonfinite:
            raise NonFiniteLoss(f"{what} at epoch {epoch}, iteration {i}; stopped, the last checkpoint is untouched "
                                f"(--skip_nonfinite N skips such batches)")
        result.skipped += 1
        print(f"skipping batch: {what} at epoch {epoch}, iteration {i}; {result.skipped} skipped so far")
        optimizer.zero_grad(set_to_none=True)

    for i, (samples, targets) in enumerate(iterator, start=start_iter):
        samples = samples.to(device)
        targets = _targets_to(targets, device)
        with _autocast(device, amp):
            outputs = model(samples)
        outputs = {k: _float(v) for k, v in outputs.items()}
        bad = _nonfinite_on_any_rank(outputs, device)
        if bad:
            nonfinite(f"non-finite model output ({', '.join(bad)})", i)
            continue
        loss_dict = criterion(outputs, targets)
        losses = sum(weighted(loss_dict, weight_dict).values())

        reduced = dist.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
        scaled = weighted(reduced, weight_dict)
        unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
        loss_value = sum(scaled.values()).item()
        if not math.isfinite(loss_value):
            components = ", ".join(f"{k}={v.item():.4g}" for k, v in scaled.items())
            nonfinite(f"non-finite loss {loss_value} ({components})", i)
            continue

        optimizer.zero_grad(set_to_none=True)
        losses.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm > 0
                     else _grad_norm(model))
        optimizer.step()
        result.step += 1

        metric_logger.update(loss=loss_value, **scaled, **unscaled)
        metric_logger.update(class_error=reduced.get("class_error", torch.zeros(())))
        metric_logger.update(lr=optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm))
        if logger is not None and (i % log_every == 0 or i == total - 1):
            scalars = {"loss": loss_value, **{k: v.item() for k, v in scaled.items()},
                       **{k: v.item() for k, v in unscaled.items()}, "grad_norm": float(grad_norm),
                       "iter_time": metric_logger.iter_time,
                       "data_time": metric_logger.data_time}
            for g, group in enumerate(optimizer.param_groups):
                scalars[f"lr_group{g}"] = group["lr"]
            if device.type == "cuda":
                scalars["cuda_max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            logger.log_iter(result.step, result.step * images_per_step, scalars)
        if should_stop():
            result.stopped_at = i + 1
            break
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger.averages(LOSS_METERS + ("class_error",)))
    result.stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return result


def _float(value):
    """Losses in float32 whatever the autocast dtype of the outputs."""
    if isinstance(value, torch.Tensor):
        return value.float()
    return [{k: v.float() for k, v in aux.items()} for aux in value]


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def coco_evaluator(base_ds, postprocessors: Dict, coco_backend: str = DEFAULT_BACKEND) -> CocoEvaluator:
    """The COCO evaluator ``evaluate`` scores with: boxes, and masks where the post-processors make them."""
    return CocoEvaluator(base_ds, ("bbox", "segm") if "segm" in postprocessors else ("bbox",), backend=coco_backend)


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, postprocessors: Dict, data_loader: Iterable,
             base_ds, device: torch.device, amp: bool = False, log_every: int = 20,
             coco_backend: str = DEFAULT_BACKEND, voc_metric: bool = False,
             evaluator: Optional[CocoEvaluator] = None) -> Tuple[Dict, List[float]]:
    """Losses on the validation set and COCO bbox evaluation merged over all ranks; with ``voc_metric`` also
    the Pascal VOC metric on the same detections (datasets/voc_eval.py); with the post-processors 'segm' and
    'panoptic' (--masks, models/postprocess_segm.py) also mask AP and PQ, as DETR.

    Returns (stats, coco_stats): stats has the averaged losses, 'coco_eval_bbox' (the 12 COCOeval numbers),
    with ``voc_metric`` 'voc_mAP50_11point', 'voc_mAP50_area' and 'voc_AP50_per_class', with 'segm'
    'coco_eval_masks', with 'panoptic' 'PQ_all', 'PQ_th', 'PQ_st' ({'pq', 'sq', 'rq', 'n'}, DETR's keys), and
    'time_<phase>' for each phase of EVAL_PHASES plus 'time_total' (seconds on this rank; the printed line says
    where the time went); coco_stats is the bbox list of 12. Pass an ``evaluator`` (``coco_evaluator``) to read
    its merged detections afterwards.
    """
    model.eval()
    criterion.eval()
    metric_logger = MetricLogger(delimiter="  ", show=EVAL_CONSOLE)
    if evaluator is None:
        evaluator = coco_evaluator(base_ds, postprocessors, coco_backend)
    voc_evaluator = VocEvaluator(base_ds) if voc_metric else None
    # PQ against the panoptic ground truth of the loader's dataset (DETR reads it from there too)
    panoptic = PanopticEvaluator.from_dataset(data_loader.dataset) if "panoptic" in postprocessors else None
    timer = PhaseTimer(device)
    began = time.perf_counter()
    for batch, (samples, targets) in enumerate(metric_logger.log_every(data_loader, log_every, "Test:")):
        timer.add("data", metric_logger.data_time)
        with timer("model"):
            samples = samples.to(device)
            targets = _targets_to(targets, device)
            with _autocast(device, amp):
                outputs = model(samples)
            outputs = {k: _float(v) for k, v in outputs.items()}
        bad = _nonfinite_on_any_rank(outputs, device)
        if bad:
            raise NonFiniteLoss(f"non-finite model output ({', '.join(bad)}) in evaluation batch {batch}: the weights "
                                f"or activations have diverged; nothing was saved for this epoch (resume from an "
                                f"earlier checkpoint, e.g. with a lower --lr)")
        with timer("loss"):
            loss_dict = dist.reduce_dict(criterion(outputs, targets))
            scaled = weighted(loss_dict, criterion.weight_dict)
            metric_logger.update(loss=sum(scaled.values()), **scaled,
                                 class_error=loss_dict.get("class_error", torch.zeros(())))
        with timer("postprocess"):
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            sizes = torch.stack([t["size"] for t in targets])
            canvas = samples.tensors.shape[-2:]  # the padded batch the masks cover
            results = postprocessors["bbox"](outputs, orig_sizes)
            if "segm" in postprocessors:
                results = postprocessors["segm"](results, outputs, orig_sizes, sizes, canvas)
            per_image = {t["image_id"].item(): r for t, r in zip(targets, results)}
            evaluator.update(per_image)
            if voc_evaluator is not None:
                voc_evaluator.update(per_image)
            if panoptic is not None:
                segmentations = postprocessors["panoptic"](outputs, sizes, orig_sizes, canvas)
        if panoptic is not None:
            with timer("scoring"):
                panoptic.update({t["image_id"].item(): r for t, r in zip(targets, segmentations)})
    with timer("gather"):
        metric_logger.synchronize_between_processes()
        evaluator.synchronize_between_processes()
        if voc_evaluator is not None:
            voc_evaluator.synchronize_between_processes()
        if panoptic is not None:
            panoptic.synchronize_between_processes()
    print("Averaged stats:", metric_logger.averages())
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    with timer("scoring"):
        if voc_evaluator is not None:
            stats.update(voc_evaluator.summarize())
        evaluator.accumulate()
        coco_stats = [float(x) for x in evaluator.summarize()]
        if "segm" in evaluator.iou_types:
            stats["coco_eval_masks"] = evaluator.stats_by_type["segm"]
        if panoptic is not None:
            results = panoptic.summarize()
            stats.update({key: results[group] for group, key in STATS_KEYS.items()})
    stats["coco_eval_bbox"] = coco_stats
    stats.update({f"time_{phase}": timer.seconds[phase] for phase in EVAL_PHASES})
    stats["time_total"] = time.perf_counter() - began
    print(eval_time_line(stats, len(evaluator.img_ids), coco_backend))
    return stats, coco_stats


def eval_time_line(stats: Dict, num_images: int, coco_backend: str) -> str:
    """'evaluation time 0:00:12 for 64 images (5.3 images/s): data 0.41 s, model 8.10 s, ...'."""
    total = stats["time_total"]
    rate = f"{num_images / total:.1f} images/s" if total > 0 else "-"
    phases = ", ".join(f"{label} {stats[f'time_{phase}']:.2f} s" for phase, label in EVAL_PHASES.items())
    return (f"evaluation time {datetime.timedelta(seconds=round(total))} for {num_images} images ({rate}): "
            f"{phases} ({coco_backend})")


def final_metrics(test_stats: Dict) -> Dict[str, float]:
    """The named COCO metrics of the last evaluation, its VOC mAPs where measured and PQ/SQ/RQ for panoptic runs
    (empty if none)."""
    coco = test_stats.get("coco_eval_bbox") if test_stats else None
    metrics = dict(zip(COCO_METRIC_NAMES, coco)) if coco else {}
    metrics.update({k: test_stats[k] for k in VOC_MEAN_NAMES if test_stats and k in test_stats})
    metrics.update(panoptic_metrics(test_stats or {}))
    return metrics


__all__ = ["train_one_epoch", "evaluate", "eval_time_line", "final_metrics", "nonfinite_outputs", "ResumableSampler",
           "TrainResult", "NonFiniteLoss"]
