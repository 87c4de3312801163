"""TensorBoard events for one training run, written by rank 0 straight into the run's output_dir.

A sweep root therefore holds one TensorBoard run per run folder, named as the run (no timestamped
sub-folders). Tags and the step each is written at:

  train/<name>               step = global iteration (the engine's counter, saved as 'tb_step')
  train_by_images/<name>     step = images seen by all ranks, an axis independent of batch size and GPU count
  epoch/train_<name>         step = epochs done = 0-based epoch index + 1
  epoch/time                 step = epochs done; seconds the epoch took
  coco/<AP|AP50|...|ARl>     step = epochs done; the 12 COCOeval bbox stats (COCO_METRIC_NAMES)
  segm/<AP|AP50|...|ARl>     step = epochs done; the 12 COCOeval mask stats (--masks runs)
  panoptic/<PQ|SQ|...|RQ_st> step = epochs done; PQ, SQ, RQ of all, thing (_th) and stuff (_st) classes
                             (PANOPTIC_METRIC_NAMES, fractions; panoptic --masks runs)
  voc/mAP50_<11point|area>   step = epochs done; the VOC metric's means, for VOC-layout sets (datasets/voc_eval.py)
  voc_AP50_<11point|area>/<class>  step = epochs done; its per-class APs (-1: no ground truth)
  smca/<key>                 step = epochs done; histogram of an SMCA diagnostic, e.g. smca/layer0/scale
  smca/<key>_mean            step = epochs done; its mean (for '.../offset_norm' keys only the mean,
                             under smca/<key>)
  hparams/<metric>           step = epochs done at the last log_epoch; final metrics for the HPARAMS dashboard
  _hparams_/experiment, _hparams_/session_start_info, _hparams_/session_end_info: HPARAMS plugin data
"""
from __future__ import annotations

import glob
import math
import os
from typing import TYPE_CHECKING

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from util.errors import UserError

if TYPE_CHECKING:
    import torch

# Order of pycocotools' COCOeval.stats for bbox evaluation.
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# evaluate()'s panoptic stats keys (DETR's log.txt names: test_PQ_all ...) -> metric name suffix
PANOPTIC_GROUPS = {"PQ_all": "", "PQ_th": "_th", "PQ_st": "_st"}
PANOPTIC_METRIC_NAMES = tuple(f"{m}{suffix}" for suffix in PANOPTIC_GROUPS.values() for m in ("PQ", "SQ", "RQ"))


# experiments/compare.py's --metric names -> their epoch-axis TensorBoard tags (bbox AP, mask AP as segm_AP, PQ)
METRIC_TAGS = {**{name: f"coco/{name}" for name in COCO_METRIC_NAMES},
               **{f"segm_{name}": f"segm/{name}" for name in COCO_METRIC_NAMES},
               **{name: f"panoptic/{name}" for name in PANOPTIC_METRIC_NAMES}}
EVAL_TAG_PREFIXES = ("coco/", "segm/", "panoptic/")


def panoptic_metrics(stats: dict) -> dict[str, float]:
    """{'PQ': .., 'SQ': .., ..., 'RQ_st': ..} from evaluate()'s stats ('PQ_all': {'pq', 'sq', 'rq', 'n'}, ...);
    empty when the stats hold no panoptic evaluation."""
    metrics = {}
    for key, suffix in PANOPTIC_GROUPS.items():
        if key in stats:
            metrics.update({f"{m.upper()}{suffix}": float(stats[key][m]) for m in ("pq", "sq", "rq")})
    return metrics

EVENTS_GLOB = "events.out.tfevents.*"
ITERATION_PREFIX = "train/"
HPARAMS_METRIC_PREFIX = "hparams/"
# Diagnostics that are one number per layer in spirit: logged as a mean only, no histogram.
SCALAR_ONLY_DIAGNOSTICS = ("offset_norm",)
# Events reach disk at least this often, so a TensorBoard watching a live sweep stays close to current.
FLUSH_SECS = 30


def drop_events_after(output_dir: str, iteration: int) -> int:
    """Rewrite the event files in output_dir without what was written after training passed `iteration`.

    Used on resume with the checkpoint's global iteration, so that the resumed run continues the same
    curves with no step written twice. An event is dropped when the latest train/ event before it in
    its file (or itself) has step > iteration; that covers every axis: train_by_images/ events are
    written right after their train/ event, and epoch-axis events of an epoch the checkpoint does not
    hold follow train/ events past it (the engine writes an epoch's events before its checkpoint).

    Why not SummaryWriter(purge_step=...): TensorBoard's purge hides the events of every tag with
    step >= purge_step, but only train/ is on the iteration axis. train_by_images/ steps (images seen)
    are larger and would lose most of their history, and epoch-axis steps (small) would never be purged.

    Files with nothing to drop are left untouched; a rewritten file also loses a torn last record left
    by a killed job. Returns the number of events dropped.
    """
    dropped_total = 0
    for path in sorted(glob.glob(os.path.join(output_dir, EVENTS_GLOB))):
        kept, dropped, past = [], 0, False
        for record in RawEventFileLoader(path).Load():
            event = Event.FromString(record)
            if event.HasField("summary"):
                if any(v.tag.startswith(ITERATION_PREFIX) for v in event.summary.value):
                    past = event.step > iteration
                if past:
                    dropped += 1
                    continue
            kept.append(record)
        if dropped == 0:
            continue
        # The temporary name must not contain 'tfevents', or TensorBoard would read it as a second file.
        tmp_path = os.path.join(output_dir, ".tb_rewrite.tmp")
        try:
            with open(tmp_path, "wb") as f:
                writer = RecordWriter(f)
                for record in kept:
                    writer.write(record)
            os.replace(tmp_path, path)
        except OSError as e:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise UserError(f"could not rewrite {path} ({e.strerror or e}); it is unchanged: free space or "
                            f"choose another --output_dir, then resume with --resume auto") from e
        dropped_total += dropped
    return dropped_total


def hparam_value(value):
    """TensorBoard's HPARAMS plugin takes str, bool, int and float; anything else (lists, None) as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _mark_bools(experiment, session_start, names):
    """Type the given hparams as bool in the plugin data built by torch's hparams().

    torch's hparams() tests int before bool and bool is an int subclass, so it logs True as 1.0.
    """
    if not names:
        return
    exp_value = experiment.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(exp_value.content)
    for info in data.experiment.hparam_infos:
        if info.name in names:
            info.type = api_pb2.DATA_TYPE_BOOL
    exp_value.content = data.SerializeToString()

    ssi_value = session_start.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(ssi_value.content)
    for name, value in names.items():
        data.session_start_info.hparams[name].bool_value = value
    ssi_value.content = data.SerializeToString()


class RunLogger:
    """TensorBoard writer for one run; every method is a no-op when disabled.

    Args:
        output_dir: the run folder; falsy disables the logger (no files written).
        enabled: False on non-zero ranks.
        purge_step: on resume, the checkpoint's global iteration ('tb_step'); events already in
            output_dir that were written after training passed it are removed first
            (see drop_events_after), so curves continue with no step written twice.
    """

    def __init__(self, output_dir: str | None, enabled: bool = True, purge_step: int | None = None):
        self.writer = None
        # Step of the latest log_epoch, where the final hparams/ metrics are written.
        self.epochs_done = 0
        if not output_dir or not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if purge_step is not None:
            drop_events_after(output_dir, purge_step)
        # torch is imported here, not at module level: experiments/compare.py imports this module for its
        # constants and should start fast on a login node without loading torch.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=output_dir, flush_secs=FLUSH_SECS)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log_iter(self, step: int, images_seen: int, scalars: dict[str, float]) -> None:
        """train/<name> at the global iteration and train_by_images/<name> at the images seen."""
        if self.writer is None:
            return
        values = {name: float(value) for name, value in scalars.items()}
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for name, value in values.items():
            self.writer.add_scalar(f"train_by_images/{name}", value, images_seen)

    def log_epoch(
        self, epoch: int, train_stats: dict[str, float], coco_stats: list[float] | None, epoch_time: float
    ) -> None:
        """Epoch averages, COCO bbox stats and the epoch's duration at step epoch + 1 (epochs done).

        epoch is the 0-based index of the epoch that just finished; coco_stats, when given, are the 12
        COCOeval stats in pycocotools' order.
        """
        if self.writer is None:
            return
        step = epoch + 1
        for name, value in train_stats.items():
            self.writer.add_scalar(f"epoch/train_{name}", float(value), step)
        if coco_stats is not None:
            self.log_coco(epoch, coco_stats)
        self.writer.add_scalar("epoch/time", float(epoch_time), step)
        self.epochs_done = step
        # A job killed later in the next epoch still leaves this epoch's numbers on disk.
        self.writer.flush()

    def log_coco(self, epoch: int, coco_stats: list[float]) -> None:
        """The 12 COCOeval bbox stats (pycocotools' order) of an evaluation at step epoch + 1."""
        if self.writer is None:
            return
        if len(coco_stats) != len(COCO_METRIC_NAMES):
            raise ValueError(f"coco_stats has {len(coco_stats)} values, expected {len(COCO_METRIC_NAMES)}")
        for name, value in zip(COCO_METRIC_NAMES, coco_stats):
            self.writer.add_scalar(f"coco/{name}", float(value), epoch + 1)
        self.epochs_done = max(self.epochs_done, epoch + 1)
        self.writer.flush()

    def log_segmentation(self, epoch: int, eval_stats: dict) -> None:
        """Mask AP (segm/<name>) and PQ (panoptic/<name>) of an evaluation at step epoch + 1, when it has them."""
        if self.writer is None:
            return
        step = epoch + 1
        for name, value in zip(COCO_METRIC_NAMES, eval_stats.get("coco_eval_masks", ())):
            self.writer.add_scalar(f"segm/{name}", float(value), step)
        for name, value in panoptic_metrics(eval_stats).items():
            self.writer.add_scalar(f"panoptic/{name}", value, step)
        self.writer.flush()

    def log_voc(self, epoch: int, stats: dict) -> None:
        """The VOC metric of an evaluation (engine.evaluate's 'voc_*' stats) at step epoch + 1."""
        if self.writer is None:
            return
        step = epoch + 1
        for definition in ("11point", "area"):
            self.writer.add_scalar(f"voc/mAP50_{definition}", float(stats[f"voc_mAP50_{definition}"]), step)
            for name, aps in stats["voc_AP50_per_class"].items():
                self.writer.add_scalar(f"voc_AP50_{definition}/{name}", float(aps[definition]), step)

    def log_smca(self, epoch: int, diagnostics: dict[str, torch.Tensor]) -> None:
        """SMCA diagnostics at step epoch + 1: 'layer{i}/scale' -> histogram smca/layer{i}/scale and
        scalar smca/layer{i}/scale_mean; 'layer{i}/offset_norm' -> scalar mean smca/layer{i}/offset_norm."""
        if self.writer is None:
            return
        step = epoch + 1
        for key, tensor in diagnostics.items():
            values = tensor.detach().float().cpu().flatten()
            mean = values.mean().item() if values.numel() else math.nan
            if key.rsplit("/", 1)[-1] in SCALAR_ONLY_DIAGNOSTICS:
                self.writer.add_scalar(f"smca/{key}", mean, step)
                continue
            # A histogram cannot bin NaN/inf; the mean still shows them, which is what flags a blow-up.
            finite = values[values.isfinite()]
            if finite.numel():
                self.writer.add_histogram(f"smca/{key}", finite, step)
            self.writer.add_scalar(f"smca/{key}_mean", mean, step)

    def log_hparams(self, config: dict, metrics: dict[str, float]) -> None:
        """The run's flags and metrics for TensorBoard's HPARAMS dashboard, in this run's own folder.

        Call once at start (metrics empty) and again at the end with the final metrics, keyed by name
        ('AP') or tag ('hparams/AP'). TensorBoard keeps the first experiment / session-start data of a
        run, so the metric tags are declared on every call: hparams/<COCO name> plus the given keys.
        The metric values go to scalars hparams/<name>; the session is marked finished when metrics
        are given.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        hparam_dict = {name: hparam_value(value) for name, value in sorted(config.items())}
        bools = {name: value for name, value in hparam_dict.items() if isinstance(value, bool)}
        metric_values = {
            (name if name.startswith(HPARAMS_METRIC_PREFIX) else HPARAMS_METRIC_PREFIX + name): float(value)
            for name, value in metrics.items()
        }
        metric_tags = [HPARAMS_METRIC_PREFIX + name for name in COCO_METRIC_NAMES]
        metric_tags += [tag for tag in metric_values if tag not in metric_tags]
        experiment, session_start, session_end = hparams(hparam_dict, {tag: 0.0 for tag in metric_tags})
        _mark_bools(experiment, session_start, bools)

        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        for tag, value in metric_values.items():
            self.writer.add_scalar(tag, value, self.epochs_done)
        if metric_values:
            self.writer.file_writer.add_summary(session_end)
        self.writer.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
